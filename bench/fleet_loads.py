"""What the fleet simulation's workers said about themselves while the whole fleet was running.

A fleet's agents start one after another (50 processes loading onnxruntime on 2 cores take tens of seconds)
and end one after another, so a worker's busy share over the whole run mixes in the ramps where only a few
agents offload, and the agents' process start and close, before their first sample and after their last,
which on 2 cores take longer than the samples. The workers publish their load every interval
(`protocol.load`: `busy` since the last one), so the share while every agent was running, or while any was
streaming, is the mean of the loads published in that window.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple, Union

from bench.results_sql import query
from protocol.codec import ProtocolError
from protocol.load import decode_load
from protocol.mqtt import BrokerAddress, new_client
from protocol.topics import Topics


class LoadWatch:
    """Subscribes to every worker's load as a device does (`address`: a device account) and keeps them."""

    def __init__(self, address: BrokerAddress, topics: Topics) -> None:
        self.loads: List[Tuple[float, str, float]] = []  # (ts_unix, worker, busy)
        self._lock = threading.Lock()
        self._topic = topics.all_cloud_load
        self.client = new_client(address, address.username)  # a device account: its client id is its name
        self.client.on_connect = lambda c, *a: c.subscribe(self._topic, qos=1)
        self.client.on_message = self._on_message
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        if not message.payload:
            return  # a will cleared it: the worker is gone
        try:
            load = decode_load(bytes(message.payload))
        except ProtocolError:
            return
        with self._lock:
            self.loads.append((load.ts_unix, load.worker_id, load.busy))

    def busy_between(self, start: float, end: float) -> Dict[str, float]:
        """Each worker's mean busy share over the loads it published in [start, end] (unix seconds)."""
        by_worker: Dict[str, List[float]] = {}
        with self._lock:
            for ts, worker, busy in self.loads:
                if start <= ts <= end:
                    by_worker.setdefault(worker, []).append(busy)
        return {w: sum(v) / len(v) for w, v in sorted(by_worker.items())}

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


Span = Tuple[float, float]  # a run's first and last sample (its rows' ts_unix)


def run_spans(db: Union[Path, str], run_ids: List[str]) -> List[Span]:
    """Each run's span, for the runs that have rows (one query for the windows below)."""
    marks = ",".join("?" * len(run_ids))
    return query(
        db,
        f"SELECT MIN(ts_unix), MAX(ts_unix) FROM inferences WHERE run_id IN ({marks}) GROUP BY run_id",
        run_ids,
    )


def all_running(spans: List[Span], runs: int) -> Optional[Span]:
    """The window in which every one of `runs` runs had started and none had ended, or None."""
    if len(spans) < runs:
        return None
    start, end = max(s for s, _ in spans), min(e for _, e in spans)
    return (start, end) if end > start else None


def streaming(spans: List[Span]) -> Optional[Span]:
    """From the fleet's first sample to its last: the run without the agents' process start and close, which
    on 2 cores take longer than the samples; None without rows."""
    if not spans:
        return None
    start, end = min(s for s, _ in spans), max(e for _, e in spans)
    return (start, end) if end > start else None


def late_starters(spans: List[Span], after: float) -> int:
    """How many runs took their first sample after `after` (unix s): agents not ready at a common start."""
    return sum(first > after for first, _ in spans)
