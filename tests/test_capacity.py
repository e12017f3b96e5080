"""Capacity-aware offloading (`device_agent.capacity`): the rule by hand on a controlled clock, what hi-online
learns from shed samples, and a real agent that sheds while a published load says the cloud is swamped and
offloads again once it says idle, through a real broker, worker and collector into SQLite."""

from __future__ import annotations

import collections
import heapq
import math
import random
import sqlite3
import uuid
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Tuple

import numpy as np
import pytest
from agents import quick_agent_config
from tinymodels import tiny_images
from waiting import wait_for

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from device_agent import AgentConfig, DeviceAgent
from device_agent.capacity import (
    REFUSAL_HOLD_S,
    SHARE_DOWN,
    SHARE_MIN,
    Admission,
    CapacityRule,
    worker_time_ms,
)
from device_agent.cascade import EdgeCascade
from device_agent.config import apply_profile
from device_agent.policies import Action, EdgeView, Outcome, make_policy
from protocol import (
    CONTENT_TYPE_REFUSAL,
    OffloadRefusal,
    OffloadReply,
    decode_offload,
    encode_refusal,
)
from protocol.load import CONTENT_TYPE_LOAD, WorkerLoad, encode_load
from protocol.mqtt import new_client, publish_properties
from protocol.topics import Topics
from results_db import Collector, CollectorConfig


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def load(queue: int = 0, capacity: float = 1000.0, service_ms: float = 1.0, ts: float = 1.0) -> WorkerLoad:
    return WorkerLoad("w", ts, queue, service_ms, capacity, 0.5)


def reply(cloud_ms: float = 2.0, **extra: Any) -> OffloadReply:
    return OffloadReply("run", "dev", 0, 1, np.zeros(10, dtype=np.float32), cloud_ms, "w", extra=extra)


def rule(clock: Clock, **kw: Any) -> CapacityRule:
    """Deadline 2 s: shed above 800 ms predicted or 500 ms of workers' queue; the share steers to 250 ms."""
    return CapacityRule(2.0, clock=clock, rng=random.Random(7), **kw)


def opened(clock: Clock, sources: Tuple[str, ...] = ("t/w1",), **kw: Any) -> CapacityRule:
    """A rule whose admission share is wide open: idle loads (ts 1..5) until slow start doubled it to 1."""
    r = rule(clock, **kw)
    for ts in range(1, 6):
        for source in sources:
            r.worker_load(source, load(ts=float(ts)))
    assert r.share == 1.0 and r.report()["slow_start"]
    return r


def admitted_fraction(r: CapacityRule, n: int = 4000) -> float:
    return sum(r.admit().admitted for _ in range(n)) / n


def test_no_load_known_admits() -> None:
    r = rule(Clock())
    assert r.admit() == Admission(True, "ok", 0.0)
    assert r.report()["admitted"] == 1 and r.report()["workers"] == 0


def test_a_queue_whose_wait_exceeds_the_bound_is_shed() -> None:
    r = opened(Clock())
    r.worker_load("t/w1", load(queue=600, capacity=1000.0, ts=10.0))  # 600 ms of queue + 1 ms of service
    verdicts = [r.admit() for _ in range(50)]
    assert {v.reason for v in verdicts} == {"capacity"} and not any(v.admitted for v in verdicts)
    assert verdicts[0].predicted_ms == pytest.approx(601.0)
    assert r.share == pytest.approx(0.7)  # above the target: cut, slow start over
    r.worker_load("t/w1", load(queue=100, capacity=1000.0, ts=11.0))  # 101 ms: below the target, + 0.1
    assert r.share == pytest.approx(0.8)
    assert admitted_fraction(r) == pytest.approx(0.8, abs=0.03)


def test_a_slow_steady_link_is_no_reason_to_shed_but_a_long_round_trip_is() -> None:
    """A satellite's 600 ms round trip with idle workers comes back well inside a 2 s deadline: offload.
    The same queue behind a 1.2 s transit would be re-sent at half the deadline: shed."""
    clock = Clock()
    r = opened(clock)
    r.answered(601.0, reply(1.0))  # transit 600 ms
    assert all(r.admit().admitted for _ in range(50)) and r.share == 1.0
    clock.now += 10.0  # the estimate ages: the next answer replaces it almost outright
    r.answered(1201.0, reply(1.0))
    assert r.report()["transit_ms"] > 1000.0
    assert {r.admit().reason for _ in range(20)} <= {"capacity", "probe"}


