"""Settlement: a sample's outcome becomes its record, for the sink to take to the outbox (`sink`).

A sample is finished once its energy window has closed (its joules are known) and its outcome is known: an
exit at the edge, an offload shed at the edge (`capacity`), the cloud's reply, or the deadline's fallback.
Its future and its tally are resolved only once the record is on disk (`RecordSink`).

What a SIGKILL can lose is therefore what has not been flushed: records of the last housekeeping tick and the
samples of the open energy window (at most `window_size` samples and `window_max_s` seconds). Their source
items are not marked done, so a restart redoes them (a dataset run resumed with its run id, a watched
directory); `submit()` callers hold an unresolved future for each.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, List, Sequence

from device_agent.energy import WindowEnergy, window_record
from device_agent.keys import entry_key
from device_agent.offloads import Settled
from device_agent.outbox import Outbox
from device_agent.policies import Outcome, Policy
from device_agent.runs import RunSummary
from device_agent.samples import Sample, record_of
from device_agent.sink import Finished, RecordSink
from protocol import InferenceRecord, validate_record

logger = logging.getLogger(__name__)


class Settlement:
    """Outcomes in, records to the outbox. Thread-safe: outcomes come from the inference, link and paho
    threads; flushes from the link thread (and the inference thread when the backlog is full)."""

    def __init__(
        self,
        *,
        run_id: str,
        device_id: str,
        outbox: Outbox,
        sink: RecordSink,
        policy: Policy,
        energy: Any,
        summary: RunSummary,
        observers: Sequence[Callable[[InferenceRecord], None]] = (),
    ) -> None:
        self.run_id = run_id
        self.device_id = device_id
        self.outbox = outbox
        self.policy = policy
        self.energy = energy
        self.summary = summary
        self.records = 0
        self._lock = threading.Lock()
        self.sink = sink
        self.flush = sink.flush
        self.observers = observers  # told of each record once it is on disk (metrics)

    # -- outcomes -------------------------------------------------------------------------------------
    def edge_exit(self, sample: Sample) -> None:
        self._settle(sample, sample.view.exit_stage or "main")

    def shed(self, sample: Sample) -> None:
        """The policy wanted the cloud and the capacity rule said it would be too late: the edge's answer,
        flagged `shed`; in every other respect (bytes, energy) an edge exit. (A worker's refusal of a sent
        offload is also `shed`, with the bytes it cost: `offload_settled`.)"""
        self._settle(sample, "shed")

    def offload_settled(self, settled: Settled) -> None:
        sample: Sample = settled.sample
        sample.offload_outbox_id = settled.outbox_id
        reply = settled.reply
        if reply is None:
            # A worker's refusal is the cloud saying it would be too late, like the capacity rule's shed;
            # without an edge answer (cloud-only) there is no answer at all, as at the deadline.
            refused = settled.refusal is not None and sample.view.prediction is not None
            self._settle(sample, "shed" if refused else "fallback")
            return
        sample.reply = reply
        sample.bytes_down = settled.bytes_down
        if settled.round_trip_ms is not None:
            sample.network_ms = max(0.0, settled.round_trip_ms - reply.cloud_ms)
        self._settle(sample, "cloud")

    def window_closed(self, energy: WindowEnergy, window_seq: int, members: List[Sample]) -> None:
        """A closed energy window: its record (none without a meter figure) and each member's joules."""
        if energy.window is not None:
            record = window_record(energy.window, self.run_id, self.device_id, window_seq).to_map()
            key = entry_key("energy_window", self.run_id, self.device_id, window_seq)
            self.sink.add(Finished(key, validate_record(record)))
        for sample, (gross_j, net_j) in zip(members, energy.per_inference):
            with self._lock:
                sample.device_j_gross, sample.device_j_net, sample.energy_done = gross_j, net_j, True
            self._maybe_finish(sample)

    def record(self, sample: Sample, exit_stage: str) -> InferenceRecord:
        """The sample's record as things stand."""
        return record_of(
            sample,
            exit_stage,
            run_id=self.run_id,
            device_id=self.device_id,
            energy_source=self.energy.source,
            analytic_j=self.energy.analytic_j(sample.blocks),
        )

    def _settle(self, sample: Sample, exit_stage: str) -> None:
        cloud_prediction = sample.reply.prediction if sample.reply is not None else None
        try:
            assert sample.decision is not None
            outcome = Outcome(
                sample.view, sample.decision, cloud_prediction, sample.label, exit_stage == "shed"
            )
            self.policy.observe(outcome)
        except Exception:
            logger.exception("policy %s failed to learn from sample %d", self.policy.name, sample.seq)
        with self._lock:
            sample.exit_stage = exit_stage
        self._maybe_finish(sample)

    def _maybe_finish(self, sample: Sample) -> None:
        with self._lock:
            if not sample.energy_done or sample.exit_stage is None or sample.finished:
                return
            sample.finished = True
        result = self.record(sample, sample.exit_stage)
        key = entry_key("inference", self.run_id, self.device_id, sample.seq)
        sample.image = None  # the record is all we keep
        self.sink.add(
            Finished(
                key,
                result.to_map(),
                counted=True,
                offload_id=sample.offload_outbox_id,
                origin=sample.origin,
                on_stored=lambda: self._resolve(sample, result),
            )
        )

    @property
    def backlog(self) -> int:
        return self.sink.backlog

    def _resolve(self, sample: Sample, result: InferenceRecord) -> None:
        with self._lock:
            self.summary.add(result)
            self.records += 1
        for observe in self.observers:
            try:
                observe(result)
            except Exception:  # an observer's bug must not keep the record's caller from hearing back
                logger.exception("record observer failed on sample %d", sample.seq)
        if sample.future is not None and sample.future.set_running_or_notify_cancel():
            sample.future.set_result(result)  # (a caller who cancelled it does not want it)
        if sample.sink is not None:
            sample.sink(result)

    def recover(self) -> int:
        """Offloads a previous process left unanswered become fallback records now; how many."""
        recovered = 0
        for entry in self.outbox.all_of("offload"):
            record = dict(entry.meta or {})
            try:
                validate_record(record)
            except ValueError:
                logger.error("dropping unreadable leftover offload %s", entry.key)
                self.outbox.ack([entry.id])
                continue
            self.sink.put_recovered(entry.id, record)
            recovered += 1
            logger.warning("offload %s of an earlier process recorded as fallback", entry.key)
        return recovered
