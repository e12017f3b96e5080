"""A cloud worker dies mid-stream (SIGKILL of a real `edgecascade cloud` process): the group goes on serving.

Mosquitto 2.0.11 facts these tests pin down (and cloud_worker/worker.py is designed around):
- a shared-subscription message in flight to a worker whose connection breaks is NOT re-dispatched to the
  group; with a clean session it is gone, so the requester re-sends after its deadline;
- a worker with a persistent session keeps being handed its round-robin share while disconnected, which is
  why workers use clean sessions (session expiry 0).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from tinymodels import tiny_images

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.probe import Answer, OffloadProbe
from protocol.mqtt import BrokerAddress, connect_properties, new_client
from protocol.topics import Topics

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def _spawn_cli_worker(broker: BrokerProcess, topics: Topics, models: Path, tmp: Path, worker_id: str):
    password_file = tmp / f"{worker_id}.pw"
    password_file.write_text(broker.credentials("cloud").password + "\n")
    namespace = topics.root.split("/")[0]
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecascade", "cloud", "--broker", f"{broker.host}:{broker.port}"]
        + ["--user", "cloud", "--password-file", str(password_file), "--models", str(models)]
        + ["--worker-id", worker_id, "--namespace", namespace, "--max-batch", "8"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()  # blocks until the worker says it is subscribed (or dies)
    assert line.strip() == f"worker {worker_id} ready", f"CLI worker did not start: {line!r}"
    return proc


def _wait_stopped(pid: int, timeout_s: float = 5.0) -> None:
    """Until every thread of `pid` is in state T (stopped): kill(2) returns before a group stop completes."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [
            (Path(f"/proc/{pid}/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()[0])
            for tid in os.listdir(f"/proc/{pid}/task")
        ]
        if all(st in ("T", "t") for st in states):
            return
        time.sleep(0.001)
    raise AssertionError(f"process {pid} did not stop within {timeout_s} s")


def test_killed_worker_mid_stream_the_other_answers_everything(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, device_id: str, tmp_path: Path
) -> None:
    victim = _spawn_cli_worker(broker, topics, tiny_models, tmp_path, "victim")
    survivor = CloudWorker(WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "survivor")).start()
    total, hang_at, kill_at, deadline_s = 300, 100, 120, 1.0
    images = tiny_images(total, seed=4)
    futures: Dict[int, Future] = {}
    sent_at: Dict[int, float] = {}
    resent = 0
    try:
        with OffloadProbe(broker.credentials(device_id), topics, device_id) as probe:
            for i in range(total):
                if i == hang_at:
                    victim.send_signal(signal.SIGSTOP)  # hung: the broker keeps handing it its share
                    _wait_stopped(victim.pid)  # the stop lands asynchronously; a loaded box shows the gap
                if i == kill_at:
                    victim.send_signal(signal.SIGKILL)  # no DISCONNECT, no goodbye: its socket just closes
                    victim.wait(10)
                futures[i] = probe.request(images[i], seq=i)
                sent_at[i] = time.monotonic()
                time.sleep(0.002)  # a stream, not a burst: the kill lands while requests are flowing
            # The requester's side of the contract: re-send (same CorrelationData) what is unanswered after
            # its deadline. Mosquitto hands requests that were in flight to the dead worker to nobody.
            end = time.monotonic() + 20
            while time.monotonic() < end and not all(f.done() for f in futures.values()):
                now = time.monotonic()
                for i, future in futures.items():
                    if not future.done() and now - sent_at[i] > deadline_s:
                        probe.request(
                            images[i], seq=i, correlation=f"{probe.run_id}:{i}".encode(), future=future
                        )
                        sent_at[i] = now
                        resent += 1
                time.sleep(0.05)
            answers: Dict[int, Answer] = {i: f.result(timeout=1) for i, f in futures.items()}
    finally:
        if victim.poll() is None:
            victim.kill()
        survivor.stop(drain_s=0.5)
    assert sorted(answers) == list(range(total))
    assert all(a.reply.seq == i for i, a in answers.items())
    by_worker = [a.reply.worker_id for a in answers.values()]
    assert by_worker.count("victim") > 0, "the victim never got its share before it hung"
    # Everything sent after it hung can only have been answered by the survivor ...
    assert {answers[i].reply.worker_id for i in range(hang_at, total)} == {"survivor"}
    # ... including the requests the broker had handed the hung worker: lost with its session, re-sent.
    assert resent > 0
    print(f"victim {by_worker.count('victim')}, survivor {by_worker.count('survivor')}, re-sent {resent}")


def _raw_subscriber(
    address: BrokerAddress, client_id: str, topic: str, expiry_s: int
) -> Tuple[object, List[bytes]]:
    got: List[bytes] = []
    subscribed = threading.Event()
    client = new_client(address, client_id, on_connect=lambda c, u, f, r, p: c.subscribe(topic, qos=1))
    client.on_subscribe = lambda *a: subscribed.set()
    client.on_message = lambda c, u, m: got.append(m.payload)
    client.connect(
        address.host, address.port, clean_start=expiry_s == 0, properties=connect_properties(expiry_s)
    )
    client.loop_start()
    assert subscribed.wait(5)
    return client, got