def test_until_the_cloud_has_answered_once_one_offload_at_a_time_goes() -> None:
    """Slow start from one: a fleet starting together sends no burst before any device measured a round
    trip; a refusal is an answer too."""
    r = opened(Clock())
    assert r.admit(in_flight=0).admitted
    assert [r.admit(in_flight=1).reason for _ in range(3)] == ["start"] * 3
    assert r.admit(in_flight=1, edge_answer=False).admitted  # without an edge answer only the cloud has one
    r.refused()
    assert r.admit(in_flight=1).reason != "start"
    r2 = opened(Clock())
    r2.answered(5.0, reply(1.0))
    assert all(r2.admit(in_flight=5).admitted for _ in range(10)) and r2.report()["shed_start"] == 0


def test_the_share_starts_slowly_then_steers_like_tcp() -> None:
    """A fleet starting together must not fill the queues before the first load shows it; then additive
    increase, multiplicative decrease, and no cut while a long queue is already draining."""
    r = rule(Clock())
    assert r.share == 1 / 16
    r.worker_load("t/w1", load(queue=0, ts=1.0))  # fresh and idle: doubles
    assert r.share == 1 / 8
    assert admitted_fraction(r) == pytest.approx(1 / 8, abs=0.02)
    r.answered(10.0, reply(1.0))  # quick answers open it a little more (a lone device opens up fast)
    r.answered(10.0, reply(1.0))
    r.answered(310.0, reply(300.0))  # not quick: the worker's part beyond the 250 ms target
    share = 1 / 8 * 1.25**2
    assert r.share == pytest.approx(share)
    r.worker_load("t/w1", load(queue=300, ts=2.0))  # 301 ms: cut
    r.worker_load("t/w1", load(queue=350, ts=3.0))  # still above, and growing: cut again
    r.worker_load("t/w1", load(queue=320, ts=4.0))  # above, but draining: held
    share *= 0.7 * 0.7
    assert r.share == pytest.approx(share) and not r.report()["slow_start"]
    r.worker_load("t/w1", load(queue=100, ts=5.0))  # below: + 0.1 (slow start is over: no doubling)
    assert r.share == pytest.approx(share + 0.1)
    r.answered(10.0, reply(1.0))  # and quick answers no longer grow it
    assert r.share == pytest.approx(share + 0.1)
    for ts in range(10, 30):
        r.worker_load("t/w1", load(queue=300 + ts, ts=float(ts)))
    assert r.share == 1 / 64  # the floor: a trickle still goes, and is still measured


def test_a_round_of_loads_from_every_worker_takes_one_step() -> None:
    r = opened(Clock(), sources=("t/a", "t/b"))
    r.worker_load("t/a", load(queue=600, ts=10.0))  # mean of 601 and 1 ms: above the target
    r.worker_load("t/b", load(queue=600, ts=10.0))
    assert r.share == pytest.approx(0.7)


def test_the_wait_is_the_mean_over_workers_and_a_gone_worker_no_longer_counts() -> None:
    """Round-robin hands each worker the same share: half the offloads would meet the swamped one."""
    r = opened(Clock(), sources=("t/idle",))
    r.worker_load("t/swamped", load(queue=1600))
    assert r.admit() == Admission(False, "capacity", pytest.approx((1.0 + 1601.0) / 2))
    r.worker_load("t/swamped", None)  # its will cleared the retained load
    assert r.admit().predicted_ms == 1.0
    assert r.report()["workers_gone"] == 1 and r.report()["workers"] == 1


def test_an_idle_worker_without_a_measured_capacity_has_no_wait() -> None:
    r = opened(Clock())
    r.worker_load("t/w1", load(queue=0, capacity=0.0, service_ms=0.0, ts=10.0))  # WorkerLoad.wait_ms(): inf
    assert r.admit() == Admission(True, "ok", 0.0)
    r.worker_load("t/w1", load(queue=10, capacity=0.0, service_ms=2.0, ts=11.0))
    assert r.admit().predicted_ms == pytest.approx(10 * 2.0 + 2.0)


