"""The fault hierarchy over a real Mosquitto: sensor agents -> gateway worker -> cloud worker, each window
in the tier its rules send it to, every row in the results database with each tier's figures."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Dict, List

import numpy as np
import onnxruntime as ort
import pytest
from waiting import wait_for

from cloud_worker.gateway import GATEWAY_GROUP, Forward, Gateway
from cloud_worker.worker import CloudWorker, WorkerConfig
from results_db.collector import Collector, CollectorConfig
from vibration.card import load_fault_card
from vibration.dataset import SplitSpec, make_windows
from vibration.offline import softmax_rows
from vibration.rules import TwoThresholdRule
from vibration.sensor import SensorAgent, SensorConfig, window_stream

MODELS = Path(__file__).resolve().parents[1] / "models" / "vibration"
N = 6  # windows per sensor


def _logits(tier: str, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(str(MODELS / f"{tier}.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"window": x})
    return np.asarray(logits)


def _argmax(tier: str, x: np.ndarray) -> List[int]:
    return [int(v) for v in _logits(tier, x).argmax(1)]


@pytest.mark.integration
def test_windows_take_the_tier_their_rules_send_them_to(broker, topics, tmp_path) -> None:
    windows = make_windows(SplitSpec("test", recordings=1, duration_s=0.5))
    pick = np.linspace(0, len(windows) - 1, N).round().astype(int)
    x, y = windows.x[pick], windows.y[pick]
    tag = uuid.uuid4().hex[:6]
    # (rule on the sensor, where it sends, the gateway's rule for it) -> the exit stage every window must take
    plans = {
        f"s-main-{tag}": ("none", "gateway", "none", "main"),
        f"s-gw-{tag}": ("all", "gateway", "none", "gateway"),
        f"s-3tier-{tag}": ("all", "gateway", "all", "cloud"),
        f"s-cloud-{tag}": ("all", "cloud", "none", "cloud"),
        f"s-tt-{tag}": ("all", "gateway", "two-threshold", "per rule"),  # the gateway's two thresholds
    }
    gw_device = f"gw-{tag}"
    cloud = CloudWorker(
        WorkerConfig(
            broker.credentials("cloud"), topics, MODELS, f"c-{tag}", max_wait_ms=1.0, load_interval_s=0
        )
    ).start()
    gateway_task = Gateway(
        MODELS,
        rule="hi",
        rules={device: plan[2] for device, plan in plans.items()},
        forward=Forward(broker.credentials(gw_device), topics, gw_device, deadline_s=5.0),
    )
    gateway = CloudWorker(
        WorkerConfig(
            broker.credentials("gateway"),
            topics,
            MODELS,
            f"g-{tag}",
            group=GATEWAY_GROUP,
            max_wait_ms=1.0,
            load_interval_s=0,
        ),
        task=gateway_task,
    ).start()
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, flush_ms=20, client_id=f"col-{tag}")
    ).start()
    runs: Dict[str, str] = {}
    try:
        for device, (rule, uplink, _, _) in plans.items():
            config = SensorConfig(
                device_id=device,
                broker=broker.credentials(device),
                topics=topics,
                model_dir=MODELS,
                state_dir=tmp_path / device,
                rule=rule,
                uplink=uplink,
                deadline_s=10.0,
                realtime=False,
            )
            with SensorAgent(config) as agent:
                summary = agent.run(window_stream(x, y))
                runs[device] = agent.run_id
            assert summary.windows == N and summary.fallbacks == 0, summary

        def rows() -> int:
            if not db.exists():
                return 0
            with sqlite3.connect(db) as con:
                return int(con.execute("SELECT count(*) FROM inferences").fetchone()[0])

        wait_for(lambda: rows() == N * len(plans), what="every window's row in the database")
    finally:
        collector.stop()
        gateway.stop()
        cloud.stop()
    expected = {"main": _argmax("sensor", x), "gateway": _argmax("gateway", x), "cloud": _argmax("cloud", x)}
    # the two-threshold rule at the gateway answers with its own decision, forwards the windows between
    rule = TwoThresholdRule(*load_fault_card(MODELS).two_thresholds("gateway"))
    decisions = [rule.decide(p) for p in softmax_rows(_logits("gateway", x))]
    tt_stages = ["cloud" if d.offload else "gateway" for d in decisions]
    tt_answers = [expected["cloud"][i] if d.offload else d.prediction for i, d in enumerate(decisions)]
    forwarded = sum(d.offload for d in decisions)
    assert gateway.stats["answered"] == 3 * N and cloud.stats["answered"] == 2 * N + forwarded
    with sqlite3.connect(db) as con:
        for device, (_, _, gateway_rule, stage) in plans.items():
            got = con.execute(
                "SELECT exit_stage, prediction, label, p_main, p_gateway, p_cloud, bytes_up, cloud_ms, "
                "device_j_analytic, gateway_ms, gateway_j, p_ext FROM inferences WHERE run_id = ? "
                "ORDER BY seq",
                (runs[device],),
            ).fetchall()
            stages = tt_stages if gateway_rule == "two-threshold" else [stage] * N
            answers = tt_answers if gateway_rule == "two-threshold" else expected[stage]
            assert [r[0] for r in got] == stages, device
            assert [r[1] for r in got] == answers, device  # the answer of the tier that decided
            assert [r[2] for r in got] == [int(v) for v in y]
            ran = plans[device][0] != "all"  # a sensor that sends everything up computes nothing
            assert all((r[3] is not None) == ran and (r[8] > 0) == ran for r in got)  # confidence, joules
            via_gateway = device.startswith(("s-gw", "s-3tier", "s-tt"))
            # the gateway's confidence, model time and joules in columns of their own (0009), p_ext unused
            assert all((r[4] is not None) == via_gateway for r in got), device
            assert all((r[9] is not None and r[9] > 0) == via_gateway for r in got), device
            assert all((r[10] is not None and r[10] > 0) == via_gateway for r in got), device
            assert all(r[11] is None for r in got), device
            assert all((r[5] is not None) == (r[0] == "cloud") for r in got), device
            assert all((r[6] > 2 * 2048 * 2) == (r[0] != "main") for r in got), device  # int16 window sent
            assert all((r[7] is not None) == (r[0] == "cloud") for r in got), device  # the cloud's alone


def test_sensor_refuses_a_window_of_the_wrong_shape_or_dtype(tmp_path, broker, topics) -> None:
    device = f"s-bad-{uuid.uuid4().hex[:6]}"
    config = SensorConfig(
        device_id=device,
        broker=broker.credentials(device),
        topics=topics,
        model_dir=MODELS,
        state_dir=tmp_path,
        rule="none",
        realtime=False,
        close_timeout_s=0.5,  # no collector here: the records stay in the outbox
    )
    with SensorAgent(config) as agent:
        good = np.zeros((2, 2048), dtype=np.int16)
        assert agent.check(good) is None
        assert "int16 [2, 2048]" in (agent.check(good.astype(np.float32)) or "")
        assert agent.check(np.zeros((1, 28, 28), dtype=np.uint8)) is not None
        summary = agent.run([(good.astype(np.float64), 0), (good, 0), (good[:1], 1)])
    assert summary.windows == 1 and summary.rejected == 2


def test_config_errors_are_clear() -> None:
    from protocol.mqtt import BrokerAddress

    address = BrokerAddress("localhost", 1883, "s1", "pw")
    with pytest.raises(ValueError, match="rule must be one of"):
        SensorConfig("s1", address, rule="sometimes")
    with pytest.raises(ValueError, match="uplink must be one of"):
        SensorConfig("s1", address, uplink="fog")
    with pytest.raises(ValueError, match="deadline_s"):
        SensorConfig("s1", address, deadline_s=0)


def test_the_gateway_answers_with_its_rules_decision_and_reports_its_own_cost() -> None:
    """A window the gateway decides gets its rule's answer: the two-threshold rule's "fault" is the
    likeliest fault class even where "healthy" is the likeliest class (thresholds 0, 0: "fault" always)."""
    from cloud_worker.tasks import Served
    from metering.analytic import AnalyticModel
    from protocol.codec import OffloadRequest, decode_reply

    windows = make_windows(SplitSpec("test", recordings=1, duration_s=0.5))
    x = windows.x[windows.y == 0][:4]  # healthy windows
    gateway = Gateway(MODELS, rule="two-threshold")
    gateway.default_rule = TwoThresholdRule(0.0, 0.0)
    requests = [OffloadRequest("run-x", "dev-x", i, w) for i, w in enumerate(x)]
    answers = gateway.run_jobs(requests)
    assert all(a.tier == "gateway" and a.prediction != 0 for a in answers)
    assert [int(np.argmax(a.logits)) for a in answers] == [0] * len(x)  # what argmax would have said
    card = load_fault_card(MODELS)
    assert all(a.gateway_ms > 0 and a.gateway_j == AnalyticModel.for_card(card.raw).block_j("gateway")
               for a in answers)  # fmt: skip
    reply = decode_reply(gateway.reply(requests[0], answers, 0, Served(9.0, "g", None, "none")))
    assert reply.prediction == answers[0].prediction != 0
    assert (
        reply.extra["gateway_ms"] > 0 and reply.extra["tier"] == "gateway" and "cloud_ms" not in reply.extra
    )
    gateway.close()
