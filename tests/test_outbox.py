"""The on-disk outbox: keys, acknowledgement, bounds and backpressure, survival of a restart."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import pytest

from device_agent.outbox import NewEntry, Outbox, OutboxConflict, OutboxFull


def test_entries_leave_only_when_acknowledged_and_a_pending_key_is_not_taken_twice(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    ids = [box.put(f"inference/r/d/{i}", "record", "t/results", b"x" * 10) for i in range(5)]
    assert all(isinstance(i, int) for i in ids)
    taken = box.take("record", 3)
    assert [e.key for e in taken] == ["inference/r/d/0", "inference/r/d/1", "inference/r/d/2"]
    assert [e.key for e in box.take("record", 10)] == ["inference/r/d/3", "inference/r/d/4"]  # not twice
    assert box.take("record", 10) == []
    box.release([taken[2].id])  # a refused batch goes back in line
    assert [e.key for e in box.take("record", 10)] == ["inference/r/d/2"]
    assert box.ack([e.id for e in taken]) == 3
    assert box.counts() == {"record": 2, "offload": 0}
    # a pending key with the same payload: a harmless duplicate, refused and counted
    assert box.put("inference/r/d/4", "record", "t/results", b"x" * 10) is None
    assert box.refused_duplicates == 1 and box.usage() == (2, 20)
    # ... with another payload: two different things under one name, never silently dropped
    with pytest.raises(OutboxConflict, match="inference/r/d/3"):
        box.put("inference/r/d/3", "record", "t/results", b"something else")
    assert box.usage() == (2, 20)
    # nothing is kept of what left: its writer never reuses a key (device_agent.durable), so none is refused
    assert isinstance(box.put("inference/r/d/0", "record", "t/results", b"new"), int)


def test_an_offload_becomes_its_record_in_one_transaction_with_the_writers_own_statements(
    tmp_path: Path,
) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_entries=1)
    oid = box.put("offload/r/d/7", "offload", "t/offload", b"", meta={"seq": 7}, deadline_unix=1.0)
    assert oid is not None
    [entry] = box.all_of("offload")
    assert entry.meta == {"seq": 7} and entry.deadline_unix == 1.0
    mark = lambda cur: cur.execute("INSERT INTO state (name, value) VALUES ('marked', '7')")  # noqa: E731
    # full (1 entry), yet the record goes in without waiting: it takes the offload's place
    added = box.commit(
        [oid], [NewEntry("inference/r/d/7", "record", "t/results", b"rec")], timeout=0, also=mark
    )
    assert added == (1, 1)
    assert box.counts() == {"record": 1, "offload": 0} and box.get_state("marked") == "7"
    # a failure inside the transaction (after the removal) leaves everything as it was, `also` included
    unbindable = NewEntry("x", "record", "t", [1, 2, 3])  # type: ignore[arg-type]
    mark8 = lambda cur: cur.execute("UPDATE state SET value = '8' WHERE name = 'marked'")  # noqa: E731
    with pytest.raises(sqlite3.Error):
        box.commit([box.take("record", 1)[0].id], [unbindable], timeout=0, also=mark8)
    assert box.counts() == {"record": 1, "offload": 0} and box.usage() == (1, 3)
    assert box.get_state("marked") == "7"


def test_batch_entries_count_their_records(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    box.put_many(
        [NewEntry(f"batch/{i}", "record", "t", b"r" * n, items=n) for i, n in enumerate((30, 30, 50, 1))]
    )
    assert box.counts() == {"record": 111, "offload": 0}
    assert [e.items for e in box.take("record", 100)] == [30, 30]  # a third would pass 100 records
    assert [e.items for e in box.take("record", 10)] == [50]  # at least one entry, however big
    assert [e.key for e in box.take("record", 100)] == ["batch/3"]


def test_a_full_outbox_refuses_after_its_timeout_and_waits_for_room(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_entries=3, max_bytes=1000)
    for i in range(3):
        box.put(f"k{i}", "record", "t", b"x")
    with pytest.raises(OutboxFull, match="full"):
        box.put("k3", "record", "t", b"x", timeout=0.05)
    with pytest.raises(OutboxFull, match="can never fit"):
        box.put("big", "record", "t", b"x" * 2000)
    # backpressure: a writer blocks until an acknowledgement frees room, then gets in
    done = threading.Event()

    def writer() -> None:
        box.put("k3", "record", "t", b"x", timeout=10)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    assert not done.wait(0.2)
    box.ack([e.id for e in box.take("record", 1)])
    thread.join(10)
    assert done.is_set() and box.counts()["record"] == 3 and box.waited_for_room >= 2


def test_the_byte_bound_counts_payloads(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite", max_entries=100, max_bytes=100)
    box.put_many([NewEntry(f"k{i}", "record", "t", b"x" * 40) for i in range(2)])
    with pytest.raises(OutboxFull):
        box.put("k2", "record", "t", b"x" * 40, timeout=0)
    box.put("k3", "record", "t", b"x" * 20, timeout=0)
    assert box.usage() == (3, 100)


def test_everything_survives_a_restart_and_unacknowledged_sends_go_again(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    box.put_many([NewEntry(f"k{i}", "record", "t", bytes([i])) for i in range(4)])
    box.put("off", "offload", "t/o", b"img", meta={"seq": 1}, deadline_unix=5.0)
    on_wire = box.take("record", 2)
    box.ack([on_wire[0].id])
    with box.transaction() as cur:
        cur.execute("INSERT INTO state (name, value) VALUES ('seq/window/run', '1024')")
    box.close()  # the process dies with k1 on the wire, never acknowledged

    again = Outbox(path)
    assert again.counts() == {"record": 3, "offload": 1}
    assert again.usage() == (4, 6)
    assert [e.key for e in again.take("record", 10)] == ["k1", "k2", "k3"]
    assert again.get_state("seq/window/run") == "1024" and again.get_state("nothing") is None
    mode = sqlite3.connect(str(path)).execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_unknown_kind_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="unknown outbox kind"):
        Outbox(tmp_path / "o.sqlite").put("k", "mail", "t", b"x")


def test_wait_empty(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    assert box.wait_empty("record", 0.01)
    box.put("k", "record", "t", b"x")
    assert not box.wait_empty("record", 0.05)
    threading.Timer(0.05, lambda: box.ack([e.id for e in box.take("record", 1)])).start()
    assert box.wait_empty("record", 5)
    assert box.oldest_pending("record") is None
