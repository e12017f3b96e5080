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
from vibration.dataset import SplitSpec, make_windows
from vibration.sensor import SensorAgent, SensorConfig, window_stream

MODELS = Path(__file__).resolve().parents[1] / "models" / "vibration"
N = 6  # windows per sensor


def _argmax(tier: str, x: np.ndarray) -> List[int]:
    session = ort.InferenceSession(str(MODELS / f"{tier}.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"window": x})
    return [int(v) for v in logits.argmax(1)]


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
    assert gateway.stats["answered"] == 2 * N and cloud.stats["answered"] == 2 * N
    expected = {"main": _argmax("sensor", x), "gateway": _argmax("gateway", x), "cloud": _argmax("cloud", x)}
    with sqlite3.connect(db) as con:
        for device, (_, _, _, stage) in plans.items():
            got = con.execute(
                "SELECT exit_stage, prediction, label, p_main, p_ext, p_cloud, bytes_up, cloud_ms, "
                "device_j_analytic FROM inferences WHERE run_id = ? ORDER BY seq",
                (runs[device],),
            ).fetchall()
            assert [r[0] for r in got] == [stage] * N, device
            assert [r[1] for r in got] == expected[stage], device  # the answer of the tier that decided
            assert [r[2] for r in got] == [int(v) for v in y]
            ran = plans[device][0] != "all"  # a sensor that sends everything up computes nothing
            assert all((r[3] is not None) == ran and (r[8] > 0) == ran for r in got)  # confidence, joules
            via_gateway = device.startswith(("s-gw", "s-3tier"))
            assert all((r[4] is not None) == via_gateway for r in got), device  # the gateway's confidence
            assert all((r[5] is not None) == (stage == "cloud") for r in got), device
            assert all((r[6] > 2 * 2048 * 2) == (stage != "main") for r in got), device  # int16 window sent
            assert all((r[7] is not None) == (stage != "main") for r in got), device


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
