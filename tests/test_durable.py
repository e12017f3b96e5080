"""A device's state under faults: numbers never repeat, a failed write loses no record, one process per
outbox, and the state of old runs does not pile up (review of issue 13: each of these failed before)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, List

import msgpack
import pytest

from device_agent.durable import (
    Counter,
    SourceProgress,
    bump_records,
    read_records,
    remember_run,
    upgrade_state,
)
from device_agent.keys import source_stream
from device_agent.outbox import Outbox, OutboxInUse
from device_agent.sink import Finished, RecordSink


class FlakyOutbox(Outbox):
    """An outbox whose next `fail` commits raise what a full SD card raises."""

    fail = 0

    def commit(self, *args: Any, **kwargs: Any) -> Any:
        if self.fail:
            self.fail -= 1
            raise sqlite3.OperationalError("database or disk is full")
        return super().commit(*args, **kwargs)


def records_in(box: Outbox) -> List[Any]:
    return [r for e in box.take("record", 10_000) for r in msgpack.unpackb(e.payload, raw=False)]


def sink_of(box: Outbox, max_records: int = 100) -> RecordSink:
    return RecordSink(
        run_id="run-1",
        outbox=box,
        results_topic="t",
        batches=Counter(box, "batch"),
        outbox_wait_s=0,
        max_records=max_records,
    )


def test_a_failed_flush_keeps_every_record_for_the_next_one(tmp_path: Path) -> None:
    """Before: the records were taken out of memory and dropped, and their callers waited forever."""
    box = FlakyOutbox(tmp_path / "o.sqlite")
    sink = sink_of(box)
    stored: List[int] = []
    for i in range(5):
        sink.add(Finished(f"k{i}", {"i": i}, counted=True, on_stored=lambda i=i: stored.append(i)))
    box.fail = 1
    with pytest.raises(sqlite3.OperationalError):
        sink.flush(block=False)
    assert sink.backlog == 5 and stored == []
    sink.add(Finished("k5", {"i": 5}, counted=True, on_stored=lambda: stored.append(5)))
    sink.flush(block=False)
    assert stored == [0, 1, 2, 3, 4, 5]  # in the order they finished
    assert [r["i"] for r in records_in(box)] == [0, 1, 2, 3, 4, 5]
    assert read_records(box, "run-1") == 6
    box.close()


def test_a_record_that_cannot_be_packed_keeps_the_others_too(tmp_path: Path) -> None:
    """The batch was built after the records had left memory: a packing error dropped them all."""
    box = Outbox(tmp_path / "o.sqlite")
    sink = sink_of(box)
    sink.add(Finished("a", {"i": 0}))
    sink.add(Finished("b", {"i": object()}))  # msgpack cannot pack it
    with pytest.raises(TypeError):
        sink.flush(block=True)
    assert sink.backlog == 2 and box.counts() == {"record": 0, "offload": 0}
    box.close()


def test_a_leftover_offload_is_recorded_at_start_even_with_the_outbox_full_of_bytes(tmp_path: Path) -> None:
    """Recovery runs before the link can free room: waiting for room there hung every start for good."""
    box = Outbox(tmp_path / "o.sqlite", max_bytes=64)
    box.put("offload/run-1/cam/7", "offload", "t/o", b"", meta={"seq": 7})
    box.put("batch/old", "record", "t", b"x" * 64)  # the byte bound reached
    [leftover] = box.all_of("offload")
    sink = sink_of(box)
    done = threading.Event()
    worker = threading.Thread(
        target=lambda: (sink.put_recovered(leftover.id, {"run_id": "run-1", "seq": 7}), done.set()),
        daemon=True,
    )
    worker.start()
    assert done.wait(10), "put_recovered waited for room that nothing could free"
    assert box.counts() == {"record": 2, "offload": 0} and read_records(box, "run-1") == 1
    box.close()


def test_the_sample_counter_of_an_older_version_is_continued(tmp_path: Path) -> None:
    """Before 2026-12 a run's sample counter was `seq/<run>`: an upgraded device resuming its run must not
    hand out those sample numbers again (the collector would refuse them as conflicts)."""
    box = Outbox(tmp_path / "o.sqlite")
    with box.transaction() as cur:
        cur.executemany(
            "INSERT INTO state (name, value) VALUES (?, ?)",
            [("seq/run-old", "2048"), ("seq/batch", "4096"), ("seq/window/run-old", "1024")],
        )
    upgrade_state(box)
    upgrade_state(box)  # idempotent
    assert Counter(box, "sample", "run-old").take() == 2048
    assert box.get_state("seq/run-old") is None
    assert box.get_state("seq/batch") == "4096" and box.get_state("seq/window/run-old") == "1024"
    box.close()


def test_one_failing_callback_does_not_keep_the_others_from_hearing_back(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "o.sqlite")
    sink = sink_of(box)
    heard: List[int] = []

    def cancelled() -> None:
        raise RuntimeError("the caller cancelled its future")

    sink.add(Finished("a", {"i": 0}, on_stored=cancelled))
    sink.add(Finished("b", {"i": 1}, on_stored=lambda: heard.append(1)))
    sink.flush(block=False)
    assert heard == [1]
    box.close()


def test_an_entry_never_holds_more_records_than_one_message_takes(tmp_path: Path) -> None:
    """A backlog flush once wrote 4,096 records as one entry: bigger than a results message may be."""
    box = Outbox(tmp_path / "o.sqlite")
    sink = sink_of(box, max_records=10)
    for i in range(25):
        sink.add(Finished(f"k{i}", {"i": i}, counted=True))
    sink.flush(block=True)
    entries = box.take("record", 1000)
    assert [e.items for e in entries] == [10, 10, 5]
    assert [r["i"] for e in entries for r in msgpack.unpackb(e.payload, raw=False)] == list(range(25))
    assert read_records(box, "run-1") == 25
    box.close()


def test_counters_of_different_kinds_never_share_numbers_even_for_a_run_named_batch(tmp_path: Path) -> None:
    """Before: the samples of a run called `batch` and the result batches shared one state row, which went
    backwards, and a restart handed out numbers again."""
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    samples, batches = Counter(box, "sample", "batch", block=4), Counter(box, "batch", block=4)
    taken = [samples.take() for _ in range(10)]
    batch_taken = [batches.take()]
    box.close()
    box = Outbox(path)  # the next process
    assert Counter(box, "sample", "batch", block=4).take() > max(taken)
    assert Counter(box, "batch", block=4).take() > max(batch_taken)
    box.close()


def test_a_counter_whose_reservation_fails_hands_out_nothing_it_did_not_write(tmp_path: Path) -> None:
    path = tmp_path / "o.sqlite"
    box = Outbox(path)
    counter = Counter(box, "sample", "r", block=2)
    assert [counter.take(), counter.take()] == [0, 1]
    real = box.transaction

    def full_disk() -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    box.transaction = full_disk  # type: ignore[method-assign]
    with pytest.raises(sqlite3.OperationalError):
        counter.take()
    box.transaction = real  # type: ignore[method-assign]
    assert counter.take() == 2
    box.close()
    box = Outbox(path)
    assert Counter(box, "sample", "r", block=2).take() == 4  # after the block that holds 2 and 3
    box.close()


def test_a_second_process_on_one_outbox_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "outbox-cam-01.sqlite"
    box = Outbox(path)
    with pytest.raises(OutboxInUse, match="in use by another process"):
        Outbox(path)
    box.close()
    Outbox(path).close()  # free again once closed


def test_the_state_of_old_runs_is_forgotten_and_recent_runs_keep_theirs(tmp_path: Path) -> None:
    """Before: every start under systemd left its counters (and an unfinished pass's progress rows)
    for good."""
    box = Outbox(tmp_path / "o.sqlite")
    runs = [f"run-{i}" for i in range(5)]
    forgotten = []
    for run in runs:
        forgotten += remember_run(box, run, keep=3)
        Counter(box, "sample", run).take()
        box.commit([], [], also=bump_records(run, 7))
        progress = SourceProgress(box, source_stream(run, "dataset:x:test"))
        progress.finish_pass()  # one pass done (its state row), the next one under way (a progress row)
        progress.begin_pass()
        progress.mark_now("3")
    forgotten += remember_run(box, "run-5", keep=3)
    assert forgotten == ["run-0", "run-1", "run-2"]  # one by one, the oldest first
    state = {name for (name,) in box.read("SELECT name FROM state")}
    streams = {s for (s,) in box.read("SELECT DISTINCT stream FROM progress")}
    for run in runs:
        kept = run in ("run-3", "run-4")  # (and run-5, which has no state yet)
        assert (f"seq/sample/{run}" in state) is kept
        assert (read_records(box, run) == 7) is kept
        assert (f"pass/{run}/dataset:x:test" in state) is kept
        assert (source_stream(run, "dataset:x:test") in streams) is kept
    box.close()
