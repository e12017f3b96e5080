"""Prometheus metrics: an agent, a cloud worker and a collector serve their real endpoints while a run goes
through a real broker into SQLite; their counters by exit stage equal the SQL rows, and no label is a sample's
id. The collector's refusal reasons are a bounded set."""

from __future__ import annotations

import sqlite3
import threading
import time
import urllib.request
import uuid
from pathlib import Path
from typing import Dict, FrozenSet, Iterator, List, Tuple

import pytest
from agents import quick_agent_config
from prometheus_client.parser import text_string_to_metric_families
from tinymodels import tiny_images
from waiting import wait_for

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.metrics import WorkerMetrics
from device_agent import AgentConfig, DeviceAgent
from device_agent.metrics import AgentMetrics
from edgecascade.metrics import MetricsServer, exported_names
from protocol.records import EXIT_STAGES
from protocol.topics import Topics
from results_db import Collector, CollectorConfig
from results_db.collector_metrics import REJECTION_REASONS, CollectorMetrics, rejection_reason

Samples = Dict[Tuple[str, FrozenSet[Tuple[str, str]]], float]
# Labels whose values may appear: anything else (a seq, a run id) would make the series unbounded.
BOUNDED_LABELS = {"exit_stage", "reason", "kind", "source", "le", "device_id", "policy", "model",
                  "model_version", "worker_id", "task"}  # fmt: skip


