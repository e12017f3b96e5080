"""The cloud worker against a real Mosquitto and onnxruntime on the tiny cloud model."""

from __future__ import annotations

import threading
import time
import types
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Iterator, List

import numpy as np
import onnxruntime as ort
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tinymodels import tiny_images

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.batching import BatchQueue
from cloud_worker.load import LoadMeter
from cloud_worker.probe import OffloadProbe
from protocol.codec import (
    CONTENT_TYPE_OFFLOAD,
    OffloadRequest,
    decode_reply,
    encode_offload,
)
from protocol.mqtt import new_client, publish_properties
from protocol.topics import Topics


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.005)
    return condition()


def expected_answers(model_dir: Path, images: np.ndarray) -> np.ndarray:
    """onnxruntime's own logits of the tiny cloud model: what every reply must say."""
    session = ort.InferenceSession(str(model_dir / "cloud.onnx"), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"image": images})
    return logits


# -- micro-batching rule (no broker) -----------------------------------------------------------------------
def test_lone_request_on_idle_queue_runs_at_once() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch=8, max_wait_s=3600)
    assert queue.wait_s(now=0.0) is None
    queue.put(1, now=10.0)
    assert queue.wait_s(now=10.0) == 0  # idle worker: no waiting for company
    assert [p.item for p in queue.take()] == [1] and len(queue) == 0


def test_several_pending_wait_from_the_oldest_arrival_at_most_max_wait() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch=8, max_wait_s=0.002)
    queue.note_compute(0.004, 4)  # 1 ms a sample: busy, batching pays
    for i in range(3):  # dense arrivals: 0.1 ms apart
        queue.put(i, now=1.0 + i * 0.0001)
    assert queue.wait_s(now=1.0002) == pytest.approx(0.0018)  # 2 ms after the oldest, not the newest
    assert queue.wait_s(now=1.0021) == 0
    assert [p.item for p in queue.take()] == [0, 1, 2]


def test_no_waiting_when_the_worker_keeps_up_or_nobody_would_come_in_time() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch=8, max_wait_s=0.002)
    for i in range(10):  # a steady 500/s: 2 ms apart, each served alone in 0.1 ms
        queue.put(i, now=i * 0.002)
        assert queue.wait_s(now=i * 0.002) == 0
        queue.take()
        queue.note_compute(0.0001, 1)
    queue.put(10, now=0.0200)
    queue.put(11, now=0.0201)  # a small burst, but the worker is idle 95 % of the time: no point waiting
    assert queue.wait_s(now=0.0201) == 0
    queue.take()
    slow: BatchQueue[int] = BatchQueue(max_batch=8, max_wait_s=0.002)
    slow.note_compute(0.01, 1)  # busy worker, but arrivals 5 ms apart: the next would come too late
    for i in range(5):
        slow.put(i, now=i * 0.005)
    assert slow.wait_s(now=0.0201) == 0


def test_full_batch_runs_at_once_and_bursts_split_in_arrival_order() -> None:
    queue: BatchQueue[int] = BatchQueue(max_batch=3, max_wait_s=3600)
    for i in range(7):
        queue.put(i, now=5.0)
    batches = []
    while queue.wait_s(now=5.0) == 0 and len(queue) >= 3:
        batches.append([p.item for p in queue.take()])
    assert batches == [[0, 1, 2], [3, 4, 5]]
    assert queue.wait_s(now=5.0) == 0  # the last one is alone now: idle rule
    assert [p.item for p in queue.take()] == [6]


def test_a_batch_cut_short_by_its_limit_runs_at_once_and_takes_no_more() -> None:
    """The worker limits a batch to what fits in a share of its requests' deadlines (`BATCH_SHARE`)."""
    queue: BatchQueue[int] = BatchQueue(max_batch=8, max_wait_s=3600)
    for i in range(3):
        queue.put(i, now=5.0, key=f"d{i % 2}")
    assert queue.wait_s(now=5.0) == 3600  # below max_batch: would collect more
    assert queue.wait_s(now=5.0, limit=2) == 0  # ... but the limit is reached
    assert queue.heads() == [0, 1]  # each device's oldest
    assert [p.item for p in queue.take(limit=2)] == [0, 1]
    assert [p.item for p in queue.take(limit=0)] == [2]  # never less than one


