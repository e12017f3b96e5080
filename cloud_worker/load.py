"""How busy a worker is, measured where it computes: the figures of the `WorkerLoad` it publishes
(`protocol.load`) and the busy totals in its stats.

A batch's time is its compute stream's time on it, from taking the batch to handing its last reply to the
network thread (the model's run and the replies' encoding): while it lasts that stream cannot start
another batch, so that is what bounds capacity. `busy` is that time over the wall time of all streams
(busy_s / (wall_s x streams)); a batch still running when the figures are read counts up to that instant,
so one long batch does not read as idle and then as more than 100 %. `service_ms` is an exponential
average of a batch's time over its size; `capacity_per_s` is the streams times the average batch size over
the average batch time: the samples per second the worker computes at the batch sizes it has recently run
(larger batches compute more per second), not at its best size. Concurrent streams share the cores, so
their batch times already carry what they cost each other.
"""

from __future__ import annotations

import threading
import time
from typing import Callable, Dict, Optional

# Weight of the newest batch in the averages: about the last ten batches count.
EWMA_WEIGHT = 0.1


class LoadMeter:
    """Busy time and service averages of a worker's compute streams; thread-safe (every thread uses it)."""

    def __init__(self, streams: int = 1, clock: Callable[[], float] = time.monotonic) -> None:
        self.streams = streams
        self._clock = clock
        self._lock = threading.Lock()
        self._started = clock()
        self._busy_s = 0.0  # finished batches
        self._running: Dict[int, float] = {}  # stream -> when its batch began
        self._service_s = 0.0  # EWMA of batch time / batch size
        # Capacity is the ratio of the EWMAs of batch size and batch time, not an EWMA of their ratio: one
        # batch that happened to run in 2 ms moved an average of rates by a tenth of its 1,000/s, and a worker
        # of 20/s published 107/s and took offloads it could not answer in time (tests/test_cloud_load.py).
        self._batch_n = 0.0  # EWMA of batch size
        self._batch_s = 0.0  # EWMA of batch time
        self._window_start = (self._started, 0.0)  # (instant, busy seconds then): for `busy_since_last`

    def seed(self, seconds: float, samples: int) -> None:
        """Start the averages from a timed warm-up run, so that a fresh worker does not read as incapable."""
        with self._lock:
            self._note(seconds, samples)

    def begin(self, stream: int = 0, now: Optional[float] = None) -> None:
        """A batch starts on `stream`."""
        with self._lock:
            self._running[stream] = self._clock() if now is None else now

    def end(self, samples: int, stream: int = 0, now: Optional[float] = None) -> float:
        """The batch that `begin` started on `stream` is done (its replies handed over); its seconds."""
        with self._lock:
            began = self._running.pop(stream, None)
            if began is None:
                return 0.0
            seconds = max(0.0, (self._clock() if now is None else now) - began)
            self._busy_s += seconds
            if samples > 0:
                self._note(seconds, samples)
            return seconds

    def _note(self, seconds: float, samples: int) -> None:
        seconds = max(seconds, 1e-9)
        per_sample = seconds / samples
        if self._batch_s == 0.0:
            self._service_s, self._batch_n, self._batch_s = per_sample, float(samples), seconds
        else:
            w = EWMA_WEIGHT
            self._service_s = (1 - w) * self._service_s + w * per_sample
            self._batch_n = (1 - w) * self._batch_n + w * samples
            self._batch_s = (1 - w) * self._batch_s + w * seconds

    def _capacity(self) -> float:
        return self.streams * self._batch_n / self._batch_s if self._batch_s > 0 else 0.0

    def _busy_at(self, now: float) -> float:
        return self._busy_s + sum(max(0.0, now - began) for began in self._running.values())

    def busy_since_last(self, now: Optional[float] = None) -> float:
        """Fraction 0..1 of the time since the previous call (or the start) spent on batches."""
        with self._lock:
            now = self._clock() if now is None else now
            busy = self._busy_at(now)
            since, busy_then = self._window_start
            self._window_start = (now, busy)
        wall = (now - since) * self.streams
        return min(1.0, max(0.0, (busy - busy_then) / wall)) if wall > 0 else 0.0

    def service_s(self) -> float:
        """The measured compute time per sample (an average over recent batches), seconds."""
        with self._lock:
            return self._service_s

    def capacity_per_s(self) -> float:
        """The measured capacity alone (samples/s, all streams): each arriving offload is judged by it."""
        with self._lock:
            return self._capacity()

    def figures(self) -> Dict[str, float]:
        """service_ms and capacity_per_s (the averages), busy_s and wall_s (totals since start), busy
        (busy_s / (wall_s x streams))."""
        with self._lock:
            now = self._clock()
            busy, wall = self._busy_at(now), now - self._started
            service_ms, capacity = 1000.0 * self._service_s, self._capacity()
        return {
            "service_ms": service_ms,
            "capacity_per_s": capacity,
            "busy_s": busy,
            "wall_s": wall,
            "busy": min(1.0, busy / (wall * self.streams)) if wall > 0 else 0.0,
        }
