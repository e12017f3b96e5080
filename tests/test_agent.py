"""The device agent end to end: real Mosquitto, real cloud worker, real onnxruntime on the tiny models."""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from tinymodels import tiny_images

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.model import CloudSession
from device_agent import AgentConfig, DeviceAgent
from device_agent.card import load_card
from device_agent.cascade import EdgeCascade
from device_agent.outbox import Outbox
from device_agent.policies import Action, Decision, EdgeView, Policy, register_policy
from device_agent.rule import softmax
from protocol import (
    CONTENT_TYPE_OFFLOAD,
    InferenceRecord,
    OffloadReply,
    decode_offload,
    decode_records,
    encode_reply,
)
from protocol.mqtt import BrokerAddress, new_client, publish_properties
from protocol.status import decode_status
from protocol.topics import Topics
from results_db import Collector, CollectorConfig

pytestmark = pytest.mark.integration


class Tap:
    """Subscribes as the collector to one device's results and status, decoding record batches."""

    def __init__(self, address: BrokerAddress, topics: Topics, device_id: str) -> None:
        self.records: List[Dict[str, Any]] = []
        self.status: List[bytes] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = new_client(address, f"tap-{uuid.uuid4().hex[:8]}")
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.message_callback_add(topics.results(device_id), self._on_results)
        self.client.message_callback_add(topics.status(device_id), self._on_status)
        self.client.on_connect = lambda c, *a: c.subscribe(
            [(topics.results(device_id), 1), (topics.status(device_id), 1)]
        )
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert subscribed.wait(5), "tap not subscribed"

    def _on_results(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        with self._lock:
            self.records.extend(decode_records(message.payload))

    def _on_status(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.status.append(message.payload)

    def of_type(self, kind: str) -> List[Dict[str, Any]]:
        with self._lock:
            return [r for r in self.records if r["type"] == kind]

    def wait_for(self, predicate: Callable[[], bool], timeout: float = 10.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if predicate():
                return True
            time.sleep(0.02)
        return predicate()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def shared_topics() -> Topics:
    return Topics.namespaced(f"ag{uuid.uuid4().hex[:8]}")


@pytest.fixture(scope="module")
def cloud(broker: BrokerProcess, shared_topics: Topics, tiny_models: Path) -> Iterator[CloudWorker]:
    worker = CloudWorker(
        WorkerConfig(broker.credentials("cloud"), shared_topics, tiny_models / "cloud.onnx", "agent-tests")
    )
    worker.start()
    yield worker
    worker.stop()


def make_config(broker: BrokerProcess, topics: Topics, models: Path, state: Path, **kw: Any) -> AgentConfig:
    device_id = kw.pop("device_id", f"dev-{uuid.uuid4().hex[:8]}")
    defaults: Dict[str, Any] = dict(
        device_id=device_id,
        broker=broker.credentials(device_id),
        topics=topics,
        model_dir=models,
        state_dir=state,
        meters=["estimate"],
        idle_seconds=0.0,
        window_size=8,
        flush_s=0.05,
        connect_timeout_s=5.0,
        results_receipts=False,  # the Tap is no collector: records leave the outbox on the broker's PUBACK
        # These tests check what each policy decides; whether the cloud can take it (the worker here
        # publishes its load) is tests/test_capacity.py's, and the slow start would shed the first offloads.
        capacity_aware=False,
    )
    defaults.update(kw)
    return AgentConfig(**defaults)


def samples(n: int, seed: int = 0) -> List[Any]:
    return [(image, i % 10) for i, image in enumerate(tiny_images(n, seed))]


def test_round_trip(broker, cloud, shared_topics, tiny_models, tmp_path) -> None:
    config = make_config(broker, shared_topics, tiny_models, tmp_path, policy={"name": "cloud-only"})
    tap = Tap(broker.credentials("collector"), shared_topics, config.device_id)
    image = tiny_images(1, seed=7)[0]
    with DeviceAgent(config) as agent:
        record = agent.submit(image, label=3).result(10)
        assert tap.wait_for(lambda: any(decode_status(s).state == "online" for s in tap.status))
    expected = softmax(CloudSession(tiny_models / "cloud.onnx").logits(image[None]))[0]
    assert record.exit_stage == "cloud" and record.prediction == int(expected.argmax())
    assert record.p_cloud == pytest.approx(float(expected.max()), rel=1e-5)
    assert record.label == 3 and record.seq == 0 and record.p_main is None  # cloud-only runs nothing here
    assert record.bytes_up > 784 and record.bytes_down > 10 * 4
    assert record.cloud_ms is not None and record.cloud_ms > 0
    assert record.network_ms is not None and record.network_ms >= 0
    assert record.energy_source == "estimate" and record.device_j_gross is not None
    assert record.device_j_analytic == 0.0  # no block ran on the device
    assert tap.wait_for(lambda: tap.of_type("run_end"))
    assert [InferenceRecord.from_record(r) for r in tap.of_type("inference")] == [record]
    [run] = tap.of_type("run")
    assert run["policy"] == "cloud-only" and run["run_id"] == record.run_id
    assert tap.of_type("energy_window")[0]["samples"] == 1
    assert tap.wait_for(lambda: decode_status(tap.status[-1]).state == "offline")  # said on a clean close
    tap.close()


@pytest.mark.parametrize(
    "policy", ["edge-only", "cloud-only", "meanet", "hi-threshold", "hi-online", "entropy"]
)
def test_every_policy_end_to_end(policy, broker, cloud, shared_topics, tiny_models, tmp_path) -> None:
    n = 32
    config = make_config(broker, shared_topics, tiny_models, tmp_path, policy={"name": policy, "params": {}})
    tap = Tap(broker.credentials("collector"), shared_topics, config.device_id)
    data = samples(n, seed=1)
    with DeviceAgent(config) as agent:
        summary = agent.run_dataset(data)
    assert summary.samples == n and summary.failed == 0 and summary.fallbacks == 0
    assert tap.wait_for(lambda: len(tap.of_type("inference")) >= n and tap.of_type("run_end"))
    by_seq = {r["seq"]: r for r in tap.of_type("inference")}
    assert sorted(by_seq) == list(range(n)) and len(tap.of_type("inference")) == n
    assert tap.of_type("run_end")[0]["samples"] == n

    card = load_card(tiny_models)
    cascade = EdgeCascade(tiny_models)
    cloud_model = CloudSession(tiny_models / "cloud.onnx")
    images = np.stack([image for image, _ in data])
    decisions = cascade.decide(images)
    main_probs = cascade.run_main(images).probs
    cloud_pred = cloud_model.logits(images).argmax(axis=1)
    stages = [by_seq[i]["exit_stage"] for i in range(n)]
    for i in range(n):
        r = by_seq[i]
        if r["exit_stage"] == "cloud":
            assert r["prediction"] == cloud_pred[i]
        elif policy in ("edge-only", "meanet"):
            assert (r["prediction"], r["exit_stage"]) == (decisions[i].prediction, decisions[i].exit_stage)
        else:
            assert r["prediction"] == main_probs[i].argmax() and r["exit_stage"] == "main"
    offloaded = [s == "cloud" for s in stages]
    if policy == "edge-only":
        assert not any(offloaded)
    elif policy == "cloud-only":
        assert all(offloaded)
    elif policy == "meanet":
        assert offloaded == [d.complex for d in decisions]
    elif policy == "hi-threshold":
        assert offloaded == [float(p.max()) < card.hi_theta for p in main_probs]
    elif policy == "entropy":
        eta = -(main_probs * np.log(main_probs)).sum(axis=1) / np.log(card.num_classes)
        assert offloaded == [e > card.entropy_tau for e in eta]
    elif policy == "hi-online":
        report = summary.policy_report
        assert report["decisions"] == n and report["scored"] == n
        assert report["offload_fraction"] == pytest.approx(sum(offloaded) / n)
        assert tap.of_type("run_end")[0]["policy_report"]["regret"] == pytest.approx(report["regret"])
    if policy not in ("edge-only", "cloud-only"):
        assert 0 < sum(offloaded) < n  # the tiny card is calibrated to offload about a quarter
    tap.close()


_CUSTOM_POLICY = "test-always-exit-after-the-cascade"


@register_policy(_CUSTOM_POLICY)
class AlwaysExitAfterTheCascade(Policy):
    """A policy outside the built-ins: the full edge cascade, then never offload."""

    edge = "cascade"

    def __init__(self, card: Any = None) -> None:
        self.card = card

    def decide(self, view: EdgeView) -> Decision:
        return Decision(Action.EXIT)


def test_a_registered_policy_runs_on_the_cascade(broker, cloud, shared_topics, tiny_models, tmp_path) -> None:
    config = make_config(broker, shared_topics, tiny_models, tmp_path, policy={"name": _CUSTOM_POLICY})
    data = samples(24, seed=2)
    with DeviceAgent(config) as agent:
        records = [agent.submit(image, label).result(10) for image, label in data]
    decisions = EdgeCascade(tiny_models).decide(np.stack([image for image, _ in data]))
    # the same answers as the cascade's own rule, which runs the extension on the same samples
    assert [(r.prediction, r.exit_stage) for r in records] == [
        (d.prediction, d.exit_stage) for d in decisions
    ]
    ext = [r for r in records if r.exit_stage == "extension"]
    main = [r for r in records if r.exit_stage == "main"]
    assert ext and main and all(r.p_ext is not None for r in ext)
    assert min(r.device_j_analytic for r in ext) > max(r.device_j_analytic for r in main)


class SlowResponder:
    """A stand-in cloud that answers each offload after `delay_s` (no real worker is that slow on demand)."""

    def __init__(self, address: BrokerAddress, topics: Topics, delay_s: float) -> None:
        self.answered = 0
        self.client = new_client(address, f"slow-{uuid.uuid4().hex[:6]}")
        ready = threading.Event()
        self.client.on_subscribe = lambda *a: ready.set()
        self.client.on_connect = lambda c, *a: c.subscribe(topics.all_offloads, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert ready.wait(5)
        self.delay_s = delay_s

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        assert message.properties.ContentType == CONTENT_TYPE_OFFLOAD
        request = decode_offload(message.payload)
        reply = OffloadReply(
            request.run_id, request.device_id, request.seq, 1, np.eye(10, dtype=np.float32)[1], 0.1, "slow"
        )
        props = publish_properties(correlation_data=message.properties.CorrelationData)
        topic = message.properties.ResponseTopic

        def answer() -> None:
            client.publish(topic, encode_reply(reply), qos=1, properties=props)
            self.answered += 1

        threading.Timer(self.delay_s, answer).start()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_deadline_gives_a_flagged_fallback_and_late_replies_are_only_counted(
    broker, topics, tiny_models, tmp_path
) -> None:
    slow = SlowResponder(broker.credentials("cloud"), topics, delay_s=0.6)
    config = make_config(
        broker,
        topics,
        tiny_models,
        tmp_path,
        policy={"name": "cloud-only", "params": {"edge": "main"}},  # main block runs: a fallback answer
        offload_deadline_s=0.3,
    )
    data = samples(6, seed=3)
    with DeviceAgent(config) as agent:
        records = [f.result(10) for f in [agent.submit(image, label) for image, label in data]]
        deadline = time.monotonic() + 5
        while agent.offloads.stats["late_replies"] < 6 and time.monotonic() < deadline:
            time.sleep(0.02)
        stats = dict(agent.offloads.stats)
    main_pred = EdgeCascade(tiny_models).run_main(np.stack([i for i, _ in data])).probs.argmax(axis=1)
    assert [r.exit_stage for r in records] == ["fallback"] * 6
    assert [r.prediction for r in records] == list(main_pred)  # the edge answer, not the late cloud one
    assert all(r.cloud_ms is None and r.network_ms is None and r.bytes_up > 0 for r in records)
    assert stats["fallbacks"] == 6 and stats["late_replies"] == 6 and stats["answered"] == 0
    slow.close()


def test_broker_killed_and_restarted_mid_stream(tiny_models, tmp_path) -> None:
    """Every sample ends with a cloud answer or a flagged fallback, none is recorded twice, the outbox
    drains."""
    topics = Topics.namespaced("kill")
    own = BrokerProcess(tmp_path / "broker")  # our own: killing the session broker would hurt other tests
    own.start()
    worker = CloudWorker(WorkerConfig(own.credentials("cloud"), topics, tiny_models / "cloud.onnx", "k1"))
    worker.start()
    config = make_config(
        own,
        topics,
        tiny_models,
        tmp_path / "state",
        policy={"name": "cloud-only", "params": {"edge": "main"}},
        offload_deadline_s=5.0,
    )
    tap = Tap(own.credentials("collector"), topics, config.device_id)
    n = 150
    data = samples(n, seed=4)
    killed = threading.Event()

    def paced() -> Iterator[Any]:  # a camera at ~100 frames/s, so the outage falls mid-stream
        for i, sample in enumerate(data):
            if i == 40:
                own.kill()
                killed.set()
            time.sleep(0.01)
            yield sample

    agent = DeviceAgent(config).start()
    result: Dict[str, Any] = {}
    runner = threading.Thread(target=lambda: result.setdefault("summary", agent.run_dataset(paced())))
    runner.start()
    assert killed.wait(10)
    before = tap
    before.close()
    time.sleep(1.5)
    own.start()  # same port, same persistence directory
    tap = Tap(own.credentials("collector"), topics, config.device_id)  # before the agent's next retry
    runner.join(30)
    summary = result["summary"]
    assert summary.samples == n and summary.failed == 0
    assert set(summary.exits) <= {"cloud", "fallback"} and summary.exits.get("cloud", 0) > 40
    assert agent.link.stats["disconnects"] >= 1 and agent.link.stats["connects"] >= 2
    # offloads decided while the broker was away waited in the outbox and went out when it came back
    assert agent.offloads.stats["sent_on_reconnect"] > 0
    final = agent.close()
    assert final.outbox_left == {"record": 0, "offload": 0}
    # what the results subscriber saw before the kill and after the restart
    seen = lambda: before.of_type("inference") + tap.of_type("inference")  # noqa: E731
    assert tap.wait_for(lambda: len({r["seq"] for r in seen()}) == n, timeout=15)
    copies: Dict[int, List[Dict[str, Any]]] = {}
    for r in seen():
        copies.setdefault(r["seq"], []).append(r)
    # at-least-once transport may repeat a batch, but a sample never gets two different records
    assert all(all(c == rs[0] for c in rs) for rs in copies.values())
    assert sorted(copies) == list(range(n))
    assert {r["exit_stage"] for rs in copies.values() for r in rs} <= {"cloud", "fallback"}
    box = Outbox(config.state_dir / f"outbox-{config.device_id}.sqlite")
    assert box.counts() == {"record": 0, "offload": 0}
    tap.close()
    worker.stop()
    own.close()


def test_records_stay_in_the_outbox_until_the_collector_has_stored_them(
    broker, tiny_models, tmp_path, caplog
) -> None:
    """A broker that acknowledges a batch and then drops it (here: nobody subscribed yet, as after a broker
    crash that lost the collector's session) loses nothing: without a receipt the agent sends it again."""
    topics = Topics.namespaced(f"rc{uuid.uuid4().hex[:8]}")
    caplog.set_level(logging.ERROR, logger="device_agent.link")
    config = make_config(
        broker,
        topics,
        tiny_models,
        tmp_path / "state",
        policy={"name": "edge-only"},
        results_receipts=True,
        receipt_timeout_s=0.5,
        close_timeout_s=30.0,
    )
    n = 60
    agent = DeviceAgent(config).start()
    agent.run_dataset(samples(n, seed=7))
    link = agent.link
    assert link.wait_connected(5)
    deadline = time.monotonic() + 10
    while link.stats["resent_batches"] == 0 and time.monotonic() < deadline:
        time.sleep(0.05)
    # PUBACKed by the broker, sent again for want of a receipt, and still kept
    assert link.stats["resent_batches"] >= 1
    assert link.stats["records_sent"] == 0 and agent.outbox.counts()["record"] >= n
    assert any("no receipt has ever come back" in r.getMessage() for r in caplog.records)
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    try:
        final = agent.close()  # drains: returns once every batch has its receipt
    finally:
        collector.stop()
    assert final.outbox_left == {"record": 0, "offload": 0}
    assert collector.stats["receipts"] >= 1 and link.stats["records_sent"] >= n
    with sqlite3.connect(db) as raw:
        seqs = [row[0] for row in raw.execute("SELECT seq FROM inferences WHERE run_id = ?", (agent.run_id,))]
    assert sorted(seqs) == list(range(n))


def test_offloads_left_by_a_crashed_process_become_fallback_records(broker, topics, tiny_models, tmp_path):
    config = make_config(broker, topics, tiny_models, tmp_path, policy={"name": "edge-only"})
    box = Outbox(tmp_path / f"outbox-{config.device_id}.sqlite")
    left = InferenceRecord("old-run", config.device_id, 17, 4, "fallback", 1.5, label=4, p_main=0.4)
    box.put(
        f"offload/old-run/{config.device_id}/17",
        "offload",
        topics.offload(config.device_id),
        b"image bytes",
        meta=left.to_record(),
        deadline_unix=0.0,
    )
    box.close()
    tap = Tap(broker.credentials("collector"), topics, config.device_id)
    with DeviceAgent(config) as agent:
        agent.submit(tiny_images(1)[0]).result(10)
    assert tap.wait_for(lambda: len(tap.of_type("inference")) == 2)
    [old] = [r for r in tap.of_type("inference") if r["run_id"] == "old-run"]
    assert InferenceRecord.from_record(old) == left
    tap.close()


def test_bad_input_is_refused_counted_and_the_agent_goes_on(
    broker, cloud, shared_topics, tiny_models, tmp_path
):
    config = make_config(broker, shared_topics, tiny_models, tmp_path, policy={"name": "edge-only"})
    with DeviceAgent(config) as agent:
        wrong_shape = agent.submit(np.zeros((3, 28, 28), dtype=np.uint8))
        wrong_dtype = agent.submit(np.zeros((1, 28, 28), dtype=np.float32))
        good = agent.submit(tiny_images(1)[0])
        with pytest.raises(ValueError, match="must be uint8"):
            wrong_shape.result(1)
        with pytest.raises(ValueError, match="must be uint8"):
            wrong_dtype.result(1)
        assert good.result(10).seq == 0  # refused inputs take no sequence number
        assert agent.stats["bad_inputs"] == 2


def test_watch_mode_runs_files_dropped_into_a_directory(broker, cloud, shared_topics, tiny_models, tmp_path):
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    config = make_config(broker, shared_topics, tiny_models, tmp_path / "state", policy={"name": "meanet"})
    images = tiny_images(3, seed=9)
    stop = threading.Event()
    with DeviceAgent(config) as agent:
        result: Dict[str, Any] = {}
        runner = threading.Thread(
            target=lambda: result.setdefault("s", agent.watch(inbox, stop, poll_s=0.02))
        )
        runner.start()
        for i, image in enumerate(images):
            (inbox / f"frame{i}_label{i}.pgm").write_bytes(b"P5 28 28 255\n" + image.tobytes())
        (inbox / "junk.png").write_bytes(b"not a png")
        deadline = time.monotonic() + 10
        while agent.settlement.records < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        stop.set()
        runner.join(10)
    summary = result["s"]
    assert summary.samples == 3 and summary.labelled == 3 and summary.skipped_files == 1
    decisions = EdgeCascade(tiny_models).decide(images)
    assert sum(1 for d in decisions if d.complex) == summary.exits.get("cloud", 0)


def test_run_dataset_counts_bad_samples_and_raises_what_its_source_raises(
    broker, cloud, shared_topics, tiny_models, tmp_path
):
    config = make_config(broker, shared_topics, tiny_models, tmp_path, policy={"name": "edge-only"})
    good = samples(5, seed=11)
    mixed = good[:2] + [(np.zeros((28, 28), dtype=np.uint8), 1)] + good[2:]

    def broken():
        yield good[0]
        raise OSError("camera unplugged")

    with DeviceAgent(config) as agent:
        summary = agent.run_dataset(mixed)
        assert (summary.samples, summary.rejected_inputs, agent.stats["bad_inputs"]) == (5, 1, 1)
        with pytest.raises(OSError, match="camera unplugged"):
            agent.run_dataset(broken())
        after = agent.run_dataset(good)  # and it goes on
    assert after.samples == 5 and after.labelled == 5
    assert agent.settlement.records == 11  # 5 + the one before the source broke + 5


@pytest.mark.integration
def test_a_model_that_cannot_be_swapped_in_is_logged_counted_and_the_old_one_keeps_answering(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from agents import quick_agent_config

    class Broken:  # what a rollout could hand over half-made: no card
        version = "broken-1"

    config = quick_agent_config(
        broker, topics, tiny_models, tmp_path / "state", policy={"name": "edge-only"}, results_receipts=False
    )
    images = tiny_images(20, seed=41)
    expected = [d.prediction for d in EdgeCascade(tiny_models).decide(images, gated=False)]
    with DeviceAgent(config) as agent, caplog.at_level(logging.ERROR, logger="device_agent.inference"):
        served = agent.model_version
        agent.loop.offer(Broken())
        futures = [agent.submit(image) for image in images]
        answers = [f.result(timeout=10) for f in futures]
        assert agent.stats["swap_failed"] == 1 and agent.model_version == served
    assert [a.prediction for a in answers] == expected  # every sample, by the model it had
    assert any("could not swap in model broken-1" in r.getMessage() for r in caplog.records)
