"""Store-and-forward: a bounded on-disk outbox for offloads and result records (stdlib sqlite3, WAL).

Every result record and offload is written here before it goes to the broker, and leaves only when settled:
a record batch on the collector's receipt (on the broker's PUBACK without receipts), an offload on the cloud's
reply or at its deadline (its record, answer or `fallback`, enters in the same transaction). While the broker
is unreachable entries wait; a restarted agent finds them on disk. One process per outbox (`OutboxInUse`).

An entry's key is unique for good (numbers that survive a restart, `device_agent.durable`). A key is pending
once: put again with the same payload it is a harmless duplicate (refused, counted), with another payload an
`OutboxConflict`, never a silent drop. Nothing is kept of an entry once it has left: the collector's unique
keys, which compare content, settle re-delivery. A record entry may carry several records (`items`).
Writers may add their own statements to a put's or commit's transaction (`also`): what `durable` keeps about
a source's progress changes exactly when the records that prove it do. Bounded in entries and payload bytes:
`put` waits for room (backpressure on the inference loop), then raises `OutboxFull`.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Optional, Sequence, Tuple

import msgpack

logger = logging.getLogger(__name__)

KINDS = ("record", "offload")
_COLUMNS = "id, key, kind, topic, payload, meta, deadline_unix, created_unix, attempts, items"
_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    key TEXT NOT NULL UNIQUE,
    kind TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    meta BLOB,
    deadline_unix REAL,
    created_unix REAL NOT NULL,
    inflight INTEGER NOT NULL DEFAULT 0,
    attempts INTEGER NOT NULL DEFAULT 0,
    items INTEGER NOT NULL DEFAULT 1
);
CREATE INDEX IF NOT EXISTS entries_pending ON entries (kind, inflight, id);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
DROP TABLE IF EXISTS done;
"""
# (`done`: a tombstone per acknowledged key in earlier versions, unbounded. Dropped on open.)

Also = Optional[Callable[[sqlite3.Cursor], None]]  # extra statements for the same transaction


class OutboxFull(RuntimeError):
    """The outbox is at its bound and nothing was acknowledged in time: the broker has been away too long."""


class OutboxInUse(RuntimeError):
    """Another process has this outbox open: two agents with one device id and state directory."""


class OutboxConflict(RuntimeError):
    """A key already pending with a different payload: two different things were given one name (a bug)."""


@dataclass
class Entry:
    """One waiting message."""

    id: int
    key: str
    kind: str
    topic: str
    payload: bytes
    meta: Optional[Dict[str, Any]]
    deadline_unix: Optional[float]
    created_unix: float
    attempts: int = 0
    items: int = 1


@dataclass
class NewEntry:
    """What `put_many` takes."""

    key: str
    kind: str
    topic: str
    payload: bytes
    meta: Optional[Dict[str, Any]] = None
    deadline_unix: Optional[float] = None
    items: int = 1  # records in the payload (a batch entry), for batching by records


