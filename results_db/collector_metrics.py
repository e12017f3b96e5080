"""The collector's Prometheus metrics (`edgecascade collect --metrics-port`): `CollectorMetrics(collector)`.

Each committed transaction is observed once (`Collector.observers`, before its messages are acknowledged):
records by kind, inference records by exit stage, refused records by reason, the commit's time. The
counters the collector keeps anyway (`Collector.stats`) are read when Prometheus scrapes.

Refusal reasons are a bounded set, sorted out of the texts the intake and the writer give their refusals
(`rejection_reason`): undecodable, invalid, wrong_device, foreign_run, conflict, database.
"""

from __future__ import annotations

from typing import Any, Iterator, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from edgecascade.metrics import LATENCY_BUCKETS_S
from protocol.records import EXIT_STAGES
from results_db.collector import Committed

NS = "edgecascade_collector"
REJECTION_REASONS = ("undecodable", "invalid", "wrong_device", "foreign_run", "conflict", "database")
BATCH_BUCKETS = (1, 10, 50, 100, 250, 500, 1000, 2500, 5000)


def rejection_reason(text: str, undecodable: bool = False) -> str:
    """The bounded reason of a refusal's text (results_db.messages, .ingest and .collector write them)."""
    if undecodable:
        return "undecodable"
    if text.startswith("database:"):
        return "database"
    if "belongs to device" in text:
        return "foreign_run"
    if "conflicts with the stored" in text:
        return "conflict"
    if text.startswith("record for device"):
        return "wrong_device"
    return "invalid"


class CollectorMetrics:
    """A registry of one collector's metrics."""

    def __init__(self, collector: Any, registry: Optional[CollectorRegistry] = None) -> None:
        self.collector = collector
        self.registry = registry if registry is not None else CollectorRegistry()
        self.records = Counter(
            f"{NS}_records",
            "Records committed to the database, by kind (a re-delivered copy counts again: see duplicates)",
            ["kind"],
            registry=self.registry,
        )
        self.inferences = Counter(
            f"{NS}_inference_records",
            "Inference records committed, by exit stage (a re-delivered copy counts again: see duplicates)",
            ["exit_stage"],
            registry=self.registry,
        )
        for stage in EXIT_STAGES:
            self.inferences.labels(stage)
        self.rejected = Counter(
            f"{NS}_rejected_records",
            "Records (and undecodable messages) refused and kept in rejected_records, by reason",
            ["reason"],
            registry=self.registry,
        )
        for reason in REJECTION_REASONS:
            self.rejected.labels(reason)
        self.commit = Histogram(
            f"{NS}_commit_seconds",
            "One transaction's time in the database",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.batch = Histogram(
            f"{NS}_batch_records", "Records per transaction", buckets=BATCH_BUCKETS, registry=self.registry
        )
        self.registry.register(_CollectorState(collector))
        collector.observers.append(self.observe)

    def observe(self, committed: Committed) -> None:
        """One committed transaction (the writer thread)."""
        refused = {r.index for r in committed.counts.refused}
        for i, record in enumerate(committed.records):
            if i in refused:
                continue
            kind = str(record.get("type"))
            self.records.labels(kind).inc()
            if kind == "inference":
                self.inferences.labels(str(record["exit_stage"])).inc()
        for refusal in committed.counts.refused:
            self.rejected.labels(rejection_reason(refusal.reason)).inc()
        for rejected in committed.rejected:
            self.rejected.labels(rejection_reason(rejected.reason, isinstance(rejected.record, bytes))).inc()
        self.commit.observe(committed.seconds)
        self.batch.observe(len(committed.records))


class _CollectorState:
    """Read at scrape time from `Collector.stats`."""

    def __init__(self, collector: Any) -> None:
        self.collector = collector

    def collect(self) -> Iterator[Metric]:
        stats = self.collector.stats
        for name, key, documentation in (
            ("messages", "messages", "MQTT messages taken from the broker"),
            ("rows_inserted", "inserted", "Data rows newly written (inferences, energy windows, baselines)"),
            ("duplicates", "duplicates", "Data rows already present: a re-delivery, written nothing"),
            ("db_retries", "db_retries", "Transactions retried while the database was unavailable"),
            ("receipts", "receipts", "Receipts sent to devices for committed batches"),
            ("transactions", "batches", "Transactions committed"),
        ):
            yield CounterMetricFamily(f"{NS}_{name}", documentation, value=stats[key])
        depth = GaugeMetricFamily(f"{NS}_inbox_depth", "Messages decoded and waiting for the writer")
        depth.add_metric([], self.collector.inbox_depth())
        yield depth
        up = GaugeMetricFamily(f"{NS}_healthy", "1 while the writer thread is alive and the broker takes us")
        up.add_metric([], 1.0 if self.collector.healthy and self.collector.refused is None else 0.0)
        yield up