_HOARDER = r"""
import sys, time, threading
from protocol.mqtt import BrokerAddress, new_client, connect_properties
host, port, user, password, topic = sys.argv[1:6]
a = BrokerAddress(host, int(port), user, password)
c = new_client(a, "hoarder", manual_ack=True, on_connect=lambda c, u, f, r, p: c.subscribe(topic, qos=1))
c.on_subscribe = lambda *x: print("subscribed", flush=True)
c.connect(a.host, a.port, clean_start=False, properties=connect_properties(300))
c.loop_forever()
"""


def test_mosquitto_keeps_handing_a_dead_persistent_session_its_share(
    broker: BrokerProcess, topics: Topics, device_id: str
) -> None:
    """Why workers use clean sessions: measured on the Mosquitto this project ships against."""
    cloud = broker.credentials("cloud")
    shared = topics.cloud_subscription()
    hoarder = subprocess.Popen(
        [sys.executable, "-c", _HOARDER, cloud.host, str(cloud.port), "cloud", cloud.password, shared],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert hoarder.stdout is not None and hoarder.stdout.readline().strip() == "subscribed"
    survivor, got = _raw_subscriber(cloud, f"survivor-{device_id}", shared, 0)
    publisher, _ = _raw_subscriber(broker.credentials(device_id), device_id, topics.reply(device_id), 0)
    try:
        hoarder.kill()
        hoarder.wait(10)
        time.sleep(0.3)  # the broker notices the closed socket
        for i in range(20):
            publisher.publish(topics.offload(device_id), json.dumps(i), qos=1).wait_for_publish(5)  # type: ignore[attr-defined]
        time.sleep(0.5)
    finally:
        for c in (survivor, publisher):
            c.disconnect()  # type: ignore[attr-defined]
            c.loop_stop()  # type: ignore[attr-defined]
    # Round robin over both sessions, connected or not: the live worker sees only about half.
    assert 5 <= len(got) <= 15, f"survivor got {len(got)} of 20"


def test_worker_waits_for_the_broker_and_survives_its_restart(tmp_path: Path, tiny_models: Path) -> None:
    """Started before its broker, the worker connects when it appears; after a restart it serves again."""
    own = BrokerProcess(tmp_path / "broker")  # not the session broker: this one gets restarted
    topics = Topics.namespaced("restart")
    starter = threading.Timer(1.0, own.start)
    starter.start()
    worker = CloudWorker(WorkerConfig(own.credentials("cloud"), topics, tiny_models, "w-restart"))
    try:
        worker.start(timeout_s=20)  # retries with backoff until the broker is up
        with OffloadProbe(own.credentials("dev-r"), topics, "dev-r") as probe:
            assert probe.request(tiny_images(1)[0], seq=1).result(timeout=10).reply.seq == 1
        own.restart()
        deadline = time.monotonic() + 20
        while not worker._subscribed.is_set() and time.monotonic() < deadline:
            time.sleep(0.05)
        with OffloadProbe(own.credentials("dev-r"), topics, "dev-r") as probe:
            assert probe.request(tiny_images(1)[0], seq=2).result(timeout=10).reply.seq == 2
        assert worker.stats["answered"] == 2
    finally:
        starter.cancel()
        worker.stop(drain_s=0.5)
        own.close()


def test_cli_refuses_a_missing_model_or_password_file(tmp_path: Path) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("secret\n")
    base = [sys.executable, "-m", "edgecascade", "cloud", "--broker", "127.0.0.1:1"]
    no_model = subprocess.run(
        [*base, "--password-file", str(password_file), "--models", str(tmp_path / "nowhere")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert no_model.returncode == 2 and "does not exist" in no_model.stderr
    no_password = subprocess.run(
        [*base, "--password-file", str(tmp_path / "missing.pw")], cwd=REPO, capture_output=True, text=True
    )
    assert no_password.returncode == 2 and "password" in no_password.stderr


@pytest.mark.parametrize(
    "flags, reason",
    [
        (["--max-batch", "0"], "max_batch must be >= 1"),  # before: WorkerConfig's ValueError as a traceback
        (["--max-expiry-s", "nan"], "max_expiry_s must be a positive number"),
        (["--task", "detect", "--models", "models/fashion-mnist"], "not a video detector's card"),  # KeyError
        (["--task", "detect", "--models", "nowhere"], "does not exist"),  # FileNotFoundError
        (["--load-interval-s", "-1"], "load_interval_s must be >= 0"),
        (["--streams", "0"], "streams must be >= 1"),
        (["--streams", "2", "--meters", "estimate"], "metering needs streams = 1"),
    ],
)
def test_cli_refuses_bad_settings_in_one_line_with_status_2(
    tmp_path: Path, flags: List[str], reason: str
) -> None:
    password_file = tmp_path / "pw"
    password_file.write_text("secret\n")
    done = subprocess.run(
        [sys.executable, "-m", "edgecascade", "cloud", "--broker", "127.0.0.1:1"]
        + ["--password-file", str(password_file), *flags],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    assert reason in done.stderr and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