def test_a_slow_worker_keeps_each_batch_within_a_share_of_the_deadlines_it_serves(
    broker: BrokerProcess, topics: Topics, tiny_models: Path
) -> None:
    """Every request of a batch is answered when the whole batch is done: at 60 ms a sample (the fleet
    simulation's quota) a full batch of 8 is half a second of waiting no refusal foresaw."""
    worker = CloudWorker(
        WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "w-slow", max_batch=8)
    )
    now = time.monotonic()
    assert worker._batch_limit(now) == 8  # nothing queued
    worker._load = LoadMeter()
    worker._load.seed(0.060, 1)
    for i, left_s in enumerate((2.0, 1.5, 2.0)):
        worker._queue.put(types.SimpleNamespace(deadline=now + left_s), now, key=f"d{i}")
    assert worker._batch_limit(now) == 2  # 0.1 x 1.5 s (the most urgent) / 60 ms
    worker._load = LoadMeter()
    worker._load.seed(0.0001, 1)  # a fast worker: max_batch binds
    assert worker._batch_limit(now) == 8


def test_batch_queue_refuses_nonsense_limits() -> None:
    with pytest.raises(ValueError):
        BatchQueue(max_batch=0, max_wait_s=0)
    with pytest.raises(ValueError):
        BatchQueue(max_batch=1, max_wait_s=-1)


# -- against the broker ------------------------------------------------------------------------------------


@pytest.fixture
def start_worker(
    broker: BrokerProcess, topics: Topics, tiny_models: Path
) -> Iterator[Callable[..., CloudWorker]]:
    workers: List[CloudWorker] = []

    def start(worker_id: str = "w1", **overrides: Any) -> CloudWorker:
        config = WorkerConfig(broker.credentials("cloud"), topics, tiny_models, worker_id, **overrides)
        worker = CloudWorker(config).start()
        workers.append(worker)
        return worker

    yield start
    for w in workers:
        w.stop(drain_s=0.5)


@pytest.fixture
def probe(broker: BrokerProcess, topics: Topics, device_id: str) -> Iterator[OffloadProbe]:
    """A requester logged in as a test device: it may publish only its own offload and read its own reply."""
    with OffloadProbe(broker.credentials(device_id), topics, device_id) as p:
        yield p


@pytest.mark.integration
def test_round_trip_answers_with_the_cloud_models_prediction(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe, tiny_models: Path
) -> None:
    worker = start_worker("w-rt")
    images = tiny_images(20, seed=5)
    futures = [probe.request(images[i], seq=i) for i in range(20)]
    answers = [f.result(timeout=10) for f in futures]
    expected = expected_answers(tiny_models, images)
    for i, answer in enumerate(answers):
        reply = answer.reply
        assert answer.correlation == f"{probe.run_id}:{i}".encode()
        assert (reply.run_id, reply.device_id, reply.seq) == (probe.run_id, probe.device_id, i)
        assert reply.prediction == int(expected[i].argmax())
        np.testing.assert_allclose(reply.logits, expected[i], rtol=1e-4, atol=1e-5)
        assert reply.worker_id == "w-rt" and reply.cloud_ms > 0 and 1 <= reply.extra["batch"] <= 32
        assert reply.cloud_j is None and reply.energy_source == "none"  # no meters configured
    stats = worker.stats
    assert stats["received"] == stats["answered"] == 20 and stats["rejected"] == stats["expired"] == 0


@pytest.mark.integration
def test_thousand_concurrent_offloads_each_matched_by_correlation(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe, tiny_models: Path
) -> None:
    worker = start_worker("w-1000", max_batch=32, max_wait_ms=2.0)
    images = tiny_images(1000, seed=9)
    expected = expected_answers(tiny_models, images).argmax(axis=1)
    # Correlation data deliberately unrelated to seq, so only CorrelationData can pair them up.
    correlations = [f"c-{(i * 7919) % 1000:04d}".encode() for i in range(1000)]
    futures = [probe.request(images[i], seq=i, correlation=correlations[i]) for i in range(1000)]
    answers = [f.result(timeout=30) for f in futures]
    assert [a.correlation for a in answers] == correlations
    assert [a.reply.seq for a in answers] == list(range(1000))
    assert [a.reply.prediction for a in answers] == expected.tolist()
    assert probe.unmatched_replies == 0 and probe.bad_replies == 0
    stats = worker.stats
    assert stats["answered"] == 1000 and stats["batches"] < 1000  # requests that queued up were batched
    assert max(a.reply.extra["batch"] for a in answers) > 1


