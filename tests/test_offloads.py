"""Offloads in flight (`device_agent.offloads`): bounded memory, a window that cannot leak, and an idle that
means every offload's record is with the sink."""

from __future__ import annotations

import sqlite3
import threading
import time
import types
from pathlib import Path
from typing import Any, Iterator, List

import pytest

from device_agent import offloads
from device_agent.offloads import OffloadTracker, Settled
from device_agent.outbox import Outbox
from protocol.topics import Topics


class Clock:
    now = 1000.0


@pytest.fixture
def box(tmp_path: Path) -> Iterator[Outbox]:
    outbox = Outbox(tmp_path / "o.sqlite")
    yield outbox
    outbox.close()


def offline_link() -> Any:
    return types.SimpleNamespace(connected=threading.Event(), publish=lambda *a: None)


def test_settled_offloads_are_forgotten_by_count_and_by_age(box: Outbox, monkeypatch) -> None:
    """The soak found the agent's memory growing ~0.3 MiB/min: every settled offload's correlation id was
    kept up to 100,000 of them. Now at most SETTLED_MEMORY, and none older than a few deadlines."""
    # The tracker's own clock only (patching time.monotonic itself would move every thread's).
    monkeypatch.setattr(offloads, "time", types.SimpleNamespace(monotonic=lambda: Clock.now, time=time.time))
    tracker = OffloadTracker(offline_link(), box, Topics(), "dev", "run", lambda s: None, deadline_s=2.0)
    for i in range(offloads.SETTLED_MEMORY + 500):
        tracker._remember(str(i).encode(), "answered")
    assert len(tracker._settled) == offloads.SETTLED_MEMORY
    Clock.now += offloads.REMEMBER_DEADLINES * 2.0 + 1.0
    tracker._remember(b"late", "fallback")
    assert list(tracker._settled) == [b"late"]


def test_an_offload_the_outbox_could_not_take_frees_its_place_in_the_window(box: Outbox) -> None:
    """Before: each failed write kept one of `max_inflight` places; then the inference thread blocked
    for good."""
    tracker = OffloadTracker(offline_link(), box, Topics(), "dev", "run", lambda s: None, max_inflight=1)
    real_put = box.put

    def full_disk(*args: Any, **kwargs: Any) -> Any:
        raise sqlite3.OperationalError("database or disk is full")

    box.put = full_disk  # type: ignore[method-assign]
    for seq in range(3):
        with pytest.raises(sqlite3.OperationalError):
            tracker.offload(object(), seq, b"img", {"device_id": "dev", "seq": seq})
    box.put = real_put  # type: ignore[method-assign]
    done = threading.Event()
    threading.Thread(
        target=lambda: (tracker.offload(object(), 3, b"img", {"device_id": "dev", "seq": 3}), done.set()),
        daemon=True,
    ).start()
    assert done.wait(10), "the window stayed full"
    assert tracker.in_flight() == 1


def test_not_idle_until_the_settled_offload_has_been_handed_over(box: Outbox) -> None:
    """Before: `wait_idle` saw nothing in flight while a fallback was still being settled, and close()
    counted the run's records without it."""
    entered, release = threading.Event(), threading.Event()
    settled: List[Settled] = []

    def slow_settle(outcome: Settled) -> None:
        entered.set()
        release.wait(10)
        settled.append(outcome)

    tracker = OffloadTracker(offline_link(), box, Topics(), "dev", "run", slow_settle, deadline_s=0.05)
    tracker.offload(object(), 0, b"img", {"device_id": "dev", "seq": 0})

    def ticks() -> None:  # the link thread's housekeeping, until the deadline has passed
        while not entered.is_set():
            tracker.tick(False)
            time.sleep(0.01)

    threading.Thread(target=ticks, daemon=True).start()
    assert entered.wait(10)
    assert tracker.in_flight() == 1 and not tracker.wait_idle(0.05)
    release.set()
    assert tracker.wait_idle(10) and len(settled) == 1 and settled[0].reply is None


def test_window_full_says_when_an_offload_would_wait_for_a_place(box: Outbox) -> None:
    """The capacity rule sheds instead of letting the inference thread wait (device_agent.capacity)."""
    tracker = OffloadTracker(offline_link(), box, Topics(), "dev", "run", lambda s: None, max_inflight=2)
    assert not tracker.window_full()
    tracker.offload(object(), 0, b"img", {"device_id": "dev", "seq": 0})
    assert not tracker.window_full()
    tracker.offload(object(), 1, b"img", {"device_id": "dev", "seq": 1})
    assert tracker.window_full() and tracker.stats["window_waits"] == 0


def test_an_offload_a_live_worker_holds_is_not_sent_twice_but_one_a_lost_worker_held_is(
    box: Outbox, monkeypatch
) -> None:
    """Before: every offload unanswered at half its deadline went again, also to workers merely busy (in the
    fleet simulation a quarter of all offloads: doubled work in the queue every offload waits in). Now only
    when the workers' loads cannot vouch that a live worker holds it (`held_since`)."""
    monkeypatch.setattr(offloads, "time", types.SimpleNamespace(monotonic=lambda: Clock.now, time=time.time))
    sent: List[int] = []
    link = types.SimpleNamespace(connected=threading.Event(), publish=lambda t, p, props: sent.append(1) or 1)
    link.connected.set()
    vouched_from = [-float("inf")]  # offloads sent after this are held by a live worker
    tracker = OffloadTracker(
        link,
        box,
        Topics(),
        "dev",
        "run",
        lambda s: None,
        deadline_s=2.0,
        held_since=lambda q: vouched_from[0],
    )
    plain = OffloadTracker(link, box, Topics(), "dev", "run2", lambda s: None, deadline_s=2.0)
    start = Clock.now
    tracker.offload(object(), 0, b"img", {"device_id": "dev", "seq": 0})
    plain.offload(object(), 0, b"img", {"device_id": "dev", "seq": 0})
    assert len(sent) == 2
    for _ in range(3):  # half the deadline passes, tick after tick: the live worker still has it
        Clock.now += 0.5
        tracker.tick(True)
        plain.tick(True)
    assert tracker.stats["resent"] == 0 and tracker.stats["resends_spared"] == 1  # counted once
    assert plain.stats["resent"] == 1 and len(sent) == 3  # without loads, as before
    vouched_from[0] = start + 1.2  # a worker went after the offload was sent: it may have taken it along
    Clock.now += 0.1
    tracker.tick(True)
    assert tracker.stats["resent"] == 1 and len(sent) == 4
    vouched_from[0] = float("inf")  # ... and a quiet worker or none known: re-sent as without loads
    tracker.offload(object(), 1, b"img", {"device_id": "dev", "seq": 1})
    Clock.now += 1.0
    tracker.tick(True)
    assert tracker.stats["resent"] == 2 and len(sent) == 6
