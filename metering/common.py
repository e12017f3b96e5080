"""The meters: cumulative joules per rail, monotonic timestamps (figures: window.py, errors: errors.py).

A meter is one of two kinds:

- a hardware energy counter (RAPL, NVML, the CPU-time estimate): `CounterMeter`, read on demand;
- a power sensor sampled by a background thread (INA3221, tegrastats, jtop): `SampledPowerMeter`, which
  integrates watts into joules with the trapezoid rule between samples.

Both hand out `Reading`s (monotonic time, cumulative joules per rail since the meter opened, samples so far).
`Meter.window()` wraps a batch of inferences and yields an `EnergyWindow` that names its source, its rails,
its start and end, its sample counts, the idle watts and both gross and idle-subtracted joules: a figure never
mixes sources, because a meter has exactly one.
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional

from metering.errors import (
    MeterError,
    MeterPermissionError,
    MeterReadError,
    MeterUnavailable,
    translate_os_error,
)
from metering.window import EnergyWindow, IdleBaseline, Reading, Window

logger = logging.getLogger(__name__)

SOURCES = ("rapl", "jtop", "tegrastats", "ina3221", "nvml", "estimate")
DEFAULT_IDLE_SECONDS = 5.0
Clock = Callable[[], float]
__all__ = [
    "SOURCES",
    "DEFAULT_IDLE_SECONDS",
    "Clock",
    "MeterError",
    "MeterUnavailable",
    "MeterPermissionError",
    "MeterReadError",
    "translate_os_error",
    "Reading",
    "IdleBaseline",
    "EnergyWindow",
    "Window",
    "Meter",
    "CounterMeter",
    "SampledPowerMeter",
    "PollingThread",
]


class Meter:
    """Cumulative joules per rail with monotonic timestamps. Subclasses implement `read()`.

    `rails` are every rail the meter reports; `total_rails` are those summed into a window's gross joules
    (for example the board input rail only, never the input plus the rails it feeds).
    """

    source = "none"

    def __init__(
        self,
        *,
        rails: List[str],
        total_rails: Optional[List[str]] = None,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        sleep: Callable[[float], None] = time.sleep,
        detail: Optional[Dict[str, Any]] = None,
    ) -> None:
        if not rails:
            raise MeterUnavailable(f"{self.source}: no rails found")
        total = list(rails) if total_rails is None else list(total_rails)
        missing = [r for r in total if r not in rails]
        if missing or not total:
            raise ValueError(f"total rails {total} must be a non-empty subset of {rails}")
        self._rails = list(rails)
        self._total_rails = total
        self.clock = clock
        self.wall_clock = wall_clock
        self._sleep = sleep
        self.detail: Dict[str, Any] = dict(detail or {})
        self.read_errors = 0

    @property
    def rails(self) -> List[str]:
        return list(self._rails)

    @property
    def total_rails(self) -> List[str]:
        return list(self._total_rails)

    def read(self) -> Reading:
        """Cumulative joules per rail since the meter opened, now."""
        raise NotImplementedError

    def delta(self, start: Reading, end: Reading) -> Dict[str, float]:
        """Joules per rail between two readings of this meter."""
        return {r: end.joules[r] - start.joules[r] for r in self._rails}

    def total_j(self, rails_j: Dict[str, float]) -> float:
        """Sum the rails that make up the total (see `total_rails`)."""
        return sum(rails_j[r] for r in self._total_rails)

    def window(self, idle: Optional[IdleBaseline] = None) -> Window:
        """An energy window over a batch of inferences (`with meter.window(idle) as w: ...; w.add(s)`)."""
        return Window(self, idle)

    def measure_idle(self, seconds: float = DEFAULT_IDLE_SECONDS) -> IdleBaseline:
        """Mean power per rail over `seconds` of doing nothing; call it before a run, the device quiet."""
        if seconds <= 0:
            raise ValueError(f"idle seconds must be > 0, got {seconds}")
        if seconds < DEFAULT_IDLE_SECONDS:
            logger.info(
                "idle baseline over %.3g s (< %.0f s): expect a noisy figure", seconds, DEFAULT_IDLE_SECONDS
            )
        measured_unix = self.wall_clock()
        start = self.read()
        self._sleep(seconds)
        end = self.read()
        duration_s = end.t - start.t
        if duration_s <= 0:
            raise MeterReadError(f"{self.source}: the clock did not advance during the idle baseline")
        joules = self.delta(start, end)
        return IdleBaseline(
            source=self.source,
            rails={r: j / duration_s for r, j in joules.items()},
            duration_s=duration_s,
            idle_w=self.total_j(joules) / duration_s,
            measured_unix=measured_unix,
            meter_samples=end.samples - start.samples,
        )

    def close(self) -> None:
        """Release files, threads, processes and libraries. Idempotent."""

    def __enter__(self) -> Meter:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} source={self.source} rails={self._rails} total={self._total_rails}>"


class CounterMeter(Meter):
    """A meter over a hardware (or OS) energy counter: `_read_joules()` returns cumulative joules per rail."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._lock = threading.Lock()
        self._samples = 0

    def _read_joules(self) -> Dict[str, float]:
        raise NotImplementedError

    def read(self) -> Reading:
        with self._lock:
            joules = self._read_joules()
            self._samples += 1
            return Reading(self.clock(), joules, self._samples)


