"""The cloud worker's Prometheus metrics (`edgecascade cloud --metrics-port`): `WorkerMetrics(worker)`.

Each answered batch is observed once (`CloudWorker.observers`, after its replies have left): service time
per sample, each sample's wait in the queue, batch size, joules. The counters the worker keeps anyway
(`CloudWorker.stats`: received, answered, refusals by reason, ...) and its load are read when Prometheus
scrapes. Labels are bounded: a refusal or bad-message reason, a meter's name.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from cloud_worker.worker import BatchServed
from edgecascade.metrics import ENERGY_BUCKETS_J, LATENCY_BUCKETS_S, SERVICE_BUCKETS_S

NS = "edgecascade_cloud"
REFUSAL_REASONS = ("busy", "over_share", "queue_full", "qos0")  # `refused_<reason>` in the worker's stats
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class WorkerMetrics:
    """A registry of one worker's metrics."""

    def __init__(self, worker: Any, registry: Optional[CollectorRegistry] = None) -> None:
        self.worker = worker
        self.registry = registry if registry is not None else CollectorRegistry()
        self.service = Histogram(
            f"{NS}_service_seconds",
            "Cloud model compute per sample (a batch's compute over its samples)",
            buckets=SERVICE_BUCKETS_S,
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            f"{NS}_queue_wait_seconds",
            "A sample's wait in the worker's queue, arrival to the start of its batch",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch = Histogram(
            f"{NS}_batch_samples", "Samples per computed batch", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.energy = Histogram(
            f"{NS}_inference_energy_joules",
            "Cloud joules per inference by meter (nvml, rapl, ...); none when no meter was read",
            ["source"],
            buckets=ENERGY_BUCKETS_J,
            registry=self.registry,
        )
        self.registry.register(_WorkerState(worker))
        worker.observers.append(self.observe)

    def observe(self, served: BatchServed) -> None:
        """One answered batch (a compute thread)."""
        per_sample = served.seconds / served.samples
        for _ in range(served.samples):
            self.service.observe(per_sample)
        for wait in served.queue_waits_s:
            self.queue_wait.observe(wait)
        self.batch.observe(served.samples)
        if served.joules is not None:
            for joules in served.joules:
                self.energy.labels(served.energy_source).observe(joules)


class _WorkerState:
    """Read at scrape time from `CloudWorker.stats` and its load."""

    def __init__(self, worker: Any) -> None:
        self.worker = worker
        self.model_version = model_version(worker.task.path)

    def collect(self) -> Iterator[Metric]:
        worker = self.worker
        stats = worker.stats
        yield _counter("offloads_received", "Offloads taken from the broker", stats["received"])
        yield _counter("replies", "Offloads answered with the cloud model's reply", stats["answered"])
        refusals = CounterMetricFamily(
            f"{NS}_refusals",
            "Offloads refused at once with an OffloadRefusal (busy: would answer too late; over_share: the "
            "device had its fair share of the queue; queue_full; qos0: sent at QoS 0, not read)",
            labels=["reason"],
        )
        for reason in REFUSAL_REASONS:
            refusals.add_metric([reason], stats[f"refused_{reason}"])
        yield refusals
        bad = CounterMetricFamily(
            f"{NS}_bad_messages", "Offloads refused as malformed, by reason", labels=["reason"]
        )
        bad.add_metric(["malformed"], stats["rejected"])
        yield bad
        yield _counter("expired", "Offloads whose deadline passed in the queue (dropped)", stats["expired"])
        yield _counter("failed", "Offloads whose batch failed in the model (logged)", stats["failed"])
        yield _counter("batches", "Batches computed", stats["batches"])
        yield _counter("replies_refused", "Replies the broker refused to take", stats["reply_refused"])
        yield _counter("busy_seconds", "Seconds the compute streams spent on batches", stats["busy_s"])
        yield _gauge("queue_depth", "Offloads waiting in the worker's queue", stats["queued"])
        yield _gauge("streams", "Compute streams (batches computed at once)", stats["streams"])
        figures = worker.load_figures()  # not load(): its busy share is the published load's, since its last
        yield _gauge(
            "capacity_per_second",
            "Samples per second the worker can answer (measured)",
            figures["capacity_per_s"],
        )
        yield _gauge("service_mean_seconds", "Mean compute per sample lately", figures["service_ms"] / 1000.0)
        info = InfoMetricFamily(
            NS, "The worker's id, task and model (version: sha256 prefix of the model file)"
        )
        info.add_metric(
            [],
            {
                "worker_id": worker.config.worker_id,
                "task": worker.config.task,
                "model_version": self.model_version,
            },
        )
        yield info


def model_version(path: Path) -> str:
    """The first 12 hex digits of the model file's sha256 (a model directory: its card.json's)."""
    path = Path(path)
    target = path / "card.json" if path.is_dir() else path
    digest = hashlib.sha256()
    try:
        with open(target, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
    except OSError:
        return "unknown"
    return digest.hexdigest()[:12]


def _counter(name: str, documentation: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(f"{NS}_{name}", documentation, value=value)


def _gauge(name: str, documentation: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"{NS}_{name}", documentation, value=value)
