"""Capacity-aware offloading: may this sample go to the cloud, or will its answer come back too late?

Cloud workers publish their load (`protocol.load`: queue, service time, capacity; retained, refreshed every
interval); the device adds what it measures itself. For each sample its policy wants to offload,
`CapacityRule.admit` says admitted or shed; a shed sample keeps the edge's answer and is recorded with exit
stage `shed` (never silently), which costs no bytes and no cloud time, and keeps the queue short for the
samples that do go. Pure: no MQTT, an injected clock and random source, so every case is checked by hand
(tests/test_capacity.py). The agent feeds it (`device_agent.agent`) and asks it (`device_agent.inference`).

    predicted_ms = transit_ms + wait_ms + service_ms

- `transit_ms`: broker and network, an EWMA (time-weighted, see `answered`) of answered offloads' round trip
  minus the worker's own part (its queue wait and its batch's compute, which the reply carries; the round trip
  minus `cloud_ms` when it does not). Only the worker's part is taken out, because the load accounts for it:
  counting the queue twice would shed at half the intended wait and leave workers idle. What no worker sees,
  a backlog in the broker, stays in and is shed on.
- `wait_ms`: the mean over live workers of queue / capacity. Mosquitto hands a shared subscription's messages
  round-robin, whatever the queues: an offload meets each worker's wait equally often (sum / sum would assume
  it joins the shortest queue).
- `service_ms`: the mean of the live workers' recent compute time per sample.

Two bounds. The whole prediction may be at most `shed_above` × the deadline, 0.4 by default (800 ms at 2 s):
short of the device's re-send at half the deadline (which the loads spare where they vouch that a live
worker holds the offload, `held_since`; where they cannot, a copy doubles the work of a worker that may be
merely slow), and far from the deadline itself. The cloud's part, wait + service, may be at most
QUEUE_BOUND × the deadline (a quarter, the worker's own refusal bound): a load is up to one publishing
interval old and the fleet keeps offloading meanwhile, and a queue held there still holds many batches, so
workers stay busy. A slow but steady link (a satellite's 600 ms) is no reason to shed; a queue that would
grow past a quarter is.

A sample is shed, in this order, when
1. the device's own in-flight window is full (`window`): blocking the inference thread until a place frees
   would stall the easy samples behind it too; or, until the cloud has answered once (a reply or a
   refusal), one offload is in flight already (`start`): TCP's slow start begins from one segment, and a
   fleet that starts together would otherwise send its first burst on loads alone, before any device has
   measured a round trip (in the fleet simulation most deadline waits fell in those first seconds);
2. the operator's budget is spent (`budget`): a token bucket of `budget_per_s` offloads a second, at most
   `budget_burst` saved up (None: unlimited);
3. `predicted_ms` exceeds its bound or the workers' part of it the queue bound (`capacity`), or the sample
   falls outside the device's admission share (`share`, below);
4. the device's own evidence says the cloud is late (`late`): the latest offload to settle fell back at its
   deadline and none has been answered since. That is also all there is to go on when no worker's load is
   known (none published yet, all gone or stale): then only this rule and the transit estimate apply.

The admission share (of the samples the policy would offload, those that may go while the prediction is
within the bound) is how the fleet avoids moving as a herd. Every device reads the same retained load at the
same moment, up to an interval old. A hard step at the bound makes all of them offload at once, overshoot,
all shed, and so on; a fixed ramp (admit with a probability falling as the prediction nears the bound) is
still a feedback loop through that stale load, whose gain (demand × interval ÷ the ramp's width in queued
samples) is far beyond the 2 that such a sampled loop tolerates once demand is a few times the capacity.
In a model of the fleet (tests/test_capacity.py `simulate`: 50 devices, 2 workers) a ramp from half the
bound held 5 × overload with loads 0.5 s apart (0.2 % of offloads fell back) but lost 35 % of them at 10 ×,
and 30 % at 5 × with loads 1 s apart (without any rule: 70 % at 5 ×; bench/fleet_sim.py measured 72 %).
So the share is steered like TCP's window, on each fresh load: down (× SHARE_DOWN) while the prediction is
above TARGET × the bound and that worker's queue has not shrunk since its last load; up (+ SHARE_UP) when it
is below; held while a long queue drains. Devices that see the same loads take the same steps, and
multiplicative decrease brings their shares together. It starts at SHARE_START, doubling on each fresh load
below the target and growing a little with each quick answer (a device that has the workers to itself opens
up within a second), until the first decrease: a fleet that starts together would otherwise fill the queues
with seconds of work before the first load that shows it arrives. (Same model: with loads 0.5 s apart, as
workers publish them, no offload waits out its deadline from 2 × to 20 × overload, 0.4 % at 10 × with loads
1 s apart; the workers are busy 88-100 % of the time; an idle fleet sheds 4 % of its complex samples in 20 s,
all in its first two seconds.)

A sample without an edge answer (cloud-only with nothing run on the device) has only the cloud: shed, it
would have no answer at all. So only what says its answer cannot come in time sheds it: the budget, and a
prediction beyond the deadline itself (rule 3 with the deadline as the bound, no share); a full window
makes it wait for a place, as without capacity-awareness, and rule 4 lets it go.

A worker that sees an offload would wait too long in its queue refuses it at once (`OffloadRefusal`): the
device answers at the edge (also `shed`), and takes it as the loss signal TCP takes: the share is cut
(x SHARE_DOWN, at most once per REFUSAL_HOLD_S, as TCP cuts once per round trip) and slow start ends. A
fallback at the deadline cuts it alike. The
refusal is what catches the overshoot the stale loads leave, in time: without it an offload that joins a
queue grown past the deadline is only known lost when the deadline passes.

Own evidence (rule 4, and a transit estimate that alone tips a sample over the bound) changes only when
offloads settle, so while it sheds, one offload per `probe_s` (default: the deadline) still goes as a probe:
at most one sample a deadline risks a fallback, and the device learns when the cloud is back. Shedding on the
workers' load needs no probes: they keep publishing.
"""

