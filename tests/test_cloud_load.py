"""The cloud worker's published load (protocol.load) as a device sees it, over the real broker: live while
offloads pile up, retained for whoever subscribes later, cleared on a clean stop and by the will when the
worker is killed. And the meter behind the figures, on a clock of the test's own."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List, Optional

import numpy as np
import pytest
from tinymodels import tiny_images
from waiting import wait_for

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.load import LoadMeter
from cloud_worker.probe import OffloadProbe
from protocol.load import CONTENT_TYPE_LOAD, WorkerLoad, decode_load
from protocol.mqtt import new_client
from protocol.topics import Topics

REPO = Path(__file__).resolve().parent.parent
INTERVAL_S = 0.1


# -- the meter (no broker) ---------------------------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_busy_counts_a_running_batch_up_to_now_and_never_exceeds_one() -> None:
    clock = Clock()
    meter = LoadMeter(clock=clock)
    clock.now += 1.0  # idle second
    meter.begin()
    clock.now += 0.5
    assert meter.busy_since_last() == pytest.approx(0.5 / 1.5)  # half a second of a batch still running
    clock.now += 0.5
    assert meter.end(samples=4) == pytest.approx(1.0)
    assert meter.busy_since_last() == pytest.approx(1.0)  # the half second since the last reading
    clock.now += 2.0
    assert meter.busy_since_last() == 0.0
    figures = meter.figures()
    assert (figures["busy_s"], figures["wall_s"]) == (pytest.approx(1.0), pytest.approx(4.0))
    assert figures["busy"] == pytest.approx(0.25)
    assert figures["service_ms"] == pytest.approx(250.0) and figures["capacity_per_s"] == pytest.approx(4.0)


def test_streams_split_wall_time_and_add_capacity() -> None:
    clock = Clock()
    meter = LoadMeter(streams=2, clock=clock)
    meter.begin(stream=0)
    meter.begin(stream=1)
    clock.now += 0.01
    meter.end(samples=1, stream=0)
    meter.end(samples=1, stream=1)
    clock.now += 0.01
    figures = meter.figures()
    assert figures["busy"] == pytest.approx(0.5)  # 20 ms of batches in 2 x 20 ms of stream time
    assert figures["capacity_per_s"] == pytest.approx(200.0)  # two streams of 100 samples/s


def test_averages_start_from_the_seed_and_follow_recent_batches() -> None:
    clock = Clock()
    meter = LoadMeter(clock=clock)
    meter.seed(0.002, 1)
    assert meter.figures()["capacity_per_s"] == pytest.approx(500.0)
    for _ in range(50):  # batches of 10 at 1 ms a sample
        meter.begin()
        clock.now += 0.01
        meter.end(samples=10)
    figures = meter.figures()
    assert figures["service_ms"] == pytest.approx(1.0, rel=0.01)
    assert figures["capacity_per_s"] == pytest.approx(1000.0, rel=0.01)


def test_one_quick_batch_does_not_make_a_slow_worker_look_capable() -> None:
    """Capacity is average size over average time. As an average of each batch's rate, one batch of 2 in
    2 ms among batches of 2 in 100 ms read as 84/s for a worker of 21/s; a worker took offloads at such a
    rate (107/s published at 49 ms a sample) and let them expire in its queue (fleet simulation)."""
    clock = Clock()
    meter = LoadMeter(clock=clock)
    meter.seed(0.1, 2)
    for i in range(10):
        meter.begin()
        clock.now += 0.002 if i == 5 else 0.1
        meter.end(samples=2)
    assert meter.figures()["capacity_per_s"] == pytest.approx(21.4, rel=0.01)


# -- over the broker ---------------------------------------------------------------------------------------
class LoadWatcher:
    """A device account subscribed to every worker's load; keeps each message it gets."""

    def __init__(self, broker: BrokerProcess, topics: Topics, device_id: str) -> None:
        self.messages: List[Any] = []
        self.topics = topics
        self._subacks = 0
        self._lock = threading.Lock()
        self.client = new_client(
            broker.credentials(device_id),
            device_id,
            on_connect=lambda c, *a: c.subscribe(topics.all_cloud_load, qos=1),
        )
        self.client.on_message = self._on_message
        self.client.on_subscribe = self._on_subscribe
        self.client.connect(broker.host, broker.port)
        self.client.loop_start()
        wait_for(lambda: self._subacks >= 1, 10, "the load subscription")
        # The broker sends retained loads right after the SUBACK: a second subscription's SUBACK comes
        # after them on the same connection, so from then on `messages` holds every retained one.
        self.client.subscribe(topics.reply(device_id), qos=1)
        wait_for(lambda: self._subacks >= 2, 10, "the barrier subscription")

    def _on_subscribe(self, *args: Any) -> None:
        self._subacks += 1

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.messages.append(message)

    def of(self, worker_id: str) -> List[Any]:
        topic = self.topics.cloud_load(worker_id)
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def loads(self, worker_id: str) -> List[WorkerLoad]:
        return [decode_load(m.payload) for m in self.of(worker_id) if m.payload]

    def last(self, worker_id: str) -> Optional[Any]:
        got = self.of(worker_id)
        return got[-1] if got else None

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watch(broker: BrokerProcess, topics: Topics) -> Iterator[Any]:
    watchers: List[LoadWatcher] = []

    def start(device_id: str) -> LoadWatcher:
        watchers.append(LoadWatcher(broker, topics, device_id))
        return watchers[-1]

    yield start
    for w in watchers:
        w.close()


