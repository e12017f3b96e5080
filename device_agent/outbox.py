"""Store-and-forward: a bounded on-disk outbox for offloads and result records (stdlib sqlite3, WAL).

Every result record and every offload is written here before it goes to the broker, and leaves only when it
is settled: a record batch on the collector's receipt (on the broker's PUBACK without receipts), an offload
on the cloud's reply or at its deadline (its record, answer or `fallback`, enters in the same transaction).
While the broker is unreachable entries simply wait; a restarted agent finds them on disk.

Each entry has an idempotent key (`inference/<run>/<device>/<seq>`, ...). A key that was already put, pending
or acknowledged, is refused, so nothing is recorded twice: acknowledged keys stay behind as tombstones (key
and time only) for `keep_done_s`. A record entry may carry several records (`items`; the agent writes the
records that finish together as one entry: one insert per window instead of one per sample); such a batch
lists its records' keys in `meta["keys"]`, and each becomes a tombstone when the batch is acknowledged.

The outbox is bounded in entries and payload bytes; `put` waits for room (backpressure on the inference loop)
and raises `OutboxFull` when none appears in time.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

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
CREATE TABLE IF NOT EXISTS done (key TEXT PRIMARY KEY, done_unix REAL NOT NULL) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
"""


class OutboxFull(RuntimeError):
    """The outbox is at its bound and nothing was acknowledged in time: the broker has been away too long."""


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

    def __init__(
        self,
        path: Path,
        *,
        max_entries: int = 200_000,
        max_bytes: int = 512 * 1024 * 1024,
        keep_done_s: float = 7 * 24 * 3600.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self._lock = threading.RLock()
        self._room = threading.Condition(self._lock)
        # One connection shared under a lock: every operation is a few statements long.
        self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL in WAL mode: a power cut may lose the last commits but never corrupts the file.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._depth = 0
        with self._lock:
            # Whatever was on the wire when the last process died was never acknowledged: send it again.
            self._db.execute("UPDATE entries SET inflight = 0 WHERE inflight != 0")
            self._db.execute("DELETE FROM done WHERE done_unix < ?", (time.time() - keep_done_s,))
            self._recount()
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
            try:
                yield cur
            except BaseException:
                if self._depth == 1:
                    cur.execute("ROLLBACK")
                    self._recount()  # counters moved inside the transaction that just vanished
                raise
            else:
                if self._depth == 1:
                    cur.execute("COMMIT")
            finally:
                self._depth -= 1

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
    ) -> Optional[int]:
        """Add one entry; its id, or None when the key was already put (never recorded twice)."""
        entry = NewEntry(key, kind, topic, payload, meta, deadline_unix)
        with self._room:
            self._wait_room([entry], timeout)
            return self._insert([entry])[0]

    def put_many(self, entries: Sequence[NewEntry], *, timeout: Optional[float] = None) -> int:
        """Add entries in one transaction, waiting up to `timeout` s for room (None: wait indefinitely);
        how many were new (keys already put are refused)."""
        if not entries:
            return 0
        with self._room:
            self._wait_room(entries, timeout)
            return self._insert_many(entries)

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

    def _insert(self, entries: Iterable[NewEntry]) -> List[Optional[int]]:
        """Insert one by one, returning each id (None: key already put or acknowledged)."""
        ids: List[Optional[int]] = []
        now = time.time()
        added = added_bytes = 0
        with self._tx() as cur:
            for e in entries:
                if cur.execute("SELECT 1 FROM done WHERE key = ?", (e.key,)).fetchone():
                    ids.append(None)
                    self.refused_duplicates += 1
                    continue
                meta = None if e.meta is None else msgpack.packb(e.meta, use_bin_type=True)
                cur.execute(
                    "INSERT OR IGNORE INTO entries (key, kind, topic, payload, meta, deadline_unix,"
                    " created_unix, items) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                    (e.key, e.kind, e.topic, e.payload, meta, e.deadline_unix, now, e.items),
                )
                if cur.rowcount == 0:
                    ids.append(None)
                    self.refused_duplicates += 1
                    continue
                ids.append(cur.lastrowid)
                added, added_bytes = added + 1, added_bytes + len(e.payload)
        # Counted after COMMIT so that a rolled-back transaction leaves the counters right.
        self._entries += added
        self._bytes += added_bytes
        return ids

    def _insert_many(self, entries: Sequence[NewEntry]) -> int:
        """Insert a batch in one statement (the per-record path of the agent: ~5x cheaper than `_insert`)."""
        now = time.time()
        rows = [
            (
                e.key,
                e.kind,
                e.topic,
                e.payload,
                None if e.meta is None else msgpack.packb(e.meta, use_bin_type=True),
                e.deadline_unix,
                now,
                e.items,
                e.key,
            )
            for e in entries
        ]
        before = self._db.total_changes
        with self._tx() as cur:
            cur.executemany(
                "INSERT OR IGNORE INTO entries (key, kind, topic, payload, meta, deadline_unix, created_unix,"
                " items) SELECT ?, ?, ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM done WHERE key = ?)",
                rows,
            )
        added = self._db.total_changes - before
        if added == len(entries):
            self._entries += added
            self._bytes += sum(len(e.payload) for e in entries)
        else:  # some keys were refused: count from the table rather than guess which
            self.refused_duplicates += len(entries) - added
            row = self._db.execute(
                "SELECT COUNT(*), COALESCE(SUM(LENGTH(payload)), 0) FROM entries"
            ).fetchone()
            self._entries, self._bytes = int(row[0]), int(row[1])
        return added

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
        """Remove acknowledged entries, keeping their keys as tombstones; how many were there."""
        with self._room:
            removed = self._remove(ids)
            self._room.notify_all()
        return removed

    def commit(
        self, remove: Sequence[int], add: Sequence[NewEntry], *, timeout: Optional[float] = None
    ) -> int:
        """Remove entries and add others in one transaction (settled offloads leave as their records enter),
        waiting up to `timeout` s for room for the net growth; how many were removed."""
        with self._room:
            if add:
                self._wait_room(add, timeout, freed=self._sizes(remove))
            with self._tx():  # nested: one transaction for both
                removed = self._remove(remove)
                if add:
                    self._insert_many(add)
            self._room.notify_all()
        return removed

    def _sizes(self, ids: Sequence[int]) -> Tuple[int, int]:
        size = 0
        count = 0
        for i in ids:
            row = self._db.execute("SELECT LENGTH(payload) FROM entries WHERE id = ?", (i,)).fetchone()
            if row is not None:
                count, size = count + 1, size + int(row[0])
        return count, size

    def _remove(self, ids: Sequence[int]) -> int:
        now = time.time()
        removed = removed_bytes = 0
        with self._tx() as cur:
            for i in ids:
                row = cur.execute(
                    "SELECT key, LENGTH(payload), meta FROM entries WHERE id = ?", (i,)
                ).fetchone()
                if row is None:
                    continue
                cur.execute("DELETE FROM entries WHERE id = ?", (i,))
                keys = [row[0]]
                if row[2] is not None:  # a batch names its records: they are tombstoned one by one
                    keys += list(msgpack.unpackb(row[2], raw=False).get("keys", []))
                cur.executemany(
                    "INSERT OR REPLACE INTO done (key, done_unix) VALUES (?, ?)", [(k, now) for k in keys]
                )
                removed, removed_bytes = removed + 1, removed_bytes + int(row[1])
        self._entries -= removed
        self._bytes -= removed_bytes
        return removed

    def oldest_pending(self, kind: str) -> Optional[float]:
        """Creation time of the oldest entry of `kind` not on the wire."""
        with self._lock:
            row = self._db.execute(
                "SELECT MIN(created_unix) FROM entries WHERE kind = ? AND inflight = 0", (kind,)
            ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    def all_of(self, kind: str) -> List[Entry]:
        with self._lock:
            rows = self._db.execute(
                f"SELECT {_COLUMNS} FROM entries WHERE kind = ? ORDER BY id",
                (kind,),
            ).fetchall()
        return [_entry(r) for r in rows]

    # -- small persistent state (next sequence number of a run) ---------------------------------------
    def get_state(self, name: str) -> Optional[str]:
        with self._lock:
            row = self._db.execute("SELECT value FROM state WHERE name = ?", (name,)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, name: str, value: str) -> None:
        with self._lock, self._tx() as cur:
            cur.execute("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", (name, value))

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

    def is_done(self, key: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM done WHERE key = ?", (key,)).fetchone() is not None

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
        with self._lock:
            self._db.close()


def _entry(row: Tuple[Any, ...]) -> Entry:
    meta = None if row[5] is None else msgpack.unpackb(row[5], raw=False)
    return Entry(row[0], row[1], row[2], row[3], bytes(row[4]), meta, row[6], row[7], row[8], row[9])
