"""What one device can cost the cloud worker, and how the worker handles a broker that refuses it
(issue #13, points 7 and 11). Real Mosquitto; the committed cloud model where compute time matters."""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, List

import pytest
from tinymodels import tiny_images

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.batching import BatchQueue
from cloud_worker.probe import OffloadProbe, Refused
from cloud_worker.worker import LoginRefused
from protocol.codec import CONTENT_TYPE_OFFLOAD, OffloadRequest, encode_offload
from protocol.mqtt import BrokerAddress, new_client, publish_properties
from protocol.topics import Topics

REPO = Path(__file__).resolve().parent.parent
TRAINED = REPO / "models/fashion-mnist/cloud.onnx"  # ~1-4 ms a sample here: a backlog takes seconds


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 20.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.01)


# -- the queue: bounded, fair, per device (no broker) ------------------------------------------------------
def test_a_batch_takes_devices_in_turn_oldest_first_within_each() -> None:
    queue: BatchQueue[str] = BatchQueue(max_batch=4, max_wait_s=0)
    for i in range(6):
        assert queue.put(f"flood{i}", now=1.0, key="flood") is None
    assert queue.put("v0", now=1.1, key="victim") is None
    assert queue.put("v1", now=1.2, key="victim") is None
    assert [p.item for p in queue.take()] == ["flood0", "v0", "flood1", "v1"]
    assert [p.item for p in queue.take()] == ["flood2", "flood3", "flood4", "flood5"]
    assert len(queue) == 0 and queue.wait_s(now=2.0) is None


def test_a_lone_device_gets_the_whole_queue_and_shares_it_once_another_is_active() -> None:
    queue: BatchQueue[str] = BatchQueue(max_batch=8, max_wait_s=0, max_items=10, active_s=5.0)
    assert [queue.put(f"a{i}", now=0.0, key="a") for i in range(10)] == [None] * 10
    shed = queue.put("a10", now=0.0, key="a")  # the whole queue is a's share, and it is full
    assert shed is not None and (shed.pending.item, shed.reason) == ("a10", "over_share")
    # b arrives: each may now hold 10 // 2 = 5, and every b offload pushes out one of a's newest ...
    for i in range(5):
        shed = queue.put(f"b{i}", now=1.0, key="b")
        assert shed is not None and (shed.pending.item, shed.reason) == (f"a{9 - i}", "queue_full")
    # ... until both hold their share; then what either sends beyond it is its own loss.
    assert (queue.pending_for("a"), queue.pending_for("b"), len(queue)) == (5, 5, 10)
    for key in ("a", "b"):
        shed = queue.put(f"{key}-more", now=1.0, key=key)
        assert shed is not None and (shed.pending.item, shed.reason) == (f"{key}-more", "over_share")
    # Once both have been quiet for longer than active_s, a lone device has the whole queue again.
    queue.take()
    queue.take()
    assert len(queue) == 0 and queue.share(now=10.0) == 10


def test_the_bound_sheds_the_newest_offload_of_the_fullest_device() -> None:
    queue: BatchQueue[str] = BatchQueue(max_batch=8, max_wait_s=0, max_items=4, active_s=0.5)
    for i in range(3):
        assert queue.put(f"a{i}", now=0.0, key="a") is None
    assert queue.put("b0", now=1.0, key="b") is None  # a went quiet: b's share is the whole 4
    shed = queue.put("b1", now=1.0, key="b")  # 5 > 4: the fullest device (a) loses its newest
    assert shed is not None and (shed.pending.item, shed.reason) == ("a2", "queue_full")
    assert sorted(p.item for p in queue.take()) == ["a0", "a1", "b0", "b1"]


# -- against the broker ------------------------------------------------------------------------------------
@pytest.fixture
def start_worker(broker: BrokerProcess, topics: Topics) -> Iterator[Callable[..., CloudWorker]]:
    workers: List[CloudWorker] = []

    def start(model: Path, worker_id: str, **overrides: Any) -> CloudWorker:
        worker = CloudWorker(WorkerConfig(broker.credentials("cloud"), topics, model, worker_id, **overrides))
        workers.append(worker.start())
        return worker

    yield start
    for w in workers:
        w.stop(drain_s=0)