def test_stale_loads_are_dropped_by_local_receipt_time_and_a_repeat_does_not_refresh() -> None:
    clock = Clock()
    r = opened(clock)
    r.worker_load("t/w1", load(queue=5000, ts=1_000_000.0))  # the worker's clock is not ours: never compared
    assert r.admit().reason == "capacity"
    clock.now += 2.9
    r.worker_load("t/w1", load(queue=5000, ts=1_000_000.0))  # the same retained load, on a reconnect
    clock.now += 0.2  # 3.1 s after the news itself
    assert r.admit() == Admission(True, "ok", 0.0)
    report = r.report()
    assert report["stale_loads"] == 1 and report["workers"] == 0
    assert (r.share, report["slow_start"]) == (1 / 16, True)  # what comes back starts slowly again
    r.worker_load("t/w1", load(queue=5000, ts=1_000_000.0))  # still no news after it was dropped
    assert r.admit().admitted
    r.worker_load("t/w1", load(queue=5000, ts=1_000_001.0))  # news: believed again
    assert r.admit().reason == "capacity"


def test_loads_vouch_for_offloads_held_by_live_workers_only() -> None:
    """`held_since`: the device re-sends an unanswered offload only where no live worker may hold it."""
    clock = Clock()
    r = rule(clock)
    assert r.held_since(1.0) == math.inf  # no load known: nothing to vouch with
    r.worker_load("t/w1", load(ts=1.0))
    r.worker_load("t/w2", load(ts=1.0))
    assert r.held_since(1.0) == -math.inf  # both alive, none ever lost
    clock.now += 1.5
    r.worker_load("t/w1", load(ts=2.0))
    assert r.held_since(1.0) == math.inf  # w2 quiet for 1.5 s: it may be hung with the offload
    r.worker_load("t/w2", None)  # its will: gone
    lost = clock.now
    assert r.held_since(1.0) == lost  # offloads sent before it went may have gone with it
    clock.now += 2.0
    r.worker_load("t/w1", load(ts=3.0))
    clock.now += 3.1  # w1's load goes stale too: lost now, and none left to vouch
    stale_at = clock.now
    assert r.held_since(10.0) == math.inf and r.report()["stale_loads"] == 1
    clock.now += 0.5
    r.worker_load("t/w1", load(ts=4.0))
    assert r.held_since(1.0) == stale_at  # back, but what was sent before it went stale is not vouched for


def test_the_budget_is_a_token_bucket_that_refills_with_the_clock() -> None:
    clock = Clock()
    r = rule(clock, budget_per_s=2.0, budget_burst=3.0)
    assert [r.admit().reason for _ in range(4)] == ["ok", "ok", "ok", "budget"]
    clock.now += 0.5  # one token
    assert [r.admit().reason for _ in range(2)] == ["ok", "budget"]
    clock.now += 100.0  # refills up to the burst, not beyond
    assert [r.admit().reason for _ in range(4)] == ["ok", "ok", "ok", "budget"]
    clock.now += 1.0  # two tokens; a sample shed for another reason spends none
    assert r.admit(window_full=True).reason == "window"
    r.worker_load("t/w1", load(queue=900))
    assert r.admit().reason == "capacity"
    r.worker_load("t/w1", None)
    assert [r.admit().reason for _ in range(3)] == ["ok", "ok", "budget"]
    assert r.report()["shed_budget"] == 4


def test_default_burst_is_one_seconds_worth() -> None:
    r = rule(Clock(), budget_per_s=5.0)
    assert [r.admit().admitted for _ in range(6)] == [True] * 5 + [False]
    assert CapacityRule(2.0, budget_per_s=0.2).budget_burst == 1.0


def test_transit_is_the_round_trip_less_the_workers_time_averaged_by_age() -> None:
    assert worker_time_ms(reply(2.0, queue_ms=5.0, batch=4)) == 5.0 + 4 * 2.0  # a reply waits for its batch
    assert worker_time_ms(reply(2.0)) == 2.0  # an older worker says only cloud_ms
    for bad in ({"queue_ms": math.nan, "batch": 4}, {"queue_ms": 5.0, "batch": True}, {"queue_ms": "5"}):
        assert worker_time_ms(reply(2.0, **bad)) == 2.0
    clock = Clock()
    r = rule(clock)
    r.answered(30.0, reply(2.0, queue_ms=5.0, batch=4))
    assert r.report()["transit_ms"] == pytest.approx(17.0)
    r.answered(117.0, reply(2.0, queue_ms=5.0, batch=4))  # the same instant: the minimum weight, 0.1
    assert r.report()["transit_ms"] == pytest.approx(17.0 + 0.1 * (104.0 - 17.0))
    clock.now += 1.0  # one half-life later: half and half
    r.answered(7.0, reply(2.0))
    assert r.report()["transit_ms"] == pytest.approx(5.0 + 0.5 * (25.7 - 5.0))
    r.answered(None, reply(2.0))  # no round trip measured: nothing to average
    assert r.report()["transit_ms"] == pytest.approx(15.35)


