"""One run of one device, as every agent (classification or camera) has it: outbox, numbers, sink, link.

`RunSession` owns the steps both agents share, in the order that keeps them honest:
- `open`: the outbox (one process per device: `OutboxInUse`), the record sink and the MQTT link;
- `connect`: the link up, or `BrokerUnusable` for what no retry heals; only then the run remembered (old
  runs' state forgotten, `durable.remember_run`), the number of this start and the `run` record, so that a
  device refused by the broker, restarted by systemd every 10 s, leaves no trail of empty runs;
- `finish`: every finished record to the outbox, `run_end` with the run's count, the outbox drained (bounded);
- `close`: the link and the outbox closed, whatever failed before.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Callable, Dict, Optional

from device_agent.durable import Counter, read_records, remember_run, upgrade_state
from device_agent.keys import entry_key, new_run_id, run_state
from device_agent.link import Link, ReplyHandler
from device_agent.outbox import Outbox
from device_agent.sink import RecordSink
from protocol.mqtt import BrokerUnusable

logger = logging.getLogger(__name__)


class RunSession:
    """`config` is an `AgentConfig` or a `CameraConfig` (the same names for what is shared)."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.device_id: str = config.device_id
        self.run_id: str = config.run_id or new_run_id(config.device_id)
        self.start_no = 0
        self._closed = threading.Event()

    def open(self, on_reply: ReplyHandler, tick_s: float) -> None:
        cfg = self.config
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            cfg.state_dir / f"outbox-{self.device_id}.sqlite",
            max_entries=cfg.outbox_max_entries,
            max_bytes=cfg.outbox_max_bytes,
        )
        try:
            upgrade_state(self.outbox)
            self.sink = RecordSink(
                run_id=self.run_id,
                outbox=self.outbox,
                results_topic=cfg.topics.results(self.device_id),
                batches=Counter(self.outbox, "batch"),
                outbox_wait_s=cfg.outbox_wait_s,
                max_records=cfg.results_batch,
            )
            self.link = Link.for_config(cfg, self.outbox, on_reply, tick_s)
        except BaseException:
            self.close()
            raise

    def counter(self, kind: str) -> Counter:
        """Numbers of `kind` (`sample`, `window`) within this run, never reused across its processes."""
        return Counter(self.outbox, kind, self.run_id)

    def has_run_before(self) -> bool:
        """Whether an earlier process of this run id numbered a sample (a frame) on this device."""
        return self.outbox.get_state(run_state("seq/sample", self.run_id)) is not None

    def stop_waiting_for_room(self) -> None:
        """After OutboxFull: closing must not wait `outbox_wait_s` again (systemd's stop timeout is 60 s)."""
        self.sink.outbox_wait_s = 0.0

    def connect(self, run_record: Callable[[], Dict[str, Any]]) -> None:
        """Start the link; BrokerUnusable when the broker refuses us for good. A broker that is merely down
        is retried in the background (the outbox holds everything). Then the `run` record."""
        cfg = self.config
        self.link.start()
        if not self.link.wait_connected(cfg.connect_timeout_s) and self.link.refused is not None:
            raise BrokerUnusable(self.link.refused)
        if not self.link.connected.is_set():
            logger.warning(
                "broker %s:%d not reachable yet (%s): running from the outbox",
                cfg.broker.host,
                cfg.broker.port,
                self.link.last_error or "no answer",
            )
        # Only now is this start part of the run: a start the broker refuses leaves no state behind.
        forgotten = remember_run(self.outbox, self.run_id)
        if forgotten:
            logger.info("forgot the state of %d old runs: %s", len(forgotten), ", ".join(forgotten))
        # One per start of the run: a resumed run's run/run_end never collide with an earlier process's.
        self.start_no = Counter(self.outbox, "start", self.run_id, block=1).take()
        self.emit_once("run", run_record())

    def emit_once(self, kind: str, record: Dict[str, Any]) -> None:
        """A run-level record (`run`, `idle_baseline`, `run_end`) of this start of the run."""
        self.sink.emit(record, entry_key(kind, self.run_id, self.device_id, self.start_no))

    def records(self) -> int:
        """The run's records on disk, over every process that took part in it."""
        return read_records(self.outbox, self.run_id)

    def finish(self, run_end: Callable[[int], Dict[str, Any]]) -> Dict[str, int]:
        """Finished records to the outbox, then `run_end(count)`, then the outbox drained (bounded by
        `close_timeout_s`); what is left in the outbox (sent on the next start)."""
        self.sink.flush(block=True)
        self.emit_once("run_end", run_end(self.records()))
        if not self.link.drain(self.config.close_timeout_s):
            logger.warning(
                "closing with %s entries still in the outbox %s (sent next start)",
                self.outbox.counts(),
                self.outbox.path,
            )
        return self.outbox.counts()

    def close(self) -> None:
        """Whatever `open` got to, closed (idempotent); each part even when the one before fails."""
        if self._closed.is_set():
            return
        self._closed.set()
        link, outbox = getattr(self, "link", None), getattr(self, "outbox", None)
        try:
            if link is not None:
                link.close()
        finally:
            if outbox is not None:
                outbox.close()

    @property
    def refused_records(self) -> int:
        return int(self.link.stats["refused_records"])

    @property
    def refused(self) -> Optional[str]:
        """Why the broker refused us for good, if it did."""
        refused = self.link.refused
        return None if refused is None else str(refused)
