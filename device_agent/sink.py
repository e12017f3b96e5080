"""The records a device has finished, on their way into the outbox: one owner of that step for every task.

Finished records wait in memory for the next flush, which writes them (as entries of at most
`max_records`: one entry always fits one MQTT message) in one transaction that also removes the offloads
they settle, marks their source items done (`durable.SourceProgress`) and counts them for the run
(`durable.bump_records`). Only after that commit does a
record's `on_stored` run (a future resolved, a tally counted): a stored record is on disk.

Thread-safe: records come from the inference, link and paho threads; flushes from the link thread (and the
inference thread when the backlog is full). The housekeeping thread never waits, for room or for another
flush: the inference thread may be in a blocking flush that waits for the link (which that thread runs) to
make room.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

import msgpack

from device_agent.durable import Counter, Origin, bump_records, chain, mark_done
from device_agent.outbox import NewEntry, Outbox, OutboxFull
from protocol import validate_record

logger = logging.getLogger(__name__)

READY_BACKLOG = 4096  # finished records held in memory before the inference loop writes them itself


@dataclass
class Finished:
    """One finished record."""

    key: str
    record: Dict[str, Any]
    counted: bool = False  # one of the run's samples or frames (`run_end` counts them)
    offload_id: Optional[int] = None  # the outbox entry of the offload this record settles
    origin: Optional[Origin] = None  # the source item it came from
    on_stored: Optional[Callable[[], None]] = None  # runs once the record is on disk


class RecordSink:
    def __init__(
        self,
        *,
        run_id: str,
        outbox: Outbox,
        results_topic: str,
        batches: Counter,
        outbox_wait_s: Optional[float],
        max_records: int = 100,
    ) -> None:
        self.run_id = run_id
        self.outbox = outbox
        self.results_topic = results_topic
        self.batches = batches
        self.outbox_wait_s = outbox_wait_s
        self.max_records = max_records  # per outbox entry: one entry always fits one MQTT message
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()  # one flush at a time: entries stay in the order they finished
        self._ready: List[Finished] = []

    def add(self, finished: Finished) -> None:
        with self._lock:
            self._ready.append(finished)

    @property
    def backlog(self) -> int:
        with self._lock:
            return len(self._ready)

    def flush(self, block: bool) -> None:
        """Everything finished to the outbox in one commit (see the module docstring), then `on_stored`.

        When the commit fails (no room in time, a full disk, a record that cannot be packed) every record
        stays here for the next flush; the error is raised, except for a non-blocking flush that found no
        room."""
        if not self._flush_lock.acquire(blocking=block):
            return
        try:
            with self._lock:
                ready, self._ready = self._ready, []
            if not ready:
                return
            try:
                self._commit(ready, block)
            except BaseException as exc:
                with self._lock:  # kept, in order, for the next try
                    self._ready[:0] = ready
                if block or not isinstance(exc, OutboxFull):
                    raise
                return
        finally:
            self._flush_lock.release()
        for r in ready:
            if r.on_stored is not None:
                try:
                    r.on_stored()
                except Exception:  # one caller's callback must not keep the others from hearing back
                    logger.exception("callback of stored record %s failed", r.key)

    def _commit(self, ready: List[Finished], block: bool) -> None:
        step = self.max_records
        entries = [
            NewEntry(
                f"batch/{self.batches.take()}",
                "record",
                self.results_topic,
                msgpack.packb([r.record for r in ready[i : i + step]], use_bin_type=True),
                items=len(ready[i : i + step]),
            )
            for i in range(0, len(ready), step)
        ]
        also = chain(
            mark_done(r.origin for r in ready), bump_records(self.run_id, sum(r.counted for r in ready))
        )
        offloads = [r.offload_id for r in ready if r.offload_id is not None]
        self.outbox.commit(offloads, entries, timeout=self.outbox_wait_s if block else 0, also=also)

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

    def put_recovered(self, remove: int, record: Dict[str, Any]) -> None:
        """A record that replaces an outbox entry left by an earlier process (counted for its run)."""
        batch = NewEntry(
            f"batch/{self.batches.take()}",
            "record",
            self.results_topic,  # an outbox belongs to one device: its results go where ours go
            msgpack.packb([record], use_bin_type=True),
        )
        # Beyond the byte bound if need be: this runs at start, before the link can free any room, and it
        # replaces an entry one for one (at most the offload window's worth): waiting would never end.
        self.outbox.commit([remove], [batch], also=bump_records(str(record["run_id"]), 1), bounded=False)