def test_a_slow_transit_alone_sheds_but_probes_until_the_cloud_is_quick_again() -> None:
    """A backlog in the broker shows in no worker's queue, only in the round trips; those change only when
    an offload comes back, so one a deadline still goes."""
    clock = Clock()
    r = opened(clock)
    r.answered(1101.0, reply(1.0))  # transit 1.1 s: past the bound, 0.4 of the deadline
    assert r.admit() == Admission(True, "probe", pytest.approx(1101.0))  # nothing sent for a deadline
    assert [r.admit().reason for _ in range(20)] == ["capacity"] * 20
    clock.now += 2.0
    assert r.admit().reason == "probe"
    r.answered(6.0, reply(1.0))  # the probe came back quick: 0.25 of the old estimate remains
    assert r.report()["transit_ms"] == pytest.approx(5.0 + 0.25 * 1095.0)
    assert all(r.admit().admitted for _ in range(20))
    assert r.stats["probes"] == 2


def test_after_a_fallback_only_probes_go_until_one_is_answered() -> None:
    """With no load known the device's own evidence is all there is: a deadline missed means late."""
    clock = Clock()
    r = rule(clock)
    assert r.admit().reason == "ok"
    r.fell_back()
    clock.now += 0.5
    assert [r.admit().reason for _ in range(3)] == ["late"] * 3  # the last admission is 0.5 s old
    clock.now += 1.5
    assert [r.admit().reason for _ in range(3)] == ["probe", "late", "late"]
    r.fell_back()  # the probe fell back too: still late
    clock.now += 2.0
    assert r.admit().reason == "probe"
    r.answered(5.0, reply(1.0))
    assert [r.admit().reason for _ in range(3)] == ["ok"] * 3
    assert r.report()["shed_late"] == 5 and r.report()["late"] is False


def test_a_refusal_cuts_the_share_once_per_hold_and_ends_slow_start() -> None:
    """A worker's refusal is congestion: like TCP on a loss, one cut per event, not one per refused offload
    of the same burst; and the cloud is not late (it answers, with a no)."""
    clock = Clock()
    r = opened(clock)
    r.fell_back()
    for _ in range(5):  # one burst of refusals
        r.refused()
    assert r.share == pytest.approx(SHARE_DOWN) and not r.report()["slow_start"]
    assert r.report()["late"] is False and r.report()["refused"] == 5
    clock.now += REFUSAL_HOLD_S
    r.refused()
    assert r.share == pytest.approx(SHARE_DOWN**2)
    for _ in range(40):
        clock.now += REFUSAL_HOLD_S
        r.refused()
    assert r.share == SHARE_MIN


def test_a_full_window_sheds_and_a_sample_without_an_edge_answer_is_shed_only_when_surely_late() -> None:
    """Shedding a sample the edge has no answer for (cloud-only, edge none) leaves it with none at all."""
    clock = Clock()
    r = rule(clock)
    assert r.admit(window_full=True) == Admission(False, "window")
    assert r.admit(window_full=True, edge_answer=False).admitted  # it waits for a place, as it always did
    r.worker_load("t/w1", load(queue=799))  # 800 ms: too late for a sample the edge could answer ...
    assert r.admit().reason == "capacity"
    assert all(r.admit(edge_answer=False).admitted for _ in range(50))  # ... not for one that has only this
    r.fell_back()
    clock.now += 0.1
    assert r.admit(edge_answer=False).reason == "ok"  # late evidence does not shed it either
    r.worker_load("t/w1", load(queue=2100, ts=2.0))  # beyond the deadline itself: no use sending it
    assert r.admit(edge_answer=False) == Admission(False, "capacity", pytest.approx(2101.0))


