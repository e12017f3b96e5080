"""The load mode's simulated devices (bench/load_devices.py) against the real test broker and a real cloud
worker: each device its own connection and account, offloads answered by the worker (or fallen back after
the deadline), every sample one result record, labelled simulated, and the trace it replays."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List

import pytest
from tinymodels import tiny_images
from waiting import wait_for

from bench.load_devices import ENERGY_SOURCE, PROFILE, LoadDriver, SimDevice
from bench.load_mode import knee
from bench.load_trace import DEFAULT_TRACE, load_trace, summary
from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from protocol.codec import decode_records
from protocol.mqtt import new_client
from protocol.topics import Topics

DEVICES = 12


def test_committed_trace_is_the_real_cascade_on_fashion_mnist() -> None:
    trace = load_trace(DEFAULT_TRACE)
    figures = summary(trace)
    assert trace["policy"] == "meanet" and trace["dataset"] == "fashion-mnist:test"
    assert figures["samples"] == 1000
    assert 0.1 < figures["offload_fraction"] < 0.4  # meanet sends the hard fifth or so
    assert figures["edge_accuracy_of_kept"] > 0.9  # what it keeps, it mostly gets right
    assert {e["exit"] for e in trace["samples"]} <= {"main", "extension", "offload"}


def test_bad_trace_file_is_refused_clearly(tmp_path: Path) -> None:
    (tmp_path / "t.json").write_text('{"samples": []}')
    with pytest.raises(ValueError, match="not a load-mode trace"):
        load_trace(tmp_path / "t.json")


def test_simulated_devices_offload_to_a_real_worker_and_publish_every_record(
    broker: BrokerProcess, topics: Topics, tiny_models: Path
) -> None:
    entries = [
        {"i": i, "label": i % 10, "exit": "offload" if i % 3 == 0 else "main", "prediction": 1,
         "p_main": 0.9, "p_ext": None, "edge_ms": 0.5}
        for i in range(30)
    ]  # fmt: skip
    images = tiny_images(30)
    names = [f"sim-{i:03d}" for i in range(DEVICES)]
    broker.add_users(names)
    seen: List[Dict[str, Any]] = []
    lock = threading.Lock()

    def on_results(client: Any, userdata: Any, message: Any) -> None:
        with lock:
            seen.extend(decode_records(bytes(message.payload)))

    watcher = new_client(broker.credentials("collector"), "load-test-watcher")
    subscribed = threading.Event()
    watcher.on_message = on_results
    watcher.on_connect = lambda c, *a: c.subscribe(topics.all_results, qos=1)
    watcher.on_subscribe = lambda *a: subscribed.set()
    watcher.connect(broker.host, broker.port)
    watcher.loop_start()
    assert subscribed.wait(10), "the watcher's subscription"
    config = WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "w-load")
    driver = LoadDriver({"samples": entries}, images, topics, rate_hz=4.0, deadline_s=2.0, flush_s=0.2)
    with CloudWorker(config).start():
        sims = [SimDevice(n, broker.credentials(n), f"run-{n}", k) for k, n in enumerate(names)]
        driver.connect(sims, per_second=200.0)
        assert driver.stats.connected == DEVICES
        driver.run(1.5)
        assert driver.finish(timeout_s=20)
        driver.close()
    stats = driver.stats
    assert stats.offloads > 0 and stats.offloads == stats.replies + stats.fallbacks
    assert stats.replies > 0 and stats.refusals == 0
    assert stats.records_acked == stats.records_published == stats.samples
    assert len({id(d.client) for d in driver.devices}) == DEVICES
    expected = stats.samples + DEVICES  # every sample's record and each device's run record
    wait_for(lambda: len(seen) >= expected, 20, "every record at the watcher")
    watcher.disconnect()
    watcher.loop_stop()
    inferences = [r for r in seen if r["type"] == "inference"]
    keys = [(r["device_id"], r["seq"]) for r in inferences]
    assert len(keys) == len(set(keys)) == stats.samples
    for name in names:  # each device numbers its own samples from 0, with no gap
        seqs = sorted(seq for dev, seq in keys if dev == name)
        assert seqs == list(range(len(seqs)))
    assert {r["energy_source"] for r in inferences} == {ENERGY_SOURCE}
    assert {r["profile"] for r in seen if r["type"] == "run"} == {PROFILE}
    stages = {r["exit_stage"] for r in inferences}
    assert "cloud" in stages and "main" in stages and stages <= {"cloud", "fallback", "main"}


def test_knee_is_the_first_count_where_latency_or_loss_starts() -> None:
    def point(devices: int, p50: float, p99: float = 20.0, **more: Any) -> Dict[str, Any]:
        return {"devices": devices, "rtt_p50_ms": p50, "rtt_p99_ms": p99, "fallback_fraction": 0.0,
                "lost": 0, "connected": devices, **more}  # fmt: skip

    assert knee([point(250, 5), point(500, 6), point(1000, 9)]) is None
    assert knee([point(250, 5), point(500, 11), point(1000, 40)]) == 500
    assert knee([point(250, 5), point(500, 6, p99=1500.0)], deadline_s=2.0) == 500
    assert knee([point(250, 5), point(500, 6, fallback_fraction=0.02)]) == 500
    assert knee([point(250, 5), point(500, 6, lost=1)]) == 500
    assert knee([point(250, 5), point(500, 6, connected=499)]) == 500