class Outbox:
    """A bounded, durable queue of messages for the broker, keyed for idempotence. Thread-safe."""

    def __init__(self, path: Path, *, max_entries: int = 200_000, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._holder = _lock_exclusively(self.path.with_name(self.path.name + ".lock"))
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)
        self._depth = 0
        self._delta = (0, 0)  # (entries, bytes) added by the open transaction
        try:
            self._db = _open_db(self.path)
            with self._lock:
                # Whatever was on the wire when the last process died was never acknowledged: send it again.
                self._db.execute("UPDATE entries SET inflight = 0 WHERE inflight != 0")
                self._recount()
        except BaseException:
            if hasattr(self, "_db"):
                self._db.close()
            self._holder.close()
            raise
        self.refused_duplicates = 0
        self.waited_for_room = 0

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Cursor]:
        """One write transaction (the connection is in autocommit mode otherwise); nested uses join the
        outermost one."""
        with self._lock:
            cur = self._db.cursor()
            self._depth += 1
            if self._depth == 1:
                cur.execute("BEGIN IMMEDIATE")
                self._delta = (0, 0)
            try:
                yield cur
            except BaseException:
                if self._depth == 1:
                    cur.execute("ROLLBACK")
                raise
            else:
                if self._depth == 1:
                    cur.execute("COMMIT")
                    # Counted at COMMIT only, so that a rolled-back transaction leaves the counters right.
                    self._entries += self._delta[0]
                    self._bytes += self._delta[1]
            finally:
                self._depth -= 1

    def _pending_delta(self, entries: int, size: int) -> None:
        self._delta = (self._delta[0] + entries, self._delta[1] + size)

    def _recount(self) -> None:
        row = self._db.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries").fetchone()
        self._entries, self._bytes = int(row[0]), int(row[1])

    # -- adding ---------------------------------------------------------------------------------------
    def put(
        self,
        key: str,
        kind: str,
        topic: str,
        payload: bytes,
        *,
        meta: Optional[Dict[str, Any]] = None,
        deadline_unix: Optional[float] = None,
        timeout: Optional[float] = None,
        also: Also = None,
    ) -> Optional[int]:
        """Add one entry (and run `also` in its transaction); its id, or None when an entry of that key and
        payload is already pending."""
        entry = NewEntry(key, kind, topic, payload, meta, deadline_unix)
        with self._room:
            self._wait_room([entry], timeout)
            with self._tx() as cur:
                ids = self._insert(cur, [entry])
                if also is not None:
                    also(cur)
            return ids[0]

    def put_many(self, entries: Sequence[NewEntry], *, timeout: Optional[float] = None) -> int:
        """Add entries in one transaction, waiting up to `timeout` s for room (None: wait indefinitely);
        how many were new."""
        if not entries:
            return 0
        return self.commit([], entries, timeout=timeout)[1]

    def _wait_room(
        self, entries: Sequence[NewEntry], timeout: Optional[float], freed: Tuple[int, int] = (0, 0)
    ) -> None:
        """Block (the caller holds `_room`) until `entries` fit, `freed` (entries, bytes) being removed in
        the same transaction; OutboxFull when they do not fit in time."""
        for e in entries:
            if e.kind not in KINDS:
                raise ValueError(f"unknown outbox kind {e.kind!r}")
        count, size = len(entries) - freed[0], sum(len(e.payload) for e in entries) - freed[1]
        if count > self.max_entries or size > self.max_bytes:
            raise OutboxFull(f"{count} entries of {size} bytes can never fit this outbox")
        if self._has_room(count, size):
            return
        self.waited_for_room += 1
        logger.warning("outbox full (%d entries, %d bytes): waiting for the broker", *self.usage())
        if not self._room.wait_for(lambda: self._has_room(count, size), timeout):
            raise OutboxFull(
                f"outbox {self.path} full ({self._entries}/{self.max_entries} entries, "
                f"{self._bytes}/{self.max_bytes} bytes) for {timeout} s"
            )

    def _has_room(self, count: int, size: int) -> bool:
        return self._entries + count <= self.max_entries and self._bytes + size <= self.max_bytes

    def _insert(self, cur: sqlite3.Cursor, entries: Sequence[NewEntry]) -> List[Optional[int]]:
        """Insert each new entry; its id, or None for a duplicate of a pending one."""
        now = time.time()
        ids: List[Optional[int]] = []
        for e in entries:
            meta = None if e.meta is None else msgpack.packb(e.meta, use_bin_type=True)
            row = cur.execute("SELECT payload, meta FROM entries WHERE key = ?", (e.key,)).fetchone()
            if row is not None:
                if bytes(row[0]) != e.payload or (None if row[1] is None else bytes(row[1])) != meta:
                    raise OutboxConflict(f"{e.key!r} is already pending with a different content")
                self.refused_duplicates += 1  # the same thing again: harmless
                ids.append(None)
                continue
            cur.execute(
                "INSERT INTO entries (key, kind, topic, payload, meta, deadline_unix, created_unix, items)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (e.key, e.kind, e.topic, e.payload, meta, e.deadline_unix, now, e.items),
            )
            ids.append(cur.lastrowid)
            self._pending_delta(1, len(e.payload))
        return ids

    # -- taking out -----------------------------------------------------------------------------------
    def take(self, kind: str, limit: int) -> List[Entry]:
        """The oldest entries of `kind` not on the wire, up to `limit` items (at least one entry), marked
        as on the wire."""
        with self._lock, self._tx() as cur:
            heads = cur.execute(
                "SELECT id, items FROM entries WHERE kind = ? AND inflight = 0 ORDER BY id LIMIT ?",
                (kind, limit),
            ).fetchall()
            ids: List[int] = []
            total = 0
            for entry_id, items in heads:
                if ids and total + items > limit:
                    break
                ids.append(entry_id)
                total += items
            rows = [cur.execute(f"SELECT {_COLUMNS} FROM entries WHERE id = ?", (i,)).fetchone() for i in ids]
            cur.executemany(
                "UPDATE entries SET inflight = 1, attempts = attempts + 1 WHERE id = ?", [(i,) for i in ids]
            )
        return [_entry(r) for r in rows]

    def release(self, ids: Sequence[int]) -> None:
        """Put entries back in line (their send failed, was refused, or got no receipt in time)."""
        with self._lock, self._tx() as cur:
            cur.executemany("UPDATE entries SET inflight = 0 WHERE id = ?", [(i,) for i in ids])

    def ack(self, ids: Sequence[int]) -> int:
        """Remove settled entries; how many were there."""
        return self.commit(ids, [])[0]

    def commit(
        self,
        remove: Sequence[int],
        add: Sequence[NewEntry],
        *,
        timeout: Optional[float] = None,
        also: Also = None,
        bounded: bool = True,
    ) -> Tuple[int, int]:
        """Remove entries, add others and run `also`, in one transaction (settled offloads leave as their
        records enter), waiting up to `timeout` s for room for the net growth; (removed, added).
        `bounded=False` skips the wait: for a replacement that must happen before anything can drain."""
        with self._room:
            if add and bounded:
                self._wait_room(add, timeout, freed=self._sizes(remove))
            with self._tx() as cur:
                removed = 0
                for i in remove:
                    row = cur.execute("SELECT LENGTH(payload) FROM entries WHERE id = ?", (i,)).fetchone()
                    if row is not None:
                        cur.execute("DELETE FROM entries WHERE id = ?", (i,))
                        removed += 1
                        self._pending_delta(-1, -int(row[0]))
                ids = self._insert(cur, add) if add else []
                if also is not None:
                    also(cur)
            self._room.notify_all()
        return removed, sum(i is not None for i in ids)

    def _sizes(self, ids: Sequence[int]) -> Tuple[int, int]:
        """(entries, bytes) of those of `ids` still here."""
        rows = [
            self._db.execute("SELECT LENGTH(payload) FROM entries WHERE id = ?", (i,)).fetchone() for i in ids
        ]
        found = [int(row[0]) for row in rows if row is not None]
        return len(found), sum(found)

    def oldest_pending(self, kind: str) -> Optional[float]:
        """Creation time of the oldest entry of `kind` not on the wire."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(created_unix) FROM entries WHERE kind = ? AND inflight = 0", (kind,)
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def all_of(self, kind: str) -> List[Entry]:
        with self._lock:
            cursor = self._db.execute(f"SELECT {_COLUMNS} FROM entries WHERE kind = ? ORDER BY id", (kind,))
            rows = cursor.fetchall()
        return [_entry(r) for r in rows]

    # -- small persistent state (sequence numbers, progress: device_agent.durable) -----------------------
    def transaction(self) -> ContextManager[sqlite3.Cursor]:
        """A write transaction for statements on the state tables (never `entries`: use put/commit)."""
        return self._tx()

    def read(self, sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
        """Rows of a query on the state tables."""
        with self._lock:
            return list(self._db.execute(sql, params).fetchall())

    def get_state(self, name: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    # -- introspection --------------------------------------------------------------------------------
    def usage(self) -> Tuple[int, int]:
        """(entries, payload bytes) waiting."""
        with self._lock:
            return self._entries, self._bytes

    def counts(self) -> Dict[str, int]:
        """Items waiting per kind (records, however they are grouped in entries; offloads)."""
        with self._lock:
            rows = self._db.execute("SELECT kind, SUM(items) FROM entries GROUP BY kind").fetchall()
        out = {k: 0 for k in KINDS}
        out.update({str(k): int(n) for k, n in rows})
        return out

    def waiting(self) -> Dict[str, Tuple[int, int, Optional[float]]]:
        """Per kind: (items waiting, of which on the wire, creation time of the oldest entry or None), for
        the metrics (one scan of the table: scraped every few seconds, not per sample)."""
        with self._lock:
            rows = self._db.execute(
                "SELECT kind, SUM(items), SUM(CASE WHEN inflight != 0 THEN items ELSE 0 END), "
                "MIN(created_unix) FROM entries GROUP BY kind"
            ).fetchall()
        out: Dict[str, Tuple[int, int, Optional[float]]] = {k: (0, 0, None) for k in KINDS}
        out.update({str(k): (int(n), int(sent), float(oldest)) for k, n, sent, oldest in rows})
        return out

    def wait_empty(self, kind: str, timeout: float) -> bool:
        """Wait until no entry of `kind` is left; False on timeout."""
        deadline = time.monotonic() + timeout
        with self._room:
            while self.counts()[kind]:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._room.wait(min(left, 0.05))
        return True

    def close(self) -> None:
        """Idempotent."""
        with self._lock:
            self._db.close()
            self._holder.close()  # and with it the lock


def _open_db(path: Path) -> sqlite3.Connection:
    # One connection, shared under the outbox's lock: every operation is a few statements long.
    db = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30)
    db.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a power cut may lose the last commits but never corrupts the file.
    db.execute("PRAGMA synchronous=NORMAL")
    # A bounded write-ahead log: checkpoint every 256 pages (1 MiB) and cut the file back to 1 MiB after
    # each, so the file on flash does not keep the size of its largest burst (a broker outage's backlog).
    db.execute("PRAGMA wal_autocheckpoint=256")
    db.execute("PRAGMA journal_size_limit=1048576")
    db.executescript(_SCHEMA)
    return db


def _lock_exclusively(path: Path) -> Any:
    """An open file holding an exclusive lock on `path`, or OutboxInUse. Two processes on one outbox would
    hand out the same sequence numbers and take each other's MQTT session (the client id is the device id)."""
    holder = open(path, "a+")  # noqa: SIM115 (held open for the outbox's life: the lock lives with it)
    try:
        fcntl.flock(holder.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder.close()
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise  # not another holder (ENOLCK on a file system without locks): say what it is
        raise OutboxInUse(
            f"{path.with_suffix('')} is in use by another process (is another agent running as this device, "
            "with this --state-dir?)"
        ) from exc
    return holder


def _entry(row: Tuple[Any, ...]) -> Entry:
    meta = None if row[5] is None else msgpack.unpackb(row[5], raw=False)
    return Entry(row[0], row[1], row[2], row[3], bytes(row[4]), meta, row[6], row[7], row[8], row[9])
