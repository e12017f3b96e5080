"""What survives a restart of the agent: sequence numbers, progress through a source, a run's record count.

All of it lives in the outbox's SQLite file and changes in the transactions that write the records it
describes (the outbox's `also=`), so that after a SIGKILL what the state says and what the records say agree:

- `Counter`: numbers of one kind (samples, energy windows, result batches, starts of a run) that are never
  reused, across processes. Blocks of `block` numbers are reserved on disk before use (one write per block);
  a restart continues after the last reserved block, so numbers may skip but never repeat — an earlier
  version restarted the window counter at 0 and the outbox dropped the new batches as "duplicates".
- `SourceProgress`: which items of a source (a dataset's indexes, a watched directory's files) have their
  outcome on disk — as a record, or as an offload, whose leftover becomes a `fallback` record on the next
  start. A restart skips those and redoes the others, so a kill loses no item and records none twice.
  A dataset source makes passes: a pass that ended is complete, and the next start makes a new one.
- `bump_count`: a run's records on disk, counted where they are written (`run_end` reports it).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any, Callable, Dict, Iterable, Optional, Sequence, Tuple

from device_agent.outbox import Outbox

# (stream, item, stamp): one item of one source. `stamp` tells a file rewritten under the same name.
Origin = Tuple[str, str, str]

_PROGRESS_DDL = (
    "CREATE TABLE IF NOT EXISTS progress (stream TEXT NOT NULL, item TEXT NOT NULL, "
    "stamp TEXT NOT NULL DEFAULT '', PRIMARY KEY (stream, item)) WITHOUT ROWID"
)


class Counter:
    """Numbers of one kind that a restarted process never hands out again (thread-safe)."""

    def __init__(self, outbox: Outbox, name: str, block: int = 1024) -> None:
        self._outbox = outbox
        self._name = f"seq/{name}"
        self._block = block
        self._lock = threading.Lock()
        self._next = int(outbox.get_state(self._name) or 0)
        self._reserved = self._next

    def take(self) -> int:
        with self._lock:
            value = self._next
            self._next += 1
            if self._next > self._reserved:
                self._reserved = value + self._block
                self._outbox.set_state(self._name, str(self._reserved))
            return value


def bump_count(name: str, delta: int) -> Callable[[sqlite3.Cursor], None]:
    """Statements that add `delta` to counter `name` (for `also=`; no UPSERT: Jetson's SQLite is 3.22)."""

    def run(cur: sqlite3.Cursor) -> None:
        cur.execute("INSERT OR IGNORE INTO state (name, value) VALUES (?, '0')", (f"count/{name}",))
        cur.execute(
            "UPDATE state SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT) WHERE name = ?",
            (delta, f"count/{name}"),
        )

    return run


def read_count(outbox: Outbox, name: str) -> int:
    return int(outbox.get_state(f"count/{name}") or 0)


def mark_done(origins: Iterable[Optional[Origin]]) -> Callable[[sqlite3.Cursor], None]:
    """Statements that record these items as done (for `also=`); None entries are skipped."""
    rows = [o for o in origins if o is not None]

    def run(cur: sqlite3.Cursor) -> None:
        if rows:
            cur.executemany("INSERT OR REPLACE INTO progress (stream, item, stamp) VALUES (?, ?, ?)", rows)

    return run


def chain(*steps: Optional[Callable[[sqlite3.Cursor], None]]) -> Callable[[sqlite3.Cursor], None]:
    """One `also=` callable running `steps` in order."""

    def run(cur: sqlite3.Cursor) -> None:
        for step in steps:
            if step is not None:
                step(cur)

    return run


class SourceProgress:
    """The items of one source stream whose outcome is on disk (see the module docstring)."""

    def __init__(self, outbox: Outbox, stream: str) -> None:
        self._outbox = outbox
        self.stream = stream
        with outbox.transaction() as cur:
            cur.execute(_PROGRESS_DDL)

    def done(self) -> Dict[str, str]:
        """item -> stamp of every item done in the current pass."""
        rows = self._outbox.read("SELECT item, stamp FROM progress WHERE stream = ?", (self.stream,))
        return {str(item): str(stamp) for item, stamp in rows}

    def origin(self, item: str, stamp: str = "") -> Origin:
        return (self.stream, item, stamp)

    def begin_pass(self) -> Tuple[int, Dict[str, str]]:
        """(pass number, items already done): a new pass after a completed one, else the unfinished one."""
        state = self._pass_state()
        if state["complete"]:
            state = {"pass": int(state["pass"]) + 1, "complete": False}
            with self._outbox.transaction() as cur:
                cur.execute("DELETE FROM progress WHERE stream = ?", (self.stream,))
                self._write_pass(cur, state)
        return int(state["pass"]), self.done()

    def finish_pass(self) -> None:
        """Every item of the pass is done: the next `begin_pass` starts a new one."""
        state = self._pass_state()
        state["complete"] = True
        with self._outbox.transaction() as cur:
            cur.execute("DELETE FROM progress WHERE stream = ?", (self.stream,))
            self._write_pass(cur, state)

    def mark_now(self, item: str, stamp: str = "") -> None:
        """Done without a record (a file skipped as unreadable): remembered so that no restart re-reads it."""
        with self._outbox.transaction() as cur:
            mark_done([self.origin(item, stamp)])(cur)

    def forget(self, items: Sequence[str]) -> None:
        """Drop items that no longer exist (files removed from a watched directory): state stays bounded."""
        if items:
            with self._outbox.transaction() as cur:
                cur.executemany(
                    "DELETE FROM progress WHERE stream = ? AND item = ?", [(self.stream, i) for i in items]
                )

    def _pass_state(self) -> Dict[str, Any]:
        raw = self._outbox.get_state(f"pass/{self.stream}")
        return json.loads(raw) if raw else {"pass": 0, "complete": False}

    def _write_pass(self, cur: sqlite3.Cursor, state: Dict[str, Any]) -> None:
        cur.execute(
            "INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)",
            (f"pass/{self.stream}", json.dumps(state)),
        )
