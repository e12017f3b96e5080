"""The collector: result records from MQTT into SQL, committed before they are acknowledged.

It subscribes `<root>/+/results` with QoS 1 on a persistent session (clean_start=False, a session expiry), so
the broker queues results while it is away. paho runs with `manual_ack`: the PUBACK goes out only after the
transaction holding the message's records has committed, so a crash in between makes the broker re-deliver,
and the unique keys make re-delivery write nothing twice (same key is a duplicate only with the same content,
see `ingest`). A malformed message, an invalid record (NaN, bad ids), a record of another device or another
device's run, a row the database refuses: each is counted, logged with its topic and kept once in
`rejected_records` (keyed by topic and content) in its batch's transaction, then acknowledged so that it does
not block the queue. The broker sends at most `max_inflight_messages` (1000) unacknowledged: bounded memory.

A device that asks (ResponseTopic = its `receipts` topic, CorrelationData = a batch token) gets a receipt
after the commit, saying how many records were stored and how many refused (`protocol.Receipt`); it keeps
them in its outbox until then: a broker killed after its PUBACK but before delivering to us loses nothing.

Threads: paho's network thread decodes and validates; one writer thread batches, writes and acks. They overlap
on two cores because sqlite3 and psycopg release the GIL while the database works. While the database is down
a batch is retried with back-off, never refused over it (a stop meanwhile leaves it unacknowledged); a fault
of the database that does not pass (SQLite's "no such table") stops the writer, for systemd to restart us.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Union

import paho.mqtt.client as mqtt
from sqlalchemy.exc import SQLAlchemyError

from edgecascade.systemd import Watchdog
from protocol.capabilities import BrokerOffer, RoleNeeds, session_note
from protocol.capabilities import refusal as broker_refusal
from protocol.codec import encode_receipt
from protocol.mqtt import (
    BrokerAddress,
    BrokerUnusable,
    connect_properties,
    new_client,
    permanent_connack_refusal,
    publish_properties,
)
from protocol.topics import Topics
from results_db.database import is_schema_fault, is_transient, open_database
from results_db.ingest import RecordWriter, Rejected, WriteCounts
from results_db.messages import Inbound, Message, decode_message

logger = logging.getLogger(__name__)

STAT_KEYS = (
    "messages",  # MQTT messages taken from the broker
    "received",  # records in well-formed messages
    "inserted",  # data rows newly written (inferences, energy windows, idle baselines, frames)
    "duplicates",  # data rows already present: re-delivery
    "run_records",  # run / run_end records applied
    "rejected",  # records refused (invalid, wrong device, refused by the database) + undecodable messages
    "rejected_messages",  # messages with at least one refused record, or undecodable
    "batches",  # transactions committed
    "db_retries",  # transactions retried because the database was unavailable
    "receipts",  # receipts sent to devices for settled batches
)
# The collector reads `<root>/+/results` at QoS 1 and answers with small receipts.
COLLECTOR_NEEDS = RoleNeeds("collector", wildcards=True)
# A backlog (a restart, a burst): what is queued already goes into one transaction, up to this many batches.
BACKLOG_BATCHES = 8


@dataclass(frozen=True)
class CollectorConfig:
    """How the collector connects, where it writes, and how it batches."""

    broker: BrokerAddress
    topics: Topics = field(default_factory=Topics)
    db_url: Union[str, Path, None] = None
    batch_size: int = 500  # flush once this many records are pending (with what is queued: BACKLOG_BATCHES)
    flush_ms: float = 200.0  # ... or once the oldest pending message has waited this long
    client_id: str = "edgecascade-collector"  # fixed: the persistent session is keyed by it
    session_expiry_s: int = 7 * 24 * 3600
    connect_timeout_s: float = 10.0
    retry_max_s: float = 5.0  # back-off ceiling while the database is unavailable
    # stop() waits this long for a writer hung in the database: less than systemd's TimeoutStopSec (30 s)
    stop_timeout_s: float = 10.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.flush_ms <= 0:
            raise ValueError(f"flush_ms must be > 0, got {self.flush_ms}")
        if not self.stop_timeout_s > 0:
            raise ValueError(f"stop_timeout_s must be > 0, got {self.stop_timeout_s}")


@dataclass(frozen=True)
class Committed:
    """One committed transaction, for `Collector.observers`: the records written (of which `counts.refused`
    were refused by index), the records refused before (kept in rejected_records), and the commit's time."""

    records: Sequence[Dict[str, Any]]
    counts: WriteCounts
    rejected: Sequence[Rejected]
    seconds: float