@pytest.mark.integration
def test_a_device_sees_the_backlog_grow_then_drain_and_the_load_cleared_on_stop(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, device_id: str, watch: Any
) -> None:
    watcher = watch(device_id)
    config = WorkerConfig(
        broker.credentials("cloud"), topics, tiny_models, "w-load", max_batch=8, load_interval_s=INTERVAL_S
    )
    worker = CloudWorker(config).start()
    first, release = threading.Event(), threading.Event()
    try:
        real_logits = worker.task.session.logits

        def held_first_batch(images: np.ndarray) -> np.ndarray:
            if not first.is_set():
                first.set()
                release.wait(30)  # the tiny model is too quick to ever build a queue by itself
            return real_logits(images)

        worker.task.session.logits = held_first_batch  # type: ignore[method-assign]
        wait_for(lambda: watcher.loads("w-load"), 10, "the first load")
        with OffloadProbe(broker.credentials("dev-burst"), topics, "dev-burst") as probe:
            images = tiny_images(41, seed=4)
            futures = [probe.request(images[0], seq=0)]
            assert first.wait(10)
            futures += [probe.request(images[i], seq=i) for i in range(1, 41)]  # 40: five batches' worth
            wait_for(
                lambda: sum(x.queue == 40 for x in watcher.loads("w-load")) >= 2,
                10,
                "two loads with queue 40",
            )
            release.set()
            assert [f.result(timeout=10).reply.seq for f in futures] == list(range(41))
            wait_for(
                lambda: any(x.answered_total == 41 and x.queue == 0 for x in watcher.loads("w-load")),
                10,
                "the drained load",
            )
        loads = watcher.loads("w-load")
        depths = [x.queue for x in loads]
        assert depths.index(40) < max(i for i, d in enumerate(depths) if d == 0)  # grew, then drained
        held = [x for x in loads if x.queue == 40]
        assert all(x.busy > 0.5 for x in held[1:])  # a whole interval inside the held batch
        assert all(x.worker_id == "w-load" and x.capacity_per_s > 0 and x.service_ms > 0 for x in loads)
        message = watcher.of("w-load")[-1]
        assert message.properties.ContentType == CONTENT_TYPE_LOAD
        assert message.properties.MessageExpiryInterval == 1  # 3 x 0.1 s, rounded up to whole seconds
        stats = worker.stats
        assert stats["busy_s"] > 0 and 0 < stats["busy"] < 1 and stats["wall_s"] > stats["busy_s"]
    finally:
        release.set()
        worker.stop(drain_s=0.5)
    wait_for(lambda: watcher.last("w-load").payload == b"", 10, "the load cleared on stop")
    later = watch(f"{device_id}-later")
    assert later.of("w-load") == []  # nothing retained any more


@pytest.mark.integration
def test_the_load_is_retained_for_a_late_subscriber(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, device_id: str, watch: Any
) -> None:
    config = WorkerConfig(
        broker.credentials("cloud"), topics, tiny_models, "w-kept", load_interval_s=INTERVAL_S
    )
    with CloudWorker(config) as worker:
        wait_for(lambda: worker.link.loads_published >= 2, 10, "two loads published")
        late = watch(device_id)
        (message,) = late.of("w-kept")
        assert message.retain and decode_load(message.payload).worker_id == "w-kept"


@pytest.mark.integration
def test_no_load_with_interval_zero(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, device_id: str, watch: Any
) -> None:
    watcher = watch(device_id)
    config = WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "w-quiet", load_interval_s=0)
    with CloudWorker(config), OffloadProbe(broker.credentials("dev-q"), topics, "dev-q") as probe:
        assert probe.request(tiny_images(1)[0], seq=1).result(timeout=10).reply.seq == 1
    assert watcher.of("w-quiet") == [] and watch(f"{device_id}-later").of("w-quiet") == []


@pytest.mark.integration
def test_the_will_clears_the_load_of_a_killed_worker(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, device_id: str, tmp_path: Path, watch: Any
) -> None:
    watcher = watch(device_id)
    password_file = tmp_path / "cloud.pw"
    password_file.write_text(broker.credentials("cloud").password + "\n")
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecascade", "cloud", "--broker", f"{broker.host}:{broker.port}"]
        + ["--user", "cloud", "--password-file", str(password_file), "--models", str(tiny_models)]
        + ["--worker-id", "w-doomed", "--namespace", topics.root.split("/")[0], "--load-interval-s", "0.2"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline().strip() == "worker w-doomed ready"
        wait_for(lambda: watcher.loads("w-doomed"), 10, "the killed worker's load")
        assert watch(f"{device_id}-before").of("w-doomed")  # retained while it lives
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        wait_for(lambda: watcher.last("w-doomed").payload == b"", 10, "the will's empty load")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
    assert watch(f"{device_id}-after").of("w-doomed") == []