@pytest.mark.integration
def test_qos0_offloads_are_refused_unread_and_counted(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, start_worker: Callable[..., CloudWorker]
) -> None:
    worker = start_worker(tiny_models, "w-qos0")
    flooder = "cam-qos0"
    client = new_client(broker.credentials(flooder), flooder)
    client.connect(broker.host, broker.port)
    client.loop_start()
    image = tiny_images(1)[0]
    props = publish_properties(
        content_type=CONTENT_TYPE_OFFLOAD, response_topic=topics.reply(flooder), correlation_data=b"c"
    )
    try:
        for seq in range(200):  # valid offloads in every respect but their QoS
            payload = encode_offload(OffloadRequest("r", flooder, seq, image))
            client.publish(topics.offload(flooder), payload, qos=0, properties=props)
        wait_until(lambda: worker.stats["refused_qos0"] == 200, "200 QoS 0 refusals")
    finally:
        client.disconnect()
        client.loop_stop()
    with OffloadProbe(broker.credentials("cam-qos1"), topics, "cam-qos1") as probe:
        assert probe.request(image, seq=7).result(timeout=10).reply.seq == 7
    stats = worker.stats
    assert stats["answered"] == 1 and stats["received"] == 201 and stats["queued"] == 0


@pytest.mark.integration
@pytest.mark.skipif(not TRAINED.exists(), reason="needs the committed cloud model")
def test_a_flooding_device_does_not_make_another_fall_back(
    broker: BrokerProcess, topics: Topics, start_worker: Callable[..., CloudWorker]
) -> None:
    """A device sends 2,000 valid QoS 1 offloads without expiry at once (seconds of compute); another then
    sends 20 with a 2 s expiry, the agent's deadline. Every one of the victim's is answered (in a FIFO
    they would wait behind the whole backlog and expire), and every one of the flood's is accounted for."""
    worker = start_worker(TRAINED, "w-fair", threads=1)
    images = tiny_images(2020, seed=5)
    with OffloadProbe(broker.credentials("cam-flood"), topics, "cam-flood") as flood, OffloadProbe(
        broker.credentials("cam-victim"), topics, "cam-victim"
    ) as victim:
        flooded = [flood.request(images[i], seq=i, expiry_s=None) for i in range(2000)]
        wait_until(lambda: worker.stats["received"] >= 500, "the flood to reach the worker")
        asked = [victim.request(images[2000 + i], seq=i, expiry_s=2) for i in range(20)]
        answers = [f.result(timeout=10) for f in asked]
        assert [a.reply.seq for a in answers] == list(range(20))
        # The flood is not starved either: everything it sent is answered or counted as refused.
        wait_until(
            lambda: (
                worker.stats["answered"]
                + worker.stats["refused_busy"]
                + worker.stats["refused_over_share"]
                + worker.stats["refused_queue_full"]
                + worker.stats["expired"]
                == 2020
            ),
            "every offload accounted for",
            timeout_s=120,
        )
        stats = worker.stats
        refused = stats["refused_busy"] + stats["refused_over_share"] + stats["refused_queue_full"]
        # Each answer and each refusal the worker counted reaches the flooder (the last few may still be on
        # their way).
        wait_until(
            lambda: sum(f.done() for f in flooded) == stats["answered"] - 20 + refused, "the flood's answers"
        )
    assert stats["expired"] == 0, stats