def test_the_config_validates_its_capacity_settings_and_profiles_set_them(tmp_path: Path) -> None:
    from protocol.mqtt import BrokerAddress

    base = AgentConfig(device_id="dev-1", broker=BrokerAddress("127.0.0.1", 1883, "dev-1", ""))
    assert base.capacity_aware and base.shed_above == 0.4 and base.offload_budget_per_s is None
    for bad in (
        {"shed_above": 0.0},
        {"shed_above": 1.5},
        {"offload_budget_per_s": -1.0},
        {"offload_budget_burst": 4.0},  # without a budget
        {"offload_budget_per_s": 2.0, "offload_budget_burst": 0.5},
        {"offload_budget_per_s": 2.0, "capacity_aware": False},  # the rule holds the budget
    ):
        with pytest.raises(ValueError):
            AgentConfig(device_id="dev-1", broker=base.broker, **bad)
    profile = {
        "agent": {
            "shed_above": 0.4,
            "offload_budget_per_s": 5,
            "offload_budget_burst": 10,
            "capacity_aware": True,
        }
    }
    applied = apply_profile(base, profile)
    assert (applied.shed_above, applied.offload_budget_per_s, applied.offload_budget_burst) == (
        0.4,
        5.0,
        10.0,
    )
    assert not apply_profile(base, {"agent": {"capacity_aware": False}}).capacity_aware
    with pytest.raises(ValueError, match="true or false"):
        apply_profile(base, {"agent": {"capacity_aware": "false"}})


def test_hi_online_learns_nothing_false_from_a_shed_sample() -> None:
    """A shed sample paid no offload and brought no cloud answer: its own cost is the edge's, and the answers
    that do come are weighted by how many offload decisions get one (else accepting would look cheap)."""

    def policy() -> Any:
        # theta 0 accepts everything, theta 1 offloads everything; explore 1: P(offload) = 1
        return make_policy({"name": "hi-online", "params": {"grid": [0.0, 1.0], "eta": 1.0, "explore": 1.0}})

    view = EdgeView(stage="main", probs=np.array([0.6, 0.4]), prediction=0, p_main=0.6, seq=0)
    answered, shed_first = policy(), policy()
    decision = answered.decide(view)
    assert decision.action is Action.OFFLOAD and decision.offload_prob == 1.0
    answered.observe(Outcome(view, decision, cloud_prediction=1, label=1))  # the edge was wrong
    shed_first.decide(view)
    shed_first.observe(Outcome(view, decision, cloud_prediction=None, label=1, shed=True))
    shed_first.decide(view)
    shed_first.observe(Outcome(view, decision, cloud_prediction=1, label=1))

    def log_odds(p: Any) -> float:  # log w(theta 0) - log w(theta 1)
        w = p.weights()
        return float(np.log(w[0] / w[1]))

    assert log_odds(answered) == pytest.approx(-(1.0 - 0.5))  # loss 1 (wrong) against beta 0.5
    # two decisions, one answer: that answer's loss counts twice, against beta twice
    assert log_odds(shed_first) == pytest.approx(-(2.0 - 1.0))
    report = shed_first.report()
    assert report["shed"] == 1 and report["offload_fraction"] == 0.5
    assert report["cost"] == pytest.approx(1.0 + 0.5)  # the shed one: the edge's wrong answer, not beta


# -- a fleet in miniature -------------------------------------------------------------------------------