def _bad_payloads() -> st.SearchStrategy:
    image = tiny_images(1)[0]
    valid = encode_offload(OffloadRequest("r", "DEV", 1, image))
    return st.one_of(
        st.binary(max_size=3000),
        st.integers(0, len(valid) - 1).map(lambda n: valid[:n]),  # truncated
        st.binary(min_size=1, max_size=50).map(lambda extra: valid + extra),  # trailing bytes
        st.integers(2, 255).map(lambda v: valid[:2] + bytes([v]) + valid[3:]),  # wrong version
        st.sampled_from([1, 999, 70_000, 1 << 20, 3 << 20]).map(lambda n: valid + b"\x00" * n),  # oversized
        st.sampled_from(
            [
                encode_offload(OffloadRequest("r", "DEV", 1, np.zeros((1, 28, 29), np.uint8))),  # wrong shape
                encode_offload(OffloadRequest("r", "DEV", 1, np.zeros((3, 28, 28), np.uint8))),
                encode_offload(OffloadRequest("r", "DEV", 1, np.zeros((1, 28, 28), np.float32))),  # dtype
                encode_offload(OffloadRequest("r", "DEV", 1, np.zeros((2, 1, 28, 28), np.uint8))),
                encode_offload(OffloadRequest("r", "someone-else", 1, image)),  # header != topic device
            ]
        ),
    )


@pytest.mark.integration
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    payloads=st.lists(_bad_payloads(), min_size=1, max_size=8), props_kind=st.sampled_from(["full", "bare"])
)
def test_bad_offloads_are_rejected_counted_and_the_worker_keeps_serving(
    broker: BrokerProcess,
    tiny_models: Path,
    payloads: List[bytes],
    props_kind: str,
) -> None:
    worker, probe = _shared_worker_and_probe(broker, tiny_models)
    before = worker.stats
    dev = probe.device_id
    for payload in payloads:
        props = (
            publish_properties(
                content_type=CONTENT_TYPE_OFFLOAD, response_topic=probe.reply_topic, correlation_data=b"bad"
            )
            if props_kind == "full"
            else publish_properties(content_type=CONTENT_TYPE_OFFLOAD)  # nowhere to answer
        )
        probe.client.publish(probe.topics.offload(dev), payload, qos=1, properties=props).wait_for_publish(5)
    # "received" is counted before a message is parsed, "rejected" after: wait for both to settle.
    assert wait_until(
        lambda: (
            worker.stats["received"] == before["received"] + len(payloads)
            and worker.stats["rejected"] >= before["rejected"] + len(payloads)
        )
    )
    after = worker.stats
    assert after["rejected"] - before["rejected"] == len(payloads)
    assert after["answered"] == before["answered"]
    answer = probe.request(tiny_images(1, seed=3)[0]).result(timeout=10)  # still serving
    assert answer.reply.worker_id == "w-fuzz"


_SHARED: dict = {}


def _shared_worker_and_probe(broker: BrokerProcess, tiny_models: Path) -> Any:
    """One worker and requester for all hypothesis examples (starting one per example would be slow)."""
    if "worker" not in _SHARED:
        topics = Topics.namespaced("fuzz")
        worker = CloudWorker(WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "w-fuzz")).start()
        probe = OffloadProbe(broker.credentials("dev-fuzz"), topics, "dev-fuzz").start()
        _SHARED.update(worker=worker, probe=probe)
    return _SHARED["worker"], _SHARED["probe"]


@pytest.fixture(scope="module", autouse=True)
def _stop_shared() -> Iterator[None]:
    yield
    if "worker" in _SHARED:
        _SHARED.pop("probe").close()
        _SHARED.pop("worker").stop(drain_s=0.5)


@pytest.mark.integration
def test_missing_or_foreign_reply_address_is_rejected(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe
) -> None:
    worker = start_worker("w-addr")
    payload = encode_offload(OffloadRequest("r", probe.device_id, 1, tiny_images(1)[0]))
    topic = probe.topics.offload(probe.device_id)
    cases = [
        publish_properties(content_type=CONTENT_TYPE_OFFLOAD, correlation_data=b"x"),  # no ResponseTopic
        publish_properties(content_type=CONTENT_TYPE_OFFLOAD, response_topic=probe.reply_topic),  # no corr
        publish_properties(  # someone else's reply topic
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=probe.topics.reply("victim"),
            correlation_data=b"x",
        ),
        publish_properties(
            content_type="text/plain", response_topic=probe.reply_topic, correlation_data=b"x"
        ),
    ]
    for props in cases:
        probe.client.publish(topic, payload, qos=1, properties=props).wait_for_publish(5)
    assert wait_until(lambda: worker.stats["received"] == len(cases))
    assert worker.stats["rejected"] == len(cases) and worker.stats["answered"] == 0


