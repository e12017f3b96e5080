"""Settlement: a sample's outcome becomes its record, and the record reaches the outbox.

A sample is finished once its energy window has closed (its joules are known) and its outcome is known: an
exit at the edge, the cloud's reply, or the deadline's fallback. Its record then waits in memory for the
next flush, which writes every finished record as one outbox entry, in the transaction that also removes the
offloads they settle, marks their source items done (`durable.SourceProgress`) and counts them for the run.
Only after that commit are the sample's future and tally resolved: a resolved sample is on disk.

What a SIGKILL can lose is therefore what has not been flushed: records of the last housekeeping tick and the
samples of the open energy window (at most `window_size` samples and `window_max_s` seconds). Their source
items are not marked done, so a restart redoes them (a dataset run resumed with its run id, a watched
directory); `submit()` callers hold an unresolved future for each.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import msgpack

from device_agent.durable import Counter, bump_count, chain, mark_done
from device_agent.energy import WindowEnergy, window_record
from device_agent.offloads import Settled
from device_agent.outbox import NewEntry, Outbox, OutboxFull
from device_agent.policies import Outcome, Policy
from device_agent.runs import RunSummary
from device_agent.samples import Sample, record_of
from protocol import InferenceRecord, validate_record

logger = logging.getLogger(__name__)

READY_BACKLOG = 4096  # finished records held in memory before the inference loop writes them itself


@dataclass
class _Ready:
    key: str
    record: Dict[str, Any]
    offload_id: Optional[int] = None  # the outbox entry of the offload this record settles
    sample: Optional[Sample] = None  # resolved after the flush (None: energy windows)
    result: Optional[InferenceRecord] = None


class Settlement:
    """Outcomes in, records to the outbox. Thread-safe: outcomes come from the inference, link and paho
    threads; flushes from the link thread (and the inference thread when the backlog is full)."""

    def __init__(
        self,
        *,
        run_id: str,
        device_id: str,
        outbox: Outbox,
        results_topic: str,
        batches: Counter,
        policy: Policy,
        energy: Any,
        summary: RunSummary,
        outbox_wait_s: Optional[float],
    ) -> None:
        self.run_id = run_id
        self.device_id = device_id
        self.outbox = outbox
        self.results_topic = results_topic
        self.batches = batches
        self.policy = policy
        self.energy = energy
        self.summary = summary
        self.outbox_wait_s = outbox_wait_s
        self.records = 0
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time: entries stay in the order they finished
        self._ready: List[_Ready] = []

    @property
    def count_name(self) -> str:
        return f"records/{self.run_id}"

    # -- outcomes -------------------------------------------------------------------------------------
    def edge_exit(self, sample: Sample) -> None:
        self._settle(sample, sample.view.exit_stage or "main")

    def offload_settled(self, settled: Settled) -> None:
        sample: Sample = settled.sample
        sample.offload_outbox_id = settled.outbox_id
        reply = settled.reply
        if reply is None:
            self._settle(sample, "fallback")
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
            key = f"energy_window/{self.run_id}/{self.device_id}/{window_seq}"
            with self._lock:
                self._ready.append(_Ready(key, validate_record(record)))
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
            self.policy.observe(Outcome(sample.view, sample.decision, cloud_prediction, sample.label))
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
        key = f"inference/{self.run_id}/{self.device_id}/{sample.seq}"
        sample.image = None  # the record is all we keep
        with self._lock:
            self._ready.append(_Ready(key, result.to_map(), sample.offload_outbox_id, sample, result))

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._ready)

    # -- to the outbox --------------------------------------------------------------------------------
    def flush(self, block: bool) -> None:
        """Finished records to the outbox as one entry (see the module docstring), then resolve them."""
        # The housekeeping thread never waits, for room or for another flush: the inference thread may be
        # in a blocking flush that waits for the link (which that thread runs) to make room.
        if not self._flush_lock.acquire(blocking=block):
            return
        try:
            with self._lock:
                ready, self._ready = self._ready, []
            if not ready:
                return
            inferences = [r for r in ready if r.sample is not None]
            entry = NewEntry(
                f"batch/{self.batches.take()}",
                "record",
                self.results_topic,
                msgpack.packb([r.record for r in ready], use_bin_type=True),
                items=len(ready),
            )
            also = chain(
                mark_done(r.sample.origin for r in inferences if r.sample is not None),
                bump_count(self.count_name, len(inferences)),
            )
            offloads = [r.offload_id for r in ready if r.offload_id is not None]
            try:
                self.outbox.commit(offloads, [entry], timeout=self.outbox_wait_s if block else 0, also=also)
            except OutboxFull:
                with self._lock:  # kept for the next try (or for close(), after a blocking flush failed)
                    self._ready[:0] = ready
                if block:
                    raise
                return
        finally:
            self._flush_lock.release()
        for r in inferences:
            self._resolve(r)

    def _resolve(self, ready: _Ready) -> None:
        sample, result = ready.sample, ready.result
        assert sample is not None and result is not None
        with self._lock:
            self.summary.add(result)
            self.records += 1
        if sample.future is not None:
            sample.future.set_result(result)
        if sample.sink is not None:
            sample.sink(result)

    def emit(self, record: Dict[str, Any], key: str) -> None:
        """A run / run_end / baseline record straight to the outbox, as an entry of its own."""
        validate_record(record)
        self.outbox.put(
            key,
            "record",
            self.results_topic,
            msgpack.packb([record], use_bin_type=True),
            timeout=self.outbox_wait_s,
        )

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
            batch = NewEntry(
                f"batch/{self.batches.take()}",
                "record",
                self.results_topic,  # an outbox belongs to one device: its results go where ours go
                msgpack.packb([record], use_bin_type=True),
            )
            count = bump_count(f"records/{record['run_id']}", 1)
            self.outbox.commit([entry.id], [batch], also=count)
            recovered += 1
            logger.warning("offload %s of an earlier process recorded as fallback", entry.key)
        return recovered