from __future__ import annotations

import math
import random
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, NamedTuple, Optional

from protocol import OffloadReply
from protocol.load import WorkerLoad

SHED_ABOVE = 0.4  # of the deadline: the bound on the predicted round trip (see the module docstring)
QUEUE_BOUND = 0.25  # of the deadline: the bound on the cloud's part of it, wait + service
TARGET = 0.5  # of the queue bound: the cloud's part the admission share steers to
SHARE_START, SHARE_MIN = 1 / 16, 1 / 64  # the admission share's start (slow start) and floor
SHARE_UP, SHARE_DOWN = 0.1, 0.7  # added / multiplied per round of fresh loads (one from every live worker)
SHARE_PER_QUICK_ANSWER = 0.25  # slow start: the share grows by this fraction per answer within the target
LOAD_STALE_S = 3.0  # a worker's load not refreshed this long (local receipt time) is no longer believed
REFUSAL_HOLD_S = 0.5  # refusals and fallbacks within this long of a cut are one congestion event
TRANSIT_HALF_LIFE_S = 1.0  # the transit EWMA: an observation this old has half the weight of a fresh one
TRANSIT_MIN_WEIGHT = 0.1  # ... and each new observation at least this much (many replies in one instant)


class Admission(NamedTuple):
    """The rule's answer for one sample: admitted or not, why, and the prediction it went on (ms)."""

    admitted: bool
    reason: str  # admitted: "ok", "probe"; shed: SHED_REASONS
    predicted_ms: Optional[float] = None


SHED_REASONS = ("window", "start", "budget", "capacity", "share", "late")


@dataclass
class _Held:
    load: WorkerLoad
    received: float  # local monotonic time the news arrived: the workers' clocks are not ours


def worker_time_ms(reply: OffloadReply) -> float:
    """The part of a round trip the worker spent on the sample: its queue wait and its whole batch's compute
    (a reply leaves when its batch is done), from the reply's `extra` where the worker reports them."""
    extra = reply.extra or {}
    queue_ms, batch = extra.get("queue_ms"), extra.get("batch")
    if isinstance(queue_ms, bool) or not isinstance(queue_ms, (int, float)) or not 0 <= queue_ms < math.inf:
        return reply.cloud_ms
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        return reply.cloud_ms
    return float(queue_ms) + reply.cloud_ms * batch