@pytest.mark.integration
def test_expired_requests_are_dropped_and_counted(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = start_worker("w-exp")
    real_logits = worker.task.session.logits
    in_first_batch = threading.Event()

    def slow_first_batch(images: np.ndarray) -> np.ndarray:
        if not in_first_batch.is_set():
            in_first_batch.set()
            time.sleep(1.6)  # longer than the next request's 1 s MessageExpiryInterval
        return real_logits(images)

    monkeypatch.setattr(worker.task.session, "logits", slow_first_batch)
    images = tiny_images(3)
    first = probe.request(images[0], expiry_s=60)
    assert in_first_batch.wait(10)
    doomed = probe.request(images[1], expiry_s=1)
    assert first.result(timeout=10).reply.seq == 0
    third = probe.request(images[2], expiry_s=60)
    assert third.result(timeout=10).reply.seq == 2
    assert worker.stats["expired"] == 1 and worker.stats["answered"] == 2
    assert not doomed.done()


@pytest.mark.integration
def test_a_second_stream_answers_while_the_first_computes(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe, monkeypatch: pytest.MonkeyPatch
) -> None:
    worker = start_worker("w-streams", streams=2)
    real_logits = worker.task.session.logits
    holding, release = threading.Event(), threading.Event()

    def hold_first_batch(images: np.ndarray) -> np.ndarray:
        if not holding.is_set():
            holding.set()
            release.wait(30)
        return real_logits(images)

    monkeypatch.setattr(worker.task.session, "logits", hold_first_batch)
    images = tiny_images(2)
    try:
        first = probe.request(images[0], seq=0)
        assert holding.wait(10)
        # With one stream this one would wait for the held batch; the other stream takes it at once.
        assert probe.request(images[1], seq=1).result(timeout=10).reply.seq == 1
        assert not first.done()
    finally:
        release.set()
    assert first.result(timeout=10).reply.seq == 0
    stats = worker.stats
    assert stats["answered"] == 2 and stats["streams"] == 2 and stats["batches"] == 2


@pytest.mark.integration
def test_two_workers_in_the_group_each_get_a_share(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe
) -> None:
    workers = [start_worker("w-a"), start_worker("w-b")]
    images = tiny_images(200, seed=2)
    answers = [f.result(timeout=20) for f in [probe.request(img) for img in images]]
    by_worker = {w: sum(a.reply.worker_id == w for a in answers) for w in ("w-a", "w-b")}
    assert by_worker["w-a"] > 0 and by_worker["w-b"] > 0 and sum(by_worker.values()) == 200
    assert [w.stats["answered"] for w in workers] == [by_worker["w-a"], by_worker["w-b"]]


@pytest.mark.integration
def test_reply_carries_correlation_content_type_and_expiry(
    start_worker: Callable[..., CloudWorker], broker: BrokerProcess, topics: Topics, device_id: str
) -> None:
    """Raw MQTT view of one reply: the properties a device relies on."""
    start_worker("w-props")
    got: List[Any] = []
    done = threading.Event()
    client = new_client(
        broker.credentials(device_id),
        device_id,
        on_connect=lambda c, u, f, r, p: c.subscribe(topics.reply(device_id), qos=1),
    )
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: (got.append(m), done.set())
    client.connect(broker.host, broker.port)
    client.loop_start()
    try:
        assert subscribed.wait(5)
        props = publish_properties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=topics.reply(device_id),
            correlation_data=b"\x00\xffcorr",
            expiry_s=30,
        )
        payload = encode_offload(OffloadRequest("run", device_id, 42, tiny_images(1)[0]))
        client.publish(topics.offload(device_id), payload, qos=1, properties=props)
        assert done.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    message = got[0]
    assert message.qos == 1 and message.topic == topics.reply(device_id)
    assert message.properties.CorrelationData == b"\x00\xffcorr"
    assert message.properties.ContentType == "application/vnd.edgecascade.reply.v1"
    assert 1 <= message.properties.MessageExpiryInterval <= 30
    assert decode_reply(message.payload).seq == 42


@pytest.mark.integration
def test_energy_per_sample_through_metering(
    start_worker: Callable[..., CloudWorker], probe: OffloadProbe
) -> None:
    """With the `estimate` meter (every machine has it) each reply carries its share of the batch's joules."""
    start_worker("w-energy", meters=["estimate"], meter_options={"estimate_watts_per_core": 15.0})
    futures: List[Future] = [probe.request(img) for img in tiny_images(10)]
    replies = [f.result(timeout=10).reply for f in futures]
    assert all(r.energy_source == "estimate" for r in replies)
    assert all(r.cloud_j is not None and r.cloud_j > 0 for r in replies)
