"""The agent's Prometheus metrics (`edgecascade agent --metrics-port`): `AgentMetrics(agent)`, before `start`.

Two kinds of figure. What each stored record says (its exit stage, its reply's round trip, its joules) is
observed once per record, when the record is on disk (`DeviceAgent.record_observers`): so the samples counted
by exit stage are exactly the rows the collector will have, once the outbox has drained. Everything else is
read from the agent's parts when Prometheus scrapes (their own counters: `OffloadTracker.stats`,
`CapacityRule.stats`, `Link.stats`, the outbox's depth), so the inference loop pays nothing for it.

Labels are bounded: exit stage, a shed or bad-message reason, an outbox kind, a meter's name, an input
source's kind. A device is told apart by its scrape target (`instance`) and `edgecascade_agent_info`. The
drift verdict (`drift_watch`) is a gauge, `edgecascade_agent_drifting`.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Dict, Iterator, List, Optional

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric

from device_agent.capacity import SHED_REASONS
from device_agent.card import CARD_FILE, load_card, sha256_file
from edgecascade.metrics import ENERGY_BUCKETS_J, LATENCY_BUCKETS_S, SERVICE_BUCKETS_S
from protocol.records import EXIT_STAGES, InferenceRecord

logger = logging.getLogger(__name__)

NS = "edgecascade_agent"
# Bad messages by reason: what the agent's parts count under which name.
_BAD_OFFLOAD_STATS = {"bad_replies": "reply", "unknown_replies": "unknown_reply"}
_BAD_AGENT_STATS = {"bad_inputs": "input_array", "bad_loads": "worker_load"}
_BAD_LINK_STATS = {"bad_receipts": "receipt"}


class AgentMetrics:
    """A registry of one agent's metrics; `inputs` are live sources (`mqtt_input.MqttInput`) to report."""

    def __init__(self, agent: Any, registry: Optional[CollectorRegistry] = None) -> None:
        self.agent = agent
        self.registry = registry if registry is not None else CollectorRegistry()
        self.inputs: List[Any] = []
        self.samples = Counter(
            f"{NS}_samples",
            "Samples whose result record is stored in the device's outbox, by exit stage (main, extension, "
            "cloud, fallback: the deadline passed, shed: kept at the edge by the capacity rule or a worker)",
            ["exit_stage"],
            registry=self.registry,
        )
        for stage in EXIT_STAGES:
            self.samples.labels(stage)
        self.reply_latency = Histogram(
            f"{NS}_reply_latency_seconds",
            "Round trip of an answered offload, sent to reply received (network, queue and cloud compute)",
            buckets=LATENCY_BUCKETS_S,
            registry=self.registry,
        )
        self.edge_compute = Histogram(
            f"{NS}_edge_compute_seconds",
            "Time a sample spent on the device: edge blocks, policy and encoding an offload",
            buckets=SERVICE_BUCKETS_S,
            registry=self.registry,
        )
        self.energy = Histogram(
            f"{NS}_inference_energy_joules",
            "Device joules per inference (gross) by source: a meter's name (rapl, jtop, estimate, ...) or "
            "analytic (the model card's MACs and bytes times per-operation energies)",
            ["source"],
            buckets=ENERGY_BUCKETS_J,
            registry=self.registry,
        )
        card = load_card(agent.config.model_dir)
        self.info = {
            "device_id": agent.device_id,
            "policy": str(agent.config.policy.get("name")),
            "model": f"{card.dataset}/{card.backbone}",
            # the first 12 hex digits of card.json's sha256: the `runs.model_sha256` of the run's row
            "model_version": sha256_file(card.path / CARD_FILE)[:12],
        }
        self.registry.register(_AgentState(self))
        agent.record_observers.append(self.observe)

    def observe(self, record: InferenceRecord) -> None:
        """One stored record (the settlement's thread)."""
        self.samples.labels(record.exit_stage).inc()
        self.edge_compute.observe(record.edge_ms / 1000.0)
        if record.exit_stage == "cloud" and record.cloud_ms is not None:
            self.reply_latency.observe(((record.network_ms or 0.0) + record.cloud_ms) / 1000.0)
        if record.device_j_gross is not None:
            self.energy.labels(record.energy_source).observe(record.device_j_gross)
        if record.device_j_analytic is not None:
            self.energy.labels("analytic").observe(record.device_j_analytic)