class Collector:
    """MQTT → SQL for result records. `start()`, then `stats`, then `stop()`."""

    def __init__(self, config: CollectorConfig) -> None:
        self.config = config
        self.watchdog = Watchdog(healthy=lambda: self.healthy)
        self._stats = dict.fromkeys(STAT_KEYS, 0)
        self._stats_lock = threading.Lock()
        self._inbox: queue.Queue[Inbound] = queue.Queue()
        self._stop = threading.Event()
        self._subscribed = threading.Event()
        self._generation = 0
        self._client: Optional[mqtt.Client] = None
        self._writer_thread: Optional[threading.Thread] = None
        self._writer: Optional[RecordWriter] = None
        self.failed: Optional[BaseException] = None  # set if the writer thread died
        self.refused: Optional[str] = None  # why the broker refuses our login for good
        # Told of each committed transaction (the metrics, `results_db.collector_metrics`), before its acks.
        self.observers: List[Callable[[Committed], None]] = []

    # -- lifecycle -----------------------------------------------------------------------------------
    def start(self) -> Collector:
        """Open (and migrate) the database, connect, subscribe; raise if not subscribed in time."""
        cfg = self.config
        engine = open_database(cfg.db_url)
        self._writer = RecordWriter(engine)
        client = new_client(cfg.broker, cfg.client_id, on_connect=self._on_connect, manual_ack=True)
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_disconnect = self._on_disconnect
        self._client = client
        client.connect_async(
            cfg.broker.host,
            cfg.broker.port,
            clean_start=False,
            properties=connect_properties(cfg.session_expiry_s),
        )
        client.loop_start()
        self._writer_thread = threading.Thread(target=self._run_writer, name="collector-writer", daemon=True)
        self._writer_thread.start()
        deadline = time.monotonic() + cfg.connect_timeout_s
        while not self._subscribed.wait(0.05) and self.refused is None and time.monotonic() < deadline:
            pass
        if self.refused is not None:
            self.stop()
            raise BrokerUnusable(self.refused)
        if not self._subscribed.is_set():
            self.stop()
            raise RuntimeError(
                f"collector could not subscribe at {cfg.broker.host}:{cfg.broker.port} "
                f"within {cfg.connect_timeout_s}s"
            )
        self.watchdog.ready(f"collecting {cfg.topics.all_results}")
        return self

    def stop(self) -> None:
        """Commit and acknowledge what has arrived, then disconnect (the session stays on the broker).

        While the database is down nothing more is written: what is not committed stays unacknowledged,
        and the broker delivers it again to the next collector of this session."""
        self._stop.set()
        if self._writer_thread is not None:
            self._writer_thread.join(self.config.stop_timeout_s)
            if self._writer_thread.is_alive():
                logger.warning(
                    "the writer is still in the database after %.0fs; leaving its batch unacknowledged",
                    self.config.stop_timeout_s,
                )
            self._writer_thread = None
        if self._client is not None:
            self._client.disconnect()
            self._client.loop_stop()
            self._client = None
        if self._writer is not None:
            self._writer.engine.dispose()
            self._writer = None
        self.watchdog.stopping()

    def __enter__(self) -> Collector:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> Dict[str, int]:
        """A snapshot of the counters (see `STAT_KEYS`)."""
        with self._stats_lock:
            return dict(self._stats)

    def inbox_depth(self) -> int:
        """Messages decoded and waiting for the writer."""
        return self._inbox.qsize()

    def _count(self, **deltas: int) -> None:
        with self._stats_lock:
            for key, delta in deltas.items():
                self._stats[key] += delta

    # -- paho callbacks (network thread) -------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            why = permanent_connack_refusal(reason)
            if why is not None:
                broker = self.config.broker
                self.refused = f"broker {broker.host}:{broker.port} refused {broker.username!r}: {why}"
            return
        broker = self.config.broker
        offer = BrokerOffer.from_connack(props)
        unfit = broker_refusal(offer, COLLECTOR_NEEDS, f"{broker.host}:{broker.port}")
        if unfit is not None:  # start() raises BrokerUnusable with it; no reconnect makes it fit
            self.refused = unfit
            client.disconnect()
            return
        note = session_note(offer, self.config.session_expiry_s)
        if note is not None:
            logger.warning("collector: %s", note)
        self._generation += 1
        logger.info("collector connected (session %s)", "resumed" if flags.session_present else "new")
        client.subscribe(self.config.topics.all_results, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        failed = [r for r in reasons if r.is_failure]
        if failed:
            logger.error("subscription to %s refused: %s", self.config.topics.all_results, failed)
            return
        logger.info("subscribed to %s (QoS 1, persistent session)", self.config.topics.all_results)
        self._subscribed.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not self._stop.is_set():
            logger.warning("collector disconnected (%s); paho reconnects", reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        props = message.properties
        self._inbox.put(
            self._decode(
                Message(
                    self._generation,
                    message.mid,
                    message.qos,
                    message.topic,
                    bytes(message.payload),
                    getattr(props, "ResponseTopic", None),
                    getattr(props, "CorrelationData", None),
                )
            )
        )

    # -- writer thread -------------------------------------------------------------------------------
    @property
    def healthy(self) -> bool:
        """False once the writer thread has died (a bug): the service should exit and be restarted."""
        return self.failed is None and (self._writer_thread is None or self._writer_thread.is_alive())

    def _run_writer(self) -> None:
        try:
            self._write_loop()
        except BaseException as exc:
            self.failed = exc
            logger.exception("collector writer thread died; unacknowledged results stay on the broker")

    def _write_loop(self) -> None:
        pending: List[Inbound] = []
        rows = 0
        oldest = 0.0
        flush_s = self.config.flush_ms / 1000.0
        while True:
            self.watchdog.beat()
            stopping = self._stop.is_set()
            timeout = max(0.0, oldest + flush_s - time.monotonic()) if pending else 0.1
            try:
                item: Optional[Inbound] = self._inbox.get(timeout=0 if stopping else timeout)
            except queue.Empty:
                item = None
            if item is not None:
                if not pending:
                    oldest = time.monotonic()
                pending.append(item)
                rows += len(item.records)
            due = pending and (rows >= self.config.batch_size or time.monotonic() - oldest >= flush_s)
            if due:
                rows = self._take_queued(pending, rows)
            if due or (pending and item is None and stopping):
                if not self._flush(pending):
                    return  # stopped while the database was down: the rest stays unacknowledged
                pending, rows = [], 0
            if stopping and item is None and not pending:
                return

    def _take_queued(self, pending: List[Inbound], rows: int) -> int:
        """Add what is queued already to a due batch, up to BACKLOG_BATCHES batches' rows; wait for nothing.

        Under a backlog the per-transaction costs (the run and device rows, the round trips, the commit) then
        fall on thousands of rows instead of `batch_size`: into PostgreSQL, batches of 500 cost about half
        again as much database CPU per row as batches of 5,000 (bench/collector_bench.py)."""
        limit = self.config.batch_size * BACKLOG_BATCHES
        while rows < limit:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                break
            pending.append(item)
            rows += len(item.records)
        return rows

    def _decode(self, message: Message) -> Inbound:
        """Decode and validate; what is refused is counted, logged and set aside for `rejected_records`."""
        item = decode_message(message, self.config.topics)
        self._count(
            messages=1,
            received=item.received,
            rejected=len(item.rejected),
            rejected_messages=1 if item.rejected else 0,
        )
        if item.rejected:
            logger.warning(
                "rejected %d of %d records on %s: %s",
                len(item.rejected),
                max(item.received, 1),
                message.topic,
                item.rejected[0].reason,
            )
        return item

    def _flush(self, pending: List[Inbound]) -> bool:
        """Write the batch in one transaction, then ack; on a bad row, fall back to one message at a time.

        False when stopped before the database took the batch: nothing of it acknowledged (the broker
        delivers it again)."""
        assert self._writer is not None
        records = [r for item in pending for r in item.records]
        owner = [item for item in pending for _ in item.records]  # which message each record came in
        rejected = [r for item in pending for r in item.rejected]
        delay = 0.1
        while True:
            try:
                topics = [item.message.topic for item in owner]
                began = time.monotonic()
                counts = self._writer.write(records, rejected, topics)
                self._observe(Committed(records, counts, rejected, time.monotonic() - began))
                break
            except (SQLAlchemyError, ArithmeticError, ValueError, TypeError) as exc:
                # A passing fault: keep the batch and retry; never refuse (ack, receipt) records over it.
                if is_transient(exc):
                    if not self._wait_to_retry(exc, delay):
                        return False
                    delay = min(delay * 2, self.config.retry_max_s)
                    continue
                if is_schema_fault(exc):
                    # Not a row's fault but the database's (SQLite: no such table): refusing every record
                    # over it would empty the devices' outboxes into rejected_records. The writer dies, the
                    # service exits for its supervisor, the broker keeps the batch.
                    raise
                # A row the database refuses (constraint, type, range: sqlite3 raises OverflowError for
                # integers beyond 64 bits). Find the message that carries it; the others still land.
                if len(pending) == 1:
                    return self._refuse(pending[0], exc)
                logger.info("batch of %d messages refused (%s); writing them one by one", len(pending), exc)
                return all(self._flush([item]) for item in pending)
        for item in pending:
            item.stored = len(item.records)
        for refusal in counts.refused:
            owner[refusal.index].stored -= 1
            owner[refusal.index].reasons.append(refusal.reason)
        if counts.refused:
            self._count(
                rejected=len(counts.refused),
                rejected_messages=len({id(owner[r.index]) for r in counts.refused}),
            )
            logger.warning(
                "refused %d records (kept in rejected_records): %s",
                len(counts.refused),
                counts.refused[0].reason,
            )
        self._tally(counts)
        self._ack(pending)
        return True

    def _wait_to_retry(self, exc: BaseException, delay: float) -> bool:
        """Count and log a passing database fault, wait `delay`; False if stopped meanwhile (or before)."""
        self._count(db_retries=1)
        logger.warning("database unavailable (%s); retrying in %.1fs", getattr(exc, "orig", exc), delay)
        self.watchdog.beat()
        return not self._stop.wait(delay)

    def _refuse(self, item: Inbound, exc: Exception) -> bool:
        """The database refused this message's rows: keep them all in rejected_records instead.
        False when stopped before rejected_records took them (nothing acknowledged)."""
        assert self._writer is not None
        orig = getattr(exc, "orig", exc)
        logger.warning("database refused %d records on %s: %s", len(item.records), item.message.topic, orig)
        device_id = item.records[0]["device_id"] if item.records else None
        rejected = item.rejected + [
            Rejected.of(item.message.topic, device_id, r, f"database: {orig}") for r in item.records
        ]
        while True:
            try:
                began = time.monotonic()
                self._writer.write([], rejected)
                self._observe(Committed([], WriteCounts(), rejected, time.monotonic() - began))
                break
            except SQLAlchemyError as again:
                if not is_transient(again):
                    raise  # not even rejected_records takes it: let the service die and be restarted
                if not self._wait_to_retry(again, self.config.retry_max_s):
                    return False
        self._count(rejected=len(item.records), rejected_messages=1)
        item.rejected, item.records = rejected, []
        self._ack([item])
        return True

    def _observe(self, committed: Committed) -> None:
        for observe in self.observers:
            try:
                observe(committed)
            except Exception:  # an observer's bug must not stop the writer
                logger.exception("commit observer failed")

    def _tally(self, counts: WriteCounts) -> None:
        self._count(
            inserted=counts.inserted,
            duplicates=counts.duplicates,
            run_records=counts.run_records,
            batches=1,
        )

    def _ack(self, items: List[Inbound]) -> None:
        """PUBACK settled messages, and send the receipts their devices asked for."""
        client = self._client
        if client is None:
            return
        generation = self._generation
        for item in items:
            message = item.message
            # After a reconnect the broker re-sends what we had not acked; acking the old packet id could
            # acknowledge another message, so we let the re-delivered copy (a duplicate) carry the ack.
            if message.generation == generation and message.qos > 0:
                client.ack(message.mid, message.qos)
            if message.receipt_to is not None and message.correlation is not None:
                self._send_receipt(client, item)

    def _send_receipt(self, client: mqtt.Client, item: Inbound) -> None:
        message = item.message
        # Only to the sender's own receipts topic: a device must not make us publish anywhere else.
        try:
            own = self.config.topics.receipts(self.config.topics.device_of(message.topic))
        except ValueError:  # a device id no topic can be built for: it gets no receipt
            own = None
        if own is None or message.receipt_to != own:
            logger.warning("ignored receipt topic %r on %s", message.receipt_to, message.topic)
            return
        properties = publish_properties(correlation_data=message.correlation)
        client.publish(own, encode_receipt(item.receipt()), qos=1, properties=properties)
        self._count(receipts=1)