def scrape(port: int) -> Samples:
    """Every sample of a real scrape of http://127.0.0.1:<port>/metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, frozenset(labels.items()))]


def sql_exits(db: Path, run_id: str) -> Dict[str, int]:
    with sqlite3.connect(db) as raw:
        rows = raw.execute(
            "SELECT exit_stage, COUNT(*) FROM inferences WHERE run_id = ? GROUP BY exit_stage", (run_id,)
        ).fetchall()
    return {stage: 0 for stage in EXIT_STAGES} | {str(stage): int(n) for stage, n in rows}


@pytest.fixture
def stack(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path
) -> Iterator[Tuple[CloudWorker, Collector, MetricsServer, MetricsServer, Path]]:
    """A worker and a collector, each with its metrics served on a free port."""
    db = tmp_path / "results.db"
    worker = CloudWorker(
        WorkerConfig(
            broker.credentials("cloud"), topics, tiny_models / "cloud.onnx", f"w{uuid.uuid4().hex[:6]}"
        )
    )
    worker_server = MetricsServer(WorkerMetrics(worker).registry, "127.0.0.1", 0)
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    )
    collector_server = MetricsServer(CollectorMetrics(collector).registry, "127.0.0.1", 0)
    worker.start()
    collector.start()
    try:
        yield worker, collector, worker_server, collector_server, db
    finally:
        collector.stop()
        worker.stop()
        worker_server.close()
        collector_server.close()


@pytest.mark.integration
def test_scraped_counters_equal_the_sql_rows_by_exit_stage(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path, stack: Tuple
) -> None:
    worker, collector, worker_server, collector_server, db = stack
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    config = quick_agent_config(
        broker,
        topics,
        tiny_models,
        tmp_path / "state",
        device_id=device_id,
        offload_budget_per_s=20.0,  # beyond it offloads are shed: a fourth exit stage to count
        offload_budget_burst=5.0,
    )
    agent = DeviceAgent(config)
    agent_metrics = AgentMetrics(agent)
    agent_server = MetricsServer(agent_metrics.registry, "127.0.0.1", 0)
    n = 300
    images = tiny_images(n, seed=31)
    scrapes: List[Samples] = []
    try:
        agent.start()
        done = threading.Event()

        def paced() -> Iterator[Tuple[object, int]]:  # like a camera: ~0.8 s of run to scrape during
            for i, image in enumerate(images):
                time.sleep(0.002)
                yield image, i % 10

        def run() -> None:
            try:
                agent.run_dataset(paced())
            finally:
                done.set()

        runner = threading.Thread(target=run)
        runner.start()
        while not done.wait(0.05):  # scraped during the run: counters only grow
            scrapes.append(scrape(agent_server.port))
        runner.join()
        wait_for(lambda: sum(sql_exits(db, agent.run_id).values()) == n, 30, "every row stored")
        wait_for(
            lambda: value(scrape(agent_server.port), "edgecascade_agent_receipts_pending") == 0,
            30,
            "receipts",
        )
        final_agent = scrape(agent_server.port)
        final_worker = scrape(worker_server.port)
        final_collector = scrape(collector_server.port)
    finally:
        agent.close()
        agent_server.close()

    rows = sql_exits(db, agent.run_id)
    assert rows["cloud"] > 0 and rows["shed"] > 0 and rows["main"] > 0  # the run exercised the stages
    for stage in EXIT_STAGES:
        assert value(final_agent, "edgecascade_agent_samples_total", exit_stage=stage) == rows[stage], stage
        assert (
            value(final_collector, "edgecascade_collector_inference_records_total", exit_stage=stage)
            == rows[stage]
        ), stage
    assert value(final_collector, "edgecascade_collector_duplicates_total") == 0
    # Offloads sent = answered by the cloud + refused + fallen back; the worker answered each answered one.
    sent = value(final_agent, "edgecascade_agent_offloads_total")
    assert sent == rows["cloud"] + value(final_agent, "edgecascade_agent_offload_refusals_total") + value(
        final_agent, "edgecascade_agent_offload_fallbacks_total"
    )
    assert value(final_worker, "edgecascade_cloud_replies_total") == rows["cloud"]
    assert value(final_worker, "edgecascade_cloud_service_seconds_count") == rows["cloud"]
    assert value(final_agent, "edgecascade_agent_reply_latency_seconds_count") == rows["cloud"]
    assert value(final_agent, "edgecascade_agent_offloads_shed_total", reason="budget") > 0
    assert value(final_agent, "edgecascade_agent_inference_energy_joules_count", source="estimate") == n
    assert value(final_agent, "edgecascade_agent_inference_energy_joules_count", source="analytic") == n
    assert value(final_agent, "edgecascade_agent_outbox_items", kind="record") == 0
    assert value(final_agent, "edgecascade_agent_connected") == 1
    info = [k for k in final_agent if k[0] == "edgecascade_agent_info"]
    assert (
        info and dict(info[0][1])["device_id"] == device_id and len(dict(info[0][1])["model_version"]) == 12
    )

    totals = [
        sum(value(s, "edgecascade_agent_samples_total", exit_stage=e) for e in EXIT_STAGES) for s in scrapes
    ]
    assert totals == sorted(totals) and len(scrapes) >= 2
    for samples in (final_agent, final_worker, final_collector):
        for name, labels in samples:
            assert name.startswith("edgecascade_") or name.startswith(("python_", "process_")), name
            assert {k for k, _ in labels} <= BOUNDED_LABELS, (name, labels)


def test_exported_names_include_families_without_samples_yet() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    registry = CollectorRegistry()
    Counter("x_events", "events", ["reason"], registry=registry)  # no label value yet: no sample
    Histogram("x_wait_seconds", "wait", registry=registry)
    names = exported_names([registry])
    assert {"x_events_total", "x_wait_seconds_bucket", "x_wait_seconds_count", "x_wait_seconds_sum"} <= names


@pytest.mark.parametrize(
    "text, undecodable, reason",
    [
        ("bad envelope", True, "undecodable"),
        ("database: NOT NULL constraint failed", False, "database"),
        ("run 'r1' belongs to device 'dev-b'", False, "foreign_run"),
        ("conflicts with the stored inference row (seq=3): prediction differs", False, "conflict"),
        ("record for device 'a' on 'b''s topic", False, "wrong_device"),
        ("exit_stage 'x' is not one of (...)", False, "invalid"),
    ],
)
def test_refusal_texts_map_to_a_bounded_reason(text: str, undecodable: bool, reason: str) -> None:
    assert rejection_reason(text, undecodable) == reason in REJECTION_REASONS


def test_the_drift_verdict_is_a_gauge_once_a_test_has_run(tiny_models: Path, tmp_path: Path) -> None:
    from types import SimpleNamespace

    from broker.launcher import Credentials
    from protocol.status import DriftStatus

    nowhere = Credentials("127.0.0.1", 9, "dev-d", "pw")  # never started: no broker needed
    agent = DeviceAgent(
        AgentConfig(device_id="dev-d", broker=nowhere, model_dir=tiny_models, state_dir=tmp_path)
    )
    registry = AgentMetrics(agent).registry
    assert registry.get_sample_value("edgecascade_agent_drifting") is None  # not watched: no sample, no guess
    agent.drift = SimpleNamespace(status=lambda: None)  # type: ignore[assignment]
    assert registry.get_sample_value("edgecascade_agent_drifting") is None  # watched, not tested yet
    verdict = DriftStatus(
        True, since_seq=300, seq=350, p_value=1e-9, feature="p3", checked_unix=0.0, alarms=2
    )
    agent.drift = SimpleNamespace(status=lambda: verdict)  # type: ignore[assignment]
    assert registry.get_sample_value("edgecascade_agent_drifting") == 1.0
    assert registry.get_sample_value("edgecascade_agent_drift_p_value") == 1e-9
    assert registry.get_sample_value("edgecascade_agent_drift_alarms_total") == 2