class SampledPowerMeter(Meter):
    """A meter over sampled power: the subclass feeds `_ingest(t, watts_per_rail)`, usually from a thread.

    Energy is the trapezoid integral of the samples. Between the last sample and now, power is held at the
    last value; when a window closes, its start is re-evaluated with any samples that arrived since (linear
    interpolation between the two samples around it), so a window's joules are never negative. Each window
    edge is thus known to within about half a sampling interval of power change; keep windows much longer
    than the sampling interval, and look at `meter_samples` to see how many samples a window holds.
    """

    HISTORY = 4096  # samples kept for re-evaluating window starts
    STALE_INTERVALS = 20  # no sample for this many intervals (and >= 2 s) means the source died

    def __init__(self, *, interval_s: float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if interval_s <= 0:
            raise ValueError(f"sampling interval must be > 0, got {interval_s}")
        self.interval_s = interval_s
        self._cond = threading.Condition()
        self._samples = 0
        self._t: List[float] = []  # history: sample times, power and cumulative joules at each sample
        self._p: List[Dict[str, float]] = []
        self._e: List[Dict[str, float]] = []
        self._energy = {r: 0.0 for r in self._rails}
        self._failure: Optional[str] = None
        self.missing_rail_samples = 0

    # -- fed by the subclass --
    def _ingest(self, t: float, watts: Dict[str, float]) -> None:
        """Add one power sample (watts per rail) taken at monotonic time `t`."""
        with self._cond:
            if self._t and t <= self._t[-1]:
                return  # out of order or duplicate: the integral needs increasing time
            power = {}
            for r in self._rails:
                if r in watts:
                    power[r] = float(watts[r])
                else:  # a rail missing from one sample: hold its previous value
                    self.missing_rail_samples += 1
                    power[r] = self._p[-1][r] if self._p else 0.0
            if self._t:
                dt = t - self._t[-1]
                prev = self._p[-1]
                for r in self._rails:
                    self._energy[r] += 0.5 * (prev[r] + power[r]) * dt
            self._t.append(t)
            self._p.append(power)
            self._e.append(dict(self._energy))
            self._samples += 1
            if len(self._t) > 2 * self.HISTORY:
                del self._t[: self.HISTORY], self._p[: self.HISTORY], self._e[: self.HISTORY]
            self._cond.notify_all()

    def _fail(self, reason: str) -> None:
        """The sampler stopped for good; the next read raises MeterReadError with `reason`."""
        with self._cond:
            self._failure = reason
            self._cond.notify_all()

    # -- used by windows --
    def wait_for_samples(self, count: int, timeout_s: float) -> bool:
        """Block until `count` samples in all have arrived (or the sampler failed); True if they did."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._samples < count and self._failure is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return self._samples >= count

    def _energy_at(self, t: float) -> Dict[str, float]:
        """Cumulative joules at time t (caller holds the lock; the history is not empty)."""
        i = bisect.bisect_right(self._t, t) - 1
        if i < 0:
            i = 0
            t = self._t[0]
        t0, p0, e0 = self._t[i], self._p[i], self._e[i]
        if i + 1 < len(self._t):  # inside the history: linear power between the two samples
            t1, p1 = self._t[i + 1], self._p[i + 1]
            frac = (t - t0) / (t1 - t0)
            return {r: e0[r] + (t - t0) * (p0[r] + 0.5 * frac * (p1[r] - p0[r])) for r in self._rails}
        return {r: e0[r] + p0[r] * (t - t0) for r in self._rails}  # after the last sample: hold

    def read(self) -> Reading:
        with self._cond:
            if self._failure is not None:
                raise MeterReadError(f"{self.source}: {self._failure}")
            if not self._t:
                raise MeterReadError(f"{self.source}: no power sample yet")
            now = self.clock()
            silent_s = now - self._t[-1]
            if silent_s > max(2.0, self.STALE_INTERVALS * self.interval_s):
                raise MeterReadError(f"{self.source}: no power sample for {silent_s:.1f} s")
            return Reading(now, self._energy_at(now), self._samples)

    def delta(self, start: Reading, end: Reading) -> Dict[str, float]:
        with self._cond:
            # the start is re-evaluated with the samples that came since (unless it left the history)
            start_j = self._energy_at(start.t) if self._t and start.t >= self._t[0] else start.joules
        return {r: max(end.joules[r] - start_j[r], 0.0) for r in self._rails}


class PollingThread:
    """A daemon thread that calls `step()` every `interval_s` until stopped; errors end it via `on_error`."""

    def __init__(
        self, name: str, interval_s: float, step: Callable[[], None], on_error: Callable[[str], None]
    ) -> None:
        self.interval_s = interval_s
        self._step = step
        self._on_error = on_error
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self._step()
            except Exception as err:  # the thread must report, not vanish: read() raises it later
                logger.warning("%s stopped: %s", self._thread.name, err)
                self._on_error(str(err))
                return
            self._stop.wait(self.interval_s)

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout_s)