class CapacityRule:
    """Thread-safe: loads and replies arrive on paho's thread, fallbacks on the link's, `admit` is asked on
    the inference thread."""

    def __init__(
        self,
        deadline_s: float,
        *,
        shed_above: float = SHED_ABOVE,
        budget_per_s: Optional[float] = None,
        budget_burst: Optional[float] = None,
        probe_s: Optional[float] = None,
        load_stale_s: float = LOAD_STALE_S,
        clock: Callable[[], float] = time.monotonic,
        rng: Optional[random.Random] = None,
    ) -> None:
        if not deadline_s > 0 or not 0 < shed_above <= 1:
            raise ValueError(f"need deadline_s > 0 and 0 < shed_above <= 1, got {deadline_s}, {shed_above}")
        if budget_per_s is not None and not budget_per_s > 0:
            raise ValueError(f"budget_per_s must be > 0 (None: unlimited), got {budget_per_s}")
        self.deadline_ms = deadline_s * 1000.0
        self.bound_ms = shed_above * self.deadline_ms
        self.queue_bound_ms = min(QUEUE_BOUND, shed_above) * self.deadline_ms
        self.budget_per_s = budget_per_s
        # One second's worth by default (at least one offload): a device may catch up after a quiet second.
        self.budget_burst = float(budget_burst if budget_burst is not None else max(1.0, budget_per_s or 0))
        if budget_per_s is not None and self.budget_burst < 1:
            raise ValueError(f"budget_burst must be at least 1, got {budget_burst}")
        self.probe_s = deadline_s if probe_s is None else probe_s
        self.load_stale_s = load_stale_s
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()  # own seed per device: no lockstep draws
        self._lock = threading.Lock()
        self._loads: Dict[str, _Held] = {}
        self._latest_ts: Dict[str, float] = {}  # per source, the newest ts_unix seen (outlives staleness)
        self._transit_ms: Optional[float] = None
        self._transit_at = 0.0
        self._late = False
        self._lost_at = -math.inf  # when a worker last went (its will, or its load gone stale)
        self._heard = False  # the cloud has answered (a reply or a refusal) since the start
        self._share, self._slow_start = SHARE_START, True
        self._tokens = self.budget_burst
        self._tokens_at = clock()
        self._last_admitted = -math.inf
        self._last_cut = -math.inf
        self.stats: Dict[str, int] = {
            "admitted": 0,
            "probes": 0,
            "refused": 0,
            **{f"shed_{reason}": 0 for reason in SHED_REASONS},
            "loads": 0,
            "stale_loads": 0,
            "workers_gone": 0,
        }

    # -- news -----------------------------------------------------------------------------------------
    def worker_load(self, source: str, load: Optional[WorkerLoad]) -> None:
        """The latest load published on `source` (a worker's load topic); None: the worker is gone (its
        will cleared the retained load)."""
        now = self._clock()
        with self._lock:
            if load is None:
                if self._loads.pop(source, None) is not None:
                    self.stats["workers_gone"] += 1
                    self._lost_at = now
                self._latest_ts.pop(source, None)  # whoever publishes there next starts afresh
                return
            self.stats["loads"] += 1
            if load.ts_unix <= self._latest_ts.get(source, -math.inf):
                # The same retained load again (a re-subscription hands it out on every connect): no news,
                # so it neither refreshes the receipt time nor revives a stale load, or a hung worker would
                # look alive at every reconnect. Only the worker's clock is compared with itself here.
                return
            self._latest_ts[source] = load.ts_unix
            before = self._loads.get(source)
            self._loads[source] = _Held(load, now)
            self._steer(now, shrunk=before is not None and load.queue < before.load.queue)

    def _steer(self, now: float, shrunk: bool) -> None:
        """A fresh load: the admission share's step (why: the module docstring). Each of n live workers'
        loads takes 1/n of a step, so a round of them takes one, whatever n."""
        loaded = self._load_ms(now)
        if loaded is None:
            return
        step = 1.0 / len(self._loads)
        if loaded > TARGET * self.queue_bound_ms:
            if not shrunk:  # a queue that drains is answered already: deeper cuts would idle the workers
                self._share = max(SHARE_MIN, self._share * SHARE_DOWN**step)
                self._slow_start = False
        elif self._slow_start:
            self._share = min(1.0, self._share * 2.0**step)
        else:
            self._share = min(1.0, self._share + SHARE_UP * step)

    def answered(self, round_trip_ms: Optional[float], reply: OffloadReply) -> None:
        """An offload answered in time: the cloud is not late; its transit feeds the estimate."""
        now = self._clock()
        with self._lock:
            self._late = False
            self._heard = True
            if round_trip_ms is None:
                return
            if self._slow_start and self._loads and worker_time_ms(reply) <= TARGET * self.queue_bound_ms:
                self._share = min(1.0, self._share * (1.0 + SHARE_PER_QUICK_ANSWER))
            transit = max(0.0, round_trip_ms - worker_time_ms(reply))
            if self._transit_ms is None:
                self._transit_ms = transit
            else:
                # Weighted by the time since the last one: a probe after a quiet spell replaces the stale
                # estimate nearly outright, a burst of replies averages.
                fresh = 1.0 - 0.5 ** ((now - self._transit_at) / TRANSIT_HALF_LIFE_S)
                self._transit_ms += max(TRANSIT_MIN_WEIGHT, fresh) * (transit - self._transit_ms)
            self._transit_at = now

    def refused(self) -> None:
        """A worker refused an offload (its queue would answer too late): congestion, as a loss is to TCP."""
        with self._lock:
            self.stats["refused"] += 1
            self._late = False  # the cloud answers, with a no
            self._heard = True
            self._cut(self._clock())

    def fell_back(self) -> None:
        """An offload waited out its deadline: the cloud is late until one is answered; and a loss, which
        cuts the share as a refusal does (the delay was where no load shows it: the broker, the link)."""
        with self._lock:
            self._late = True
            self._cut(self._clock())

    def _cut(self, now: float) -> None:
        if now - self._last_cut >= REFUSAL_HOLD_S:
            self._share = max(SHARE_MIN, self._share * SHARE_DOWN)
            self._slow_start = False
            self._last_cut = now

    # -- the decision ---------------------------------------------------------------------------------
    def admit(self, *, window_full: bool = False, edge_answer: bool = True, in_flight: int = 0) -> Admission:
        """Whether the sample the policy wants to offload goes (see the module docstring); counted.
        `window_full`: an offload now would wait for a place in flight; `edge_answer`: the edge has one;
        `in_flight`: the device's offloads awaiting an answer."""
        now = self._clock()
        with self._lock:
            verdict = self._decide(now, window_full, edge_answer, in_flight)
            if verdict.admitted:
                if self.budget_per_s is not None:
                    self._tokens -= 1.0
                self._last_admitted = now
                self.stats["probes" if verdict.reason == "probe" else "admitted"] += 1
            else:
                self.stats[f"shed_{verdict.reason}"] += 1
            return verdict

    def _decide(self, now: float, window_full: bool, edge_answer: bool, in_flight: int) -> Admission:
        if window_full and edge_answer:
            return Admission(False, "window")
        if not self._heard and in_flight > 0 and edge_answer:
            return Admission(False, "start")
        if self.budget_per_s is not None:
            self._tokens = min(self.budget_burst, self._tokens + (now - self._tokens_at) * self.budget_per_s)
            self._tokens_at = now
            if self._tokens < 1.0:
                return Admission(False, "budget")
        loaded = self._load_ms(now)
        predicted = (self._transit_ms or 0.0) + (loaded or 0.0)
        probe_due = now - self._last_admitted >= self.probe_s
        bound = self.bound_ms if edge_answer else self.deadline_ms
        queue_bound = self.queue_bound_ms if edge_answer else self.deadline_ms
        if predicted > bound or (loaded or 0.0) > queue_bound:
            # Would the workers' load alone have let it go? Then the device's own (transit) evidence shed
            # it, which only offloads can refresh: a probe, now and then.
            own = loaded is None or loaded <= min(bound, queue_bound)
            if own and probe_due:
                return Admission(True, "probe", predicted)
            return Admission(False, "capacity", predicted)
        if loaded is not None and edge_answer and self._rng.random() >= self._share:
            return Admission(False, "share", predicted)
        if self._late and edge_answer:
            return Admission(True, "probe", predicted) if probe_due else Admission(False, "late", predicted)
        return Admission(True, "ok", predicted)

    def held_since(self, quiet_s: float) -> float:
        """Offloads sent after the time returned (this rule's clock) are still held by a live worker, as far
        as the loads tell: some are known, each was refreshed within `quiet_s` (a worker publishes every half
        second; one gone quiet may be hung with an offload), and none was lost since. math.inf whenever it
        cannot say, so the caller re-sends as it would without loads."""
        now = self._clock()
        with self._lock:
            self._drop_stale(now)
            if not self._loads or any(now - held.received > quiet_s for held in self._loads.values()):
                return math.inf
            return self._lost_at

    def _drop_stale(self, now: float) -> None:
        for source in [s for s, held in self._loads.items() if now - held.received > self.load_stale_s]:
            del self._loads[source]
            self.stats["stale_loads"] += 1
            self._lost_at = now

    def _load_ms(self, now: float) -> Optional[float]:
        """wait + service over the live workers (None: no load known); drops stale ones."""
        self._drop_stale(now)
        if not self._loads:
            # Workers that come back (or others) are a new situation: start slowly again.
            self._share, self._slow_start = SHARE_START, True
            return None
        loads = [held.load for held in self._loads.values()]
        return sum(_wait_ms(load) + load.service_ms for load in loads) / len(loads)

    @property
    def share(self) -> float:
        """The admission share now: of the samples that may go by the prediction, the fraction that do."""
        with self._lock:
            return self._share

    def report(self) -> Dict[str, Any]:
        """Counts and the current estimates, for the run's summary and `run_end`."""
        with self._lock:
            loaded = self._load_ms(self._clock())
            return {
                **self.stats,
                "workers": len(self._loads),
                "load_ms": None if loaded is None else round(loaded, 3),
                "transit_ms": None if self._transit_ms is None else round(self._transit_ms, 3),
                "late": self._late,
                "share": round(self._share, 4),
                "slow_start": self._slow_start,
                "bound_ms": self.bound_ms,
                "queue_bound_ms": self.queue_bound_ms,
            }


def _wait_ms(load: WorkerLoad) -> float:
    """A worker's queue wait. `WorkerLoad.wait_ms` is infinite without a measured capacity; an idle worker
    that has not computed lately has no wait, a busy one at most batch-1 service times."""
    if load.capacity_per_s > 0:
        return load.wait_ms()
    return load.queue * load.service_ms
