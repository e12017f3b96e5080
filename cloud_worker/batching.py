"""Dynamic micro-batching: collect up to `max_batch` requests, waiting at most `max_wait_s` for more, and not
at all when the queue is idle.

The rule: take everything pending (up to `max_batch`). If that is one request and nothing else is waiting,
run it now: a lone request on an idle worker must not pay `max_wait`. If several were pending (a burst, or
requests that piled up while the previous batch ran), load is present, so wait for more until the batch is
full or `max_wait_s` has passed since the *oldest* request arrived (no request waits longer than that here).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Deque, Generic, List, TypeVar

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One queued item and when it arrived (time.monotonic)."""

    item: T
    arrived: float = field(default_factory=time.monotonic)


class MicroBatcher(Generic[T]):
    """A thread-safe queue whose consumer takes batches (see the module docstring for the rule)."""

    def __init__(self, max_batch: int, max_wait_s: float) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self._queue: Deque[Pending[T]] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, item: T) -> None:
        with self._cond:
            self._queue.append(Pending(item))
            self._cond.notify()

    def __len__(self) -> int:
        return len(self._queue)

    def close(self) -> None:
        """Wake the consumer; `take` returns what is left, then empty lists."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def _drain(self, batch: List[Pending[T]]) -> None:
        while self._queue and len(batch) < self.max_batch:
            batch.append(self._queue.popleft())

    def take(self, timeout_s: float) -> List[Pending[Any]]:
        """The next batch, or [] when nothing arrived within `timeout_s` (or the batcher is closed)."""
        with self._cond:
            if not self._queue and not self._closed:
                self._cond.wait(timeout_s)
            batch: List[Pending[T]] = []
            self._drain(batch)
            if len(batch) <= 1 or self._closed or self.max_wait_s == 0:
                return batch  # idle queue (or nothing at all): no waiting
            deadline = batch[0].arrived + self.max_wait_s
            while len(batch) < self.max_batch and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                if not self._queue:
                    self._cond.wait(remaining)
                self._drain(batch)
            return batch