def simulate(
    *,
    aware: bool,
    demand_per_s: float,
    interval_s: float,
    devices: int = 50,
    workers: int = 2,
    capacity_per_s: float = 150.0,
    seconds: float = 20.0,
    dt: float = 0.002,
    transit_s: float = 0.002,
    deadline_s: float = 2.0,
    seed: int = 3,
) -> Dict[str, float]:
    """`devices` devices whose complex samples arrive at `demand_per_s` in all (Poisson), each with its own
    CapacityRule on one simulated clock; `workers` FIFO workers of `capacity_per_s` behind strict round-robin
    (Mosquitto's shared subscription), each publishing its queue every `interval_s`, all at the same instant
    (the worst case); a request still queued at its deadline is a fallback (the worker drops it), one still
    unanswered at half of it is sent once more, to the next worker, as `OffloadTracker` does."""
    clock = Clock()
    clock.now = 0.0
    rng = random.Random(seed)
    rules = [
        CapacityRule(deadline_s, clock=clock, rng=random.Random(seed * 1000 + i)) for i in range(devices)
    ]
    arrivals = [(rng.expovariate(demand_per_s / devices), d) for d in range(devices)]
    heapq.heapify(arrivals)
    queues: List[Deque[Tuple[int, float]]] = [collections.deque() for _ in range(workers)]
    sent: Dict[int, Tuple[int, float]] = {}  # request -> (device, first sent)
    settled: set = set()
    events: List[Tuple[float, int, str, float]] = []  # (due, request, what, round trip ms)
    credit, busy = [0.0] * workers, 0
    counts = collections.Counter()
    service_ms = 1000.0 / capacity_per_s
    rr, next_publish, t = 0, 0.0, 0.0
    while t < seconds:
        clock.now = t
        if t >= next_publish:
            next_publish += interval_s
            for w in range(workers):
                news = WorkerLoad(f"w{w}", t, len(queues[w]), service_ms, capacity_per_s, 1.0)
                for r in rules:
                    r.worker_load(f"w{w}", news)
        while arrivals[0][0] <= t:
            _, d = heapq.heappop(arrivals)
            heapq.heappush(arrivals, (t + rng.expovariate(demand_per_s / devices), d))
            counts["complex"] += 1
            if aware and not rules[d].admit().admitted:
                continue
            request = counts["offloads"]
            counts["offloads"] += 1
            sent[request] = (d, t)
            queues[rr % workers].append((request, t))
            rr += 1
            heapq.heappush(events, (t + deadline_s / 2, request, "resend", 0.0))
            heapq.heappush(events, (t + deadline_s, request, "deadline", 0.0))
        for w in range(workers):
            credit[w] = min(credit[w] + capacity_per_s * dt, 1.0 + capacity_per_s * dt)
            busy += bool(queues[w])
            while credit[w] >= 1.0 and queues[w]:
                request, queued = queues[w].popleft()
                d, first = sent[request]
                if t - first >= deadline_s:
                    continue  # expired: dropped unread
                credit[w] -= 1.0  # a second copy costs a batch place too
                if request not in settled:
                    settled.add(request)
                    rtt_ms = (t - first + transit_s) * 1000.0
                    heapq.heappush(events, (t + transit_s / 2, request, "answer", rtt_ms))
                    counts["answered"] += 1
        while events and events[0][0] <= t:
            _, request, what, rtt_ms = heapq.heappop(events)
            d, first = sent[request]
            if what == "answer":
                worker_ms = rtt_ms - transit_s * 1000.0 - service_ms
                rules[d].answered(rtt_ms, reply(service_ms, queue_ms=max(0.0, worker_ms), batch=1))
            elif what == "resend" and request not in settled:
                queues[rr % workers].append((request, t))
                rr += 1
            elif what == "deadline" and request not in settled:
                settled.add(request)
                counts["fallbacks"] += 1
                rules[d].fell_back()
        t += dt
    steps = seconds / dt
    return {
        "complex": counts["complex"],
        "offloads": counts["offloads"],
        "fallbacks": counts["fallbacks"] / max(1, counts["offloads"]),
        "shed": 1.0 - counts["offloads"] / counts["complex"],
        "busy": busy / (steps * workers),
    }


@pytest.mark.parametrize("overload, interval_s", [(2, 1.0), (5, 0.5), (10, 1.0)])
def test_a_simulated_fleet_under_overload_keeps_its_deadlines_and_its_workers_busy(
    overload: int, interval_s: float
) -> None:
    """The issue's target (fallbacks <= 1 % of offloads, workers busy >= 80 %), on a model of its fleet: 50
    devices, 2 workers, loads an interval old, all devices starting together."""
    capacity = 2 * 150.0
    fleet = simulate(aware=True, demand_per_s=overload * capacity, interval_s=interval_s)
    assert fleet["fallbacks"] <= 0.01, fleet
    assert fleet["busy"] >= 0.8, fleet
    assert fleet["shed"] == pytest.approx(1 - 1 / overload, abs=0.08), fleet  # what did not fit, no more


def test_a_simulated_fleet_without_the_rule_misses_its_deadlines_and_an_idle_one_sheds_little() -> None:
    blind = simulate(aware=False, demand_per_s=5 * 300.0, interval_s=0.5, seconds=10.0)
    assert blind["fallbacks"] > 0.2, blind  # the 2 s stalls of the issue
    idle = simulate(aware=True, demand_per_s=0.5 * 300.0, interval_s=0.5)
    # The slow start's price, all in the first seconds: 4 % of 20 s for a fleet; a lone device, whose quick
    # answers open it up faster, about half a second's worth of its complex samples (43 of 454 in 5 s).
    assert idle["fallbacks"] == 0 and idle["shed"] < 0.05, idle
    lone = simulate(aware=True, devices=1, workers=1, demand_per_s=100.0, interval_s=0.5, seconds=5.0)
    assert lone["fallbacks"] == 0 and lone["shed"] < 0.12, lone


