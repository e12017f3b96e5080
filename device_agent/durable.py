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
- `bump_records`: a run's records on disk, counted where they are written (`run_end` reports it).
- `remember_run`: the state of the last `KEEP_RUNS` runs is kept, older runs' is dropped (bounded state).
"""

from __future__ import annotations

import json
import sqlite3
import threading
from typing import Any, Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from device_agent.keys import RUN_STATE, run_state, source_stream
from device_agent.outbox import Outbox

# (stream, item, stamp): one item of one source. `stamp` tells a file rewritten under the same name.
Origin = Tuple[str, str, str]

KEEP_RUNS = 100  # runs whose state a device keeps (to resume them, or count their records)

_PROGRESS_DDL = (
    "CREATE TABLE IF NOT EXISTS progress (stream TEXT NOT NULL, item TEXT NOT NULL, "
    "stamp TEXT NOT NULL DEFAULT '', PRIMARY KEY (stream, item)) WITHOUT ROWID"
)


class Counter:
    """Numbers of one kind (of one run) that a restarted process never hands out again (thread-safe)."""

    def __init__(self, outbox: Outbox, kind: str, run_id: Optional[str] = None, block: int = 1024) -> None:
        self._outbox = outbox
        self._name = f"seq/{kind}" if run_id is None else run_state(f"seq/{kind}", run_id)
        self._block = block
        self._lock = threading.Lock()
        self._next = int(outbox.get_state(self._name) or 0)
        self._reserved = self._next

    def take(self) -> int:
        with self._lock:
            value = self._next
            if value + 1 > self._reserved:
                # On disk first: a failed write reserves nothing, and hands out no number.
                reserved = value + self._block
                with self._outbox.transaction() as cur:
                    _raise_to(cur, self._name, reserved)
                self._reserved = reserved
            self._next = value + 1
            return value


def _raise_to(cur: sqlite3.Cursor, name: str, value: int) -> None:
    """A counter's state row at least `value`: never backwards, whoever wrote it last (no UPSERT: Jetson's
    SQLite is 3.22)."""
    cur.execute("INSERT OR IGNORE INTO state (name, value) VALUES (?, '0')", (name,))
    cur.execute(
        "UPDATE state SET value = ? WHERE name = ? AND CAST(value AS INTEGER) < ?", (str(value), name, value)
    )


GLOBAL_COUNTERS = ("batch", "runs")  # `seq/<kind>` of the counters that belong to no run


def upgrade_state(outbox: Outbox) -> None:
    """Rename the state of versions before 2026-12: a run's sample counter was `seq/<run_id>` (now
    `seq/sample/<run_id>`), so that an upgraded device resumes its run without reusing sample numbers."""
    rows = outbox.read("SELECT name, value FROM state WHERE substr(name, 1, 4) = 'seq/'")
    old = [(n, v) for n, v in rows if "/" not in n[4:] and n[4:] not in GLOBAL_COUNTERS]
    if not old:
        return
    with outbox.transaction() as cur:
        for name, value in old:
            _raise_to(cur, run_state("seq/sample", name[4:]), int(value))
            cur.execute("DELETE FROM state WHERE name = ?", (name,))


def bump_records(run_id: str, delta: int) -> Callable[[sqlite3.Cursor], None]:
    """Statements that add `delta` to a run's record count (for `also=`; no UPSERT: Jetson's SQLite is
    3.22)."""
    name = run_state("count/records", run_id)

    def run(cur: sqlite3.Cursor) -> None:
        if delta:
            cur.execute("INSERT OR IGNORE INTO state (name, value) VALUES (?, '0')", (name,))
            cur.execute(
                "UPDATE state SET value = CAST(CAST(value AS INTEGER) + ? AS TEXT) WHERE name = ?",
                (delta, name),
            )

    return run


def read_records(outbox: Outbox, run_id: str) -> int:
    """A run's records on disk, over every process that took part in it (`run_end` reports it)."""
    return int(outbox.get_state(run_state("count/records", run_id)) or 0)


def remember_run(outbox: Outbox, run_id: str, keep: int = KEEP_RUNS) -> List[str]:
    """Note that `run_id` starts now and forget the state of all but the `keep` runs started last, so that a
    device's state stays bounded however often it restarts; the runs forgotten."""
    order = Counter(outbox, "runs", block=1).take()  # starts in order, whatever the clock does
    with outbox.transaction() as cur:
        cur.execute(
            "INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)",
            (run_state("started", run_id), str(order)),
        )
    rows = outbox.read("SELECT name, value FROM state WHERE substr(name, 1, 8) = 'started/'")
    newest_first = sorted(rows, key=lambda row: int(row[1]), reverse=True)
    old = [str(name)[len("started/") :] for name, _ in newest_first[keep:]]
    for run in old:
        forget_run(outbox, run)
    return old


def forget_run(outbox: Outbox, run_id: str) -> None:
    """Drop everything `durable` keeps of one run: it can no longer be resumed."""
    names = [run_state(what, run_id) for what in RUN_STATE + ("started",)]
    streams = source_stream(run_id, "")  # every source stream of the run, and their pass state
    passes = run_state("pass", streams)
    with outbox.transaction() as cur:
        cur.executemany("DELETE FROM state WHERE name = ?", [(n,) for n in names])
        cur.execute("DELETE FROM state WHERE substr(name, 1, ?) = ?", (len(passes), passes))
        cur.execute(_PROGRESS_DDL)
        cur.execute("DELETE FROM progress WHERE substr(stream, 1, ?) = ?", (len(streams), streams))


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
        raw = self._outbox.get_state(run_state("pass", self.stream))
        return json.loads(raw) if raw else {"pass": 0, "complete": False}

    def _write_pass(self, cur: sqlite3.Cursor, state: Dict[str, Any]) -> None:
        cur.execute(
            "INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)",
            (run_state("pass", self.stream), json.dumps(state)),
        )