@pytest.mark.integration
@pytest.mark.skipif(not TRAINED.exists(), reason="needs the committed cloud model")
def test_an_offload_without_expiry_waits_at_most_the_workers_maximum(
    broker: BrokerProcess, topics: Topics, start_worker: Callable[..., CloudWorker]
) -> None:
    worker = start_worker(TRAINED, "w-expiry", threads=1, max_batch=1, max_expiry_s=0.2)
    images = tiny_images(600, seed=6)
    with OffloadProbe(broker.credentials("cam-noexp"), topics, "cam-noexp") as probe:
        futures = [probe.request(images[i], seq=i, expiry_s=None) for i in range(600)]
        settled = ("answered", "expired", "refused_busy")
        wait_until(lambda: sum(worker.stats[k] for k in settled) == 600, "all 600 settled")
        wait_until(
            lambda: sum(f.done() for f in futures) == 600 - worker.stats["expired"], "answers, refusals"
        )
    stats = worker.stats
    # One at a time (a millisecond or more each), most would wait longer than 0.2 s: refused at once (the
    # predicted wait beyond REFUSE_ABOVE of 0.2 s), or dropped unrun once expired; none waits unbounded.
    refusals = [e for e in (f.exception() for f in futures if f.done()) if isinstance(e, Refused)]
    assert stats["refused_busy"] + stats["expired"] > 0
    assert len(refusals) == stats["refused_busy"]
    assert all(e.refusal.reason == "busy" for e in refusals)
    assert sum(f.done() and f.exception() is None for f in futures) == stats["answered"]


# -- logins the broker refuses -----------------------------------------------------------------------------
def _connections_logged(broker: BrokerProcess) -> int:
    return broker.log_file.read_text().count("New connection from")


@pytest.mark.integration
def test_a_refused_login_stops_the_worker_at_once_with_the_reason(
    broker: BrokerProcess, topics: Topics, tiny_models: Path
) -> None:
    good = broker.credentials("cloud")
    bad = BrokerAddress(good.host, good.port, "cloud", "not-the-password")
    before = _connections_logged(broker)
    worker = CloudWorker(WorkerConfig(bad, topics, tiny_models, "w-badpw"))
    with pytest.raises(LoginRefused, match="refused the login as 'cloud'.*(password|not authorized)"):
        worker.start(timeout_s=10)
    assert not worker.running
    assert _connections_logged(broker) - before == 1  # one attempt, not one per loop turn


@pytest.mark.integration
def test_an_account_without_the_cloud_role_is_told_so(
    broker: BrokerProcess, topics: Topics, tiny_models: Path
) -> None:
    worker = CloudWorker(WorkerConfig(broker.credentials("collector"), topics, tiny_models, "w-role"))
    with pytest.raises(LoginRefused, match="refused the subscription .*is it a cloud account"):
        worker.start(timeout_s=10)


@pytest.mark.integration
def test_cli_exits_2_with_one_line_on_a_wrong_password(
    broker: BrokerProcess, tiny_models: Path, tmp_path: Path
) -> None:
    password = tmp_path / "pw"
    password.write_text("wrong\n")
    done = subprocess.run(
        [sys.executable, "-m", "edgecascade", "cloud", "--broker", f"{broker.host}:{broker.port}"]
        + ["--user", "cloud", "--password-file", str(password), "--models", str(tiny_models / "cloud.onnx")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("edgecascade cloud: the broker at") and "refused the login as 'cloud'" in last


def test_a_broker_that_drops_every_connection_is_retried_with_backoff(
    topics: Topics, tiny_models: Path
) -> None:
    """Accepts TCP and hangs up before any CONNACK: a failure that may heal, so retried, but not in a spin."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    accepted: List[float] = []
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except socket.timeout:
                continue
            accepted.append(time.monotonic())
            conn.close()

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    address = BrokerAddress("127.0.0.1", server.getsockname()[1], "cloud", "pw")
    worker = CloudWorker(WorkerConfig(address, topics, tiny_models, "w-backoff"))
    try:
        with pytest.raises(TimeoutError):
            worker.start(timeout_s=4)
    finally:
        stop.set()
        thread.join(2)
        server.close()
    # 0.5 + 1 + 2 s of backoff fit in 4 s: four attempts at most (the old loop made thousands).
    assert 2 <= len(accepted) <= 4, len(accepted)
    gaps = [b - a for a, b in zip(accepted, accepted[1:])]
    assert all(later >= earlier for earlier, later in zip(gaps, gaps[1:]))  # growing, never shrinking
