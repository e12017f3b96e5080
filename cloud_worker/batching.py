"""Dynamic micro-batching: collect up to `max_batch` requests, waiting at most `max_wait_s` for more, and not
at all when the queue is idle.

The rule, applied after the worker has read everything the socket holds: one request pending means the
worker is idle, so it runs now (a lone request must not pay `max_wait`). Several pending (a burst, or requests
that piled up while the previous batch ran) means load, so the worker waits for more until the batch is
full or `max_wait_s` has passed since the *oldest* pending request arrived; no request waits longer here.
It waits only while waiting can pay, judged from exponential averages of the gap between arrivals and of
the compute time per sample: the next request must be expected within the time left (gap <= time left),
and the worker must be busy enough for batching to matter (compute per sample >= half the gap). A worker
that computes a sample in 0.1 ms while requests come 2 ms apart answers each alone as fast as it comes,
and a 2 ms `max_wait` would only add ~2 ms to every small burst (measured in bench/offload_bench.py).

Single-threaded on purpose: the worker's one thread reads the socket, decides, computes and writes, so there
is no hand-off between threads on the request path (each costs a context switch, measured ~0.3 ms a round
trip on a 2-core box) and batches form by themselves while a batch is computing.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Deque, Generic, List, Optional, TypeVar

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One queued item and when it arrived (time.monotonic seconds)."""

    item: T
    arrived: float


class BatchQueue(Generic[T]):
    """A FIFO of pending requests plus the batching rule (see the module docstring). Not thread-safe."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: Deque[Pending[T]] = deque()
        self._last_arrival: Optional[float] = None
        self.mean_gap_s = float("inf")  # exponential average of the time between arrivals
        self.compute_per_sample_s = 0.0  # exponential average of batch compute time / batch size

    def put(self, item: T, now: float) -> None:
        if self._last_arrival is not None:
            gap = max(0.0, now - self._last_arrival)
            self.mean_gap_s = gap if self.mean_gap_s == float("inf") else 0.9 * self.mean_gap_s + 0.1 * gap
        self._last_arrival = now
        self._queue.append(Pending(item, now))

    def note_compute(self, seconds: float, samples: int) -> None:
        """Tell the rule how long the last batch of `samples` took to compute."""
        per_sample = seconds / max(samples, 1)
        if self.compute_per_sample_s == 0.0:
            self.compute_per_sample_s = per_sample
        else:
            self.compute_per_sample_s = 0.9 * self.compute_per_sample_s + 0.1 * per_sample

    def __len__(self) -> int:
        return len(self._queue)

    def wait_s(self, now: float) -> Optional[float]:
        """None: nothing pending. 0: take a batch now. Otherwise: seconds to keep collecting first."""
        if not self._queue:
            return None
        if len(self._queue) == 1 or len(self._queue) >= self.max_batch:
            return 0.0
        remaining = self._queue[0].arrived + self.max_wait_s - now
        if remaining <= 0 or self.mean_gap_s > remaining or self.compute_per_sample_s < 0.5 * self.mean_gap_s:
            return 0.0
        return remaining

    def take(self) -> List[Pending[T]]:
        """The oldest `max_batch` (or fewer) pending requests, in arrival order."""
        n = min(self.max_batch, len(self._queue))
        return [self._queue.popleft() for _ in range(n)]
