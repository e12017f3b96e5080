"""Dynamic micro-batching: collect up to `max_batch` requests, waiting at most `max_wait_s` for more, and not
at all when the queue is idle.

The rule, applied by a compute thread whenever a request arrives (the worker's network thread reads each one
as it comes, also during a batch) and whenever it is free: one request pending means the worker is idle, so
it runs now (a lone request must not pay `max_wait`). Several pending (a burst, or requests
that piled up while the previous batch ran) means load, so the worker waits for more until the batch is
full or `max_wait_s` has passed since the *oldest* pending request arrived; no request waits longer here.
It waits only while waiting can pay, judged from exponential averages of the gap between arrivals and of
the compute time per sample: the next request must be expected within the time left (gap <= time left),
and the worker must be busy enough for batching to matter (compute per sample >= half the gap). A worker
that computes a sample in 0.1 ms while requests come 2 ms apart answers each alone as fast as it comes,
and a 2 ms `max_wait` would only add ~2 ms to every small burst (measured in bench/offload_bench.py).

Fair between devices, bounded in size. Items are queued per key (the device id of the offload's topic, which
the broker's ACL vouches for) and a batch takes them round-robin, one per device in turn, oldest first
within a device: a device with a thousand pending offloads cannot make another's single one wait behind
them. The queue holds at most `max_items`, and one device at most its share of that: `max_items` divided
by the devices seen within the last `active_s` seconds. An item over its device's share (or over the
bound) is *shed*: `put` hands it back for the caller to drop. Shedding rather than holding matters for
the broker's own queue: the worker acknowledges what it sheds at once, so the broker's FIFO of one flooding
device drains at the speed of dropping, not of computing, and other devices' offloads behind it in that
FIFO reach the worker in time. A lone device still gets the whole queue.

A batch may be cut shorter than `max_batch` by the caller (`limit`): every request in it is answered only
when the whole batch is done, so on a slow worker a full batch is a wait of its own (the worker keeps a
batch within a share of its requests' deadlines: cloud_worker/worker.py `BATCH_SHARE`).

Not thread-safe: the worker guards it with one condition (cloud_worker/worker.py), which its network thread
notifies on each arrival and its compute threads wait on.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Deque, Dict, Generic, Hashable, List, Optional, TypeVar

T = TypeVar("T")


@dataclass
class Pending(Generic[T]):
    """One queued item and when it arrived (time.monotonic seconds)."""

    item: T
    arrived: float
    key: Hashable = ""


@dataclass
class Shed(Generic[T]):
    """An item the queue refused to hold, and why: "over_share" (its key had its share) or "queue_full"."""

    pending: Pending[T]
    reason: str


class BatchQueue(Generic[T]):
    """Per-key FIFOs of pending requests, the batching rule and the fair share (see the module docstring).
    Not thread-safe."""

    def __init__(
        self, max_batch: int, max_wait_s: float, max_items: Optional[int] = None, active_s: float = 5.0
    ) -> None:
        if max_batch < 1:
            raise ValueError("max_batch must be >= 1")
        if max_wait_s < 0:
            raise ValueError("max_wait_s must be >= 0")
        if max_items is not None and max_items < 1:
            raise ValueError("max_items must be >= 1")
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.max_items = max_items
        self.active_s = active_s
        # Round-robin order: a key moves to the back once served, so every key's turn comes.
        self._queues: OrderedDict[Hashable, Deque[Pending[T]]] = OrderedDict()
        self._len = 0
        self._seen: Dict[Hashable, float] = {}  # key -> last arrival, for the share
        self._last_arrival: Optional[float] = None
        self.mean_gap_s = float("inf")  # exponential average of the time between arrivals
        self.compute_per_sample_s = 0.0  # exponential average of batch compute time / batch size

    def share(self, now: float) -> Optional[int]:
        """How many items one key may hold now: the bound split among the recently active keys."""
        if self.max_items is None:
            return None
        horizon = now - self.active_s
        for key in [k for k, t in self._seen.items() if t < horizon and k not in self._queues]:
            del self._seen[key]
        return max(1, self.max_items // max(1, len(self._seen)))

    def put(self, item: T, now: float, key: Hashable = "") -> Optional[Shed[T]]:
        """Queue `item` under `key`; returns what must be shed instead (this item, over its key's share,
        or the newest item of the fullest key, over the bound), None when everything fits."""
        if self._last_arrival is not None:
            gap = max(0.0, now - self._last_arrival)
            self.mean_gap_s = gap if self.mean_gap_s == float("inf") else 0.9 * self.mean_gap_s + 0.1 * gap
        self._last_arrival = now
        self._seen[key] = now
        pending = Pending(item, now, key)
        share = self.share(now)
        queue = self._queues.get(key)
        if share is not None and queue is not None and len(queue) >= share:
            return Shed(pending, "over_share")
        if queue is None:
            queue = self._queues[key] = deque()
        queue.append(pending)
        self._len += 1
        if self.max_items is not None and self._len > self.max_items:
            fullest = max(self._queues, key=lambda k: len(self._queues[k]))
            return Shed(self._pop_newest(fullest), "queue_full")
        return None

    def _pop_newest(self, key: Hashable) -> Pending[T]:
        queue = self._queues[key]
        shed = queue.pop()
        self._len -= 1
        if not queue:
            del self._queues[key]
        return shed

    def ahead(self, key: Hashable) -> int:
        """How many items a new one of `key` would wait behind: its key's own, and of every other key at
        most one more than that (a batch takes one per key in turn)."""
        own = self.pending_for(key)
        return own + sum(min(len(q), own + 1) for k, q in self._queues.items() if k != key)

    def pending_for(self, key: Hashable) -> int:
        queue = self._queues.get(key)
        return len(queue) if queue is not None else 0

    def note_compute(self, seconds: float, samples: int) -> None:
        """Tell the rule how long the last batch of `samples` took to compute."""
        per_sample = seconds / max(samples, 1)
        if self.compute_per_sample_s == 0.0:
            self.compute_per_sample_s = per_sample
        else:
            self.compute_per_sample_s = 0.9 * self.compute_per_sample_s + 0.1 * per_sample

    def __len__(self) -> int:
        return self._len

    def heads(self) -> List[T]:
        """Each key's oldest pending item: the next of every key to be served."""
        return [queue[0].item for queue in self._queues.values()]

    def wait_s(self, now: float, limit: Optional[int] = None) -> Optional[float]:
        """None: nothing pending. 0: take a batch now (of at most `limit`). Otherwise: seconds to keep
        collecting first."""
        if not self._len:
            return None
        if self._len == 1 or self._len >= min(self.max_batch, limit or self.max_batch):
            return 0.0
        oldest = min(q[0].arrived for q in self._queues.values())
        remaining = oldest + self.max_wait_s - now
        if remaining <= 0 or self.mean_gap_s > remaining or self.compute_per_sample_s < 0.5 * self.mean_gap_s:
            return 0.0
        return remaining

    def take(self, limit: Optional[int] = None) -> List[Pending[T]]:
        """Up to `max_batch` (or `limit`, if fewer) pending requests, one per key in round-robin turn, oldest
        first within a key (with one key: the oldest, in arrival order)."""
        size = max(1, min(self.max_batch, limit or self.max_batch))
        batch: List[Pending[T]] = []
        while self._len and len(batch) < size:
            for key in list(self._queues):
                queue = self._queues[key]
                batch.append(queue.popleft())
                self._len -= 1
                if queue:
                    self._queues.move_to_end(key)
                else:
                    del self._queues[key]
                if len(batch) == size:
                    break
        return batch