# -- end to end ------------------------------------------------------------------------------------------


class LoadPublisher:
    """Publishes a worker's load retained, as a cloud account: what a worker does every interval."""

    def __init__(self, broker: BrokerProcess, topics: Topics, worker_id: str) -> None:
        self.topic = topics.cloud_load(worker_id)
        self.worker_id = worker_id
        self.ts = 1_000.0
        self.client = new_client(broker.credentials("cloud"), f"loadpub-{uuid.uuid4().hex[:8]}")
        address = broker.credentials("cloud")
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def publish(self, queue: int, capacity: float) -> None:
        self.ts += 1.0
        payload = encode_load(WorkerLoad(self.worker_id, self.ts, queue, 2.0, capacity, 1.0))
        props = publish_properties(content_type=CONTENT_TYPE_LOAD, expiry_s=300)
        self.client.publish(self.topic, payload, qos=1, retain=True, properties=props).wait_for_publish(10)

    def close(self) -> None:
        self.client.publish(self.topic, b"", qos=1, retain=True).wait_for_publish(10)  # clear it
        self.client.disconnect()
        self.client.loop_stop()


def _rows(db: Path, run_id: str) -> Dict[int, Dict[str, Any]]:
    with sqlite3.connect(db) as raw:
        raw.row_factory = sqlite3.Row
        return {
            r["seq"]: dict(r) for r in raw.execute("SELECT * FROM inferences WHERE run_id = ?", (run_id,))
        }


@pytest.mark.integration
def test_a_swamped_cloud_gets_shed_samples_and_an_idle_one_gets_offloads_again(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path
) -> None:
    db = tmp_path / "results.db"
    worker = CloudWorker(
        WorkerConfig(
            broker.credentials("cloud"), topics, tiny_models / "cloud.onnx", f"w{uuid.uuid4().hex[:6]}"
        )
    )
    worker.start()
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    swamp = LoadPublisher(broker, topics, "swamped")
    swamp.publish(queue=10_000, capacity=100.0)  # 100 s of queue: hopeless for a 2 s deadline
    config = quick_agent_config(broker, topics, tiny_models, tmp_path / "state")
    n = 48
    first, second = tiny_images(n, seed=21), tiny_images(n, seed=22)
    agent = DeviceAgent(config).start()
    try:
        capacity = agent.capacity
        assert capacity is not None  # on by default
        # The retained load reaches the agent once its subscription is in place.
        wait_for(lambda: (capacity.report()["load_ms"] or 0) > 1000, 10, "the swamped load")
        swamped = agent.run_dataset([(image, i % 10) for i, image in enumerate(first)])

        def idle_and_open() -> bool:  # each fresh idle load adds to the admission share cut while swamped
            swamp.publish(queue=0, capacity=1000.0)
            return capacity.share == 1.0 and (capacity.report()["load_ms"] or math.inf) < 100

        wait_for(idle_and_open, 30, "the idle load to open the admission share")
        idle = agent.run_dataset([(image, i % 10) for i, image in enumerate(second)])
        report = capacity.report()
    finally:
        final = agent.close()
        collector.stop()
        worker.stop()
        swamp.close()

    cascade = EdgeCascade(tiny_models)
    expected: List[Optional[str]] = []
    decisions = cascade.decide(np.concatenate([first, second]))
    for i, d in enumerate(decisions):
        expected.append(("shed" if i < n else "cloud") if d.complex else d.exit_stage)
    complex_first = sum(d.complex for d in decisions[:n])
    assert 0 < complex_first < n and 0 < sum(d.complex for d in decisions[n:]) < n
    assert (swamped.shed, swamped.fallbacks, swamped.offloaded) == (complex_first, 0, 0)
    # Idle: the complex samples go again, except that until the first answer came back one offload at a time
    # does (slow start from one, shed "start"); none waits out a deadline.
    complex_second = sum(d.complex for d in decisions[n:])
    assert idle.fallbacks == 0 and idle.exits.get("cloud", 0) + idle.shed == complex_second
    assert idle.exits.get("cloud", 0) > idle.shed - report["shed_start"] >= 0
    assert report["shed_capacity"] >= complex_first and report["probes"] == 0
    assert final.outbox_left == {"record": 0, "offload": 0} and final.refused_records == 0  # run_end too

    rows = _rows(db, agent.run_id)
    assert sorted(rows) == list(range(2 * n))  # none lost, none twice
    stages = [rows[i]["exit_stage"] for i in range(2 * n)]
    first_sent = next(i for i in range(n, 2 * n) if decisions[i].complex)
    assert stages[first_sent] == "cloud"  # the first offload always goes
    kept = {i for i in range(n, 2 * n) if expected[i] == "cloud" and stages[i] == "shed"}
    assert len(kept) == idle.shed
    assert [("shed" if i in kept else e) for i, e in enumerate(expected)] == stages
    for i, d in enumerate(decisions[:n]):
        if d.complex:  # the edge's answer, an edge exit in every account
            row = rows[i]
            assert row["prediction"] == d.prediction and row["bytes_up"] == row["bytes_down"] == 0
            assert row["network_ms"] is None and row["cloud_ms"] is None and row["p_cloud"] is None
            assert row["device_j_gross"] is not None and row["device_j_analytic"] > 0
    with sqlite3.connect(db) as raw:
        summary = raw.execute(
            "SELECT exit_shed, exit_fallback, exit_cloud FROM run_summary WHERE run_id = ?", (agent.run_id,)
        ).fetchone()
    assert summary == (complex_first + idle.shed, 0, idle.exits["cloud"])