class _AgentState:
    """Read at scrape time (the HTTP server's thread) from the agent's parts; parts not made yet (before
    `start()`) or gone (after `close()`) give no samples, never an error."""

    def __init__(self, metrics: AgentMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        agent = self.metrics.agent
        offloads = getattr(agent, "offloads", None)
        link = getattr(agent, "link", None)
        capacity = getattr(agent, "capacity", None)
        o_stats: Dict[str, int] = dict(offloads.stats) if offloads is not None else {}
        l_stats: Dict[str, int] = dict(link.stats) if link is not None else {}

        yield _counter("offloads", "Offloads sent to the cloud workers", o_stats.get("offloaded"))
        yield _counter(
            "offload_fallbacks",
            "Offloads whose deadline passed unanswered: the edge's answer, flagged fallback",
            o_stats.get("fallbacks"),
        )
        yield _counter(
            "offload_refusals",
            "Offloads a worker refused at once (OffloadRefusal: its queue would answer too late, or the "
            "device was over its share): the edge's answer, flagged shed",
            o_stats.get("refused"),
        )
        yield _counter(
            "late_replies", "Replies that came after their deadline (dropped)", o_stats.get("late_replies")
        )
        yield _counter(
            "offload_resends",
            "Offloads sent a second time (unanswered for half the deadline)",
            o_stats.get("resent"),
        )
        shed = CounterMetricFamily(
            f"{NS}_offloads_shed",
            "Offloads the policy wanted that the device's capacity rule kept at the edge, by reason",
            labels=["reason"],
        )
        if capacity is not None:
            c_stats = dict(capacity.stats)
            for reason in SHED_REASONS:
                shed.add_metric([reason], c_stats.get(f"shed_{reason}", 0))
        yield shed

        bad = CounterMetricFamily(
            f"{NS}_bad_messages", "Messages and inputs refused as malformed, by reason", labels=["reason"]
        )
        for stats, names in (
            (o_stats, _BAD_OFFLOAD_STATS),
            (dict(agent.stats), _BAD_AGENT_STATS),
            (l_stats, _BAD_LINK_STATS),
        ):
            if stats:
                for key, reason in names.items():
                    bad.add_metric([reason], stats.get(key, 0))
        for source in self.metrics.inputs:
            for reason, count in source.bad_by_reason().items():
                bad.add_metric([f"{source.kind}_{reason}"], count)
        yield bad
        yield _counter(
            "failed_samples", "Samples whose processing failed (logged)", agent.stats.get("failed")
        )
        yield _counter(
            "refused_records",
            "Result records the collector could not store (kept in its rejected_records table)",
            l_stats.get("refused_records"),
        )
        yield from self._inputs()
        yield from self._outbox(agent)

        in_flight = GaugeMetricFamily(f"{NS}_offloads_in_flight", "Offloads awaiting an answer")
        connected = GaugeMetricFamily(f"{NS}_connected", "1 while the device is connected to the broker")
        if offloads is not None and link is not None:
            in_flight.add_metric([], offloads.in_flight())
            connected.add_metric([], 1.0 if link.connected.is_set() else 0.0)
        yield in_flight
        yield connected
        share = GaugeMetricFamily(
            f"{NS}_admission_share", "The capacity rule's share of offloads let go (1: all; absent: rule off)"
        )
        if capacity is not None:
            share.add_metric([], float(capacity.share))
        yield share
        yield from self._drift(agent)
        info = InfoMetricFamily(
            NS, "The agent's device, policy and model (version: a rollout's, else card.json sha256 prefix)"
        )
        # The version served now: a rollout (`device_agent.rollout`) swaps it while the agent runs.
        version = getattr(agent, "model_version", None) or self.metrics.info["model_version"]
        info.add_metric([], {**self.metrics.info, "model_version": str(version)})
        yield info

    def _drift(self, agent: Any) -> Iterator[Metric]:
        """The drift watch's verdict (`drift_watch.DriftWatch`): no sample while drift is not watched (off,
        no reference in the card, a policy that runs nothing on the device) or not tested yet."""
        drifting = GaugeMetricFamily(
            f"{NS}_drifting", "1 while the latest drift test says the inputs left the card's profile, else 0"
        )
        p_value = GaugeMetricFamily(
            f"{NS}_drift_p_value", "The latest drift test's p-value (KS, smallest output)"
        )
        alarms = CounterMetricFamily(f"{NS}_drift_alarms", "Drift tests that found drift in this run")
        watch = getattr(agent, "drift", None)
        status = watch.status() if watch is not None else None
        if status is not None:
            drifting.add_metric([], 1.0 if status.drifting else 0.0)
            p_value.add_metric([], status.p_value)
            alarms.add_metric([], status.alarms)
        yield from (drifting, p_value, alarms)

    def _inputs(self) -> Iterator[Metric]:
        received = CounterMetricFamily(
            f"{NS}_input_messages", "Inputs that reached a live source, by source", labels=["source"]
        )
        dropped = CounterMetricFamily(
            f"{NS}_input_dropped",
            "Inputs a live source dropped because its bounded queue was full (the device was slower)",
            labels=["source"],
        )
        depth = GaugeMetricFamily(
            f"{NS}_input_queue_depth", "Inputs waiting in a source's queue", labels=["source"]
        )
        size = GaugeMetricFamily(f"{NS}_input_queue_capacity", "A source's queue bound", labels=["source"])
        for source in self.metrics.inputs:
            stats = source.stats
            received.add_metric([source.kind], stats["received"])
            dropped.add_metric([source.kind], stats["dropped"])
            depth.add_metric([source.kind], source.depth())
            size.add_metric([source.kind], source.queue_size)
        yield from (received, dropped, depth, size)

    def _outbox(self, agent: Any) -> Iterator[Metric]:
        items = GaugeMetricFamily(
            f"{NS}_outbox_items",
            "Items waiting in the on-disk outbox, by kind (record, offload)",
            labels=["kind"],
        )
        age = GaugeMetricFamily(
            f"{NS}_outbox_oldest_age_seconds",
            "Age of the oldest outbox entry, by kind (0: none)",
            labels=["kind"],
        )
        size = GaugeMetricFamily(f"{NS}_outbox_bytes", "Payload bytes in the outbox")
        pending = GaugeMetricFamily(
            f"{NS}_receipts_pending",
            "Result records sent and not yet confirmed stored by the collector's receipt",
        )
        outbox = getattr(agent, "outbox", None)
        try:
            waiting = outbox.waiting() if outbox is not None else None
            usage = outbox.usage() if outbox is not None else None
        except Exception:  # closed (after close()), or the disk failing: the agent logs that itself
            waiting = usage = None
        if waiting is not None and usage is not None:
            now = time.time()
            for kind, (count, _sent, oldest) in sorted(waiting.items()):
                items.add_metric([kind], count)
                age.add_metric([kind], 0.0 if oldest is None else max(0.0, now - oldest))
            size.add_metric([], usage[1])
            pending.add_metric([], waiting.get("record", (0, 0, None))[1])
        yield from (items, age, size, pending)


def _counter(name: str, documentation: str, value: Optional[int]) -> CounterMetricFamily:
    family = CounterMetricFamily(f"{NS}_{name}", documentation)
    if value is not None:
        family.add_metric([], value)
    return family