class RefusingCloud:
    """Answers every offload of `device_id` with an `OffloadRefusal`, as a swamped worker does."""

    def __init__(self, broker: BrokerProcess, topics: Topics, device_id: str) -> None:
        address = broker.credentials("cloud")
        self.refused = 0
        self.client = new_client(address, f"refuser-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._refuse
        self.client.connect(address.host, address.port)
        self.client.subscribe(topics.offload(device_id), qos=1)
        self.client.loop_start()

    def _refuse(self, client: Any, userdata: Any, message: Any) -> None:
        request = decode_offload(bytes(message.payload))
        refusal = OffloadRefusal(request.run_id, request.device_id, request.seq, "w-swamped", "busy", 3e3)
        props = publish_properties(
            content_type=CONTENT_TYPE_REFUSAL, correlation_data=message.properties.CorrelationData, expiry_s=5
        )
        client.publish(message.properties.ResponseTopic, encode_refusal(refusal), qos=1, properties=props)
        self.refused += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
def test_an_offload_a_worker_refuses_is_answered_at_the_edge_at_once_as_shed(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path
) -> None:
    """Without refusals an offload the cloud will not answer in time waits out its deadline (here 30 s,
    longer than this test may take) to fall back; refused, it is the edge's answer now, flagged shed, with
    the bytes it cost, and the capacity rule counts the refusal."""
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    cloud = RefusingCloud(broker, topics, device_id)
    config = quick_agent_config(
        broker, topics, tiny_models, tmp_path / "state", device_id=device_id, offload_deadline_s=30.0
    )
    n = 48
    images = tiny_images(n, seed=23)
    agent = DeviceAgent(config).start()
    try:
        assert agent.capacity is not None
        summary = agent.run_dataset([(image, i % 10) for i, image in enumerate(images)])
        report = agent.capacity.report()
        sent = agent.offloads.stats["offloaded"]
    finally:
        agent.close()
        cloud.close()
    wait_for(lambda: len(_rows(db, agent.run_id)) == n, 20, "every row stored")
    collector.stop()
    decisions = EdgeCascade(tiny_models).decide(images)
    complex_ = [i for i, d in enumerate(decisions) if d.complex]
    assert complex_ and summary.fallbacks == 0
    assert report["refused"] == sent == cloud.refused > 0  # every offload that went was refused
    rows = _rows(db, agent.run_id)
    for i, d in enumerate(decisions):
        row = rows[i]
        assert row["prediction"] == d.prediction
        if not d.complex:
            assert row["exit_stage"] == d.exit_stage
        elif row["bytes_up"]:  # sent and refused: it cost the upload, nothing came down but the refusal
            assert row["exit_stage"] == "shed" and row["cloud_ms"] is None and row["p_cloud"] is None
        else:  # shed by the rule before sending (the refusals cut its share)
            assert row["exit_stage"] == "shed"
    assert sum(1 for i in complex_ if rows[i]["bytes_up"]) == sent
