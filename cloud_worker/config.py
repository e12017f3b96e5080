"""`WorkerConfig`: how one cloud worker connects and serves (`edgecascade cloud --help` is its CLI view)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Optional, Sequence

from protocol.mqtt import BrokerAddress
from protocol.topics import CLOUD_GROUP, Topics

# The queue's default bound: this much memory in offloads, at most this many. Not the Receive Maximum:
# Mosquitto 2.0.11 does not hold to it once acknowledgements flow (measured: Receive Maximum 10, three
# PUBACKs, 40 offloads delivered), so a lone device's burst of a thousand arrives at once and must fit.
QUEUE_BUDGET_BYTES = 64 << 20
MAX_QUEUE_ITEMS = 4096
BACKOFF_MIN_S = 0.5
BACKOFF_MAX_S = 8.0


class LoginRefused(RuntimeError):
    """The broker refused this worker's login or its cloud subscription in a way no retry can heal."""


@dataclass(frozen=True)
class WorkerConfig:
    """How one cloud worker connects and serves (see `edgecascade cloud --help` for the CLI view)."""

    broker: BrokerAddress
    topics: Topics
    model_path: Path
    worker_id: str
    task: str = "classify"  # or "detect": REACT's video frames (cloud_worker.tasks)
    max_batch: int = 32
    max_wait_ms: float = 2.0
    providers: Sequence[str] = ("CPUExecutionProvider",)
    meters: Sequence[str] = ()
    meter_options: Dict[str, Any] = field(default_factory=dict)
    idle_seconds: float = 0.0
    threads: Optional[int] = (
        None  # onnxruntime intra-op threads (None: onnxruntime's default; 1 with streams)
    )
    # Batches computed at once, each on a compute thread of its own (bench/offload_bench.py measures why).
    streams: int = 1
    # Unacknowledged offloads the broker may push to us (MQTT 5 Receive Maximum); 0 = 4 batches' worth.
    receive_maximum: int = 0
    group: str = CLOUD_GROUP
    keepalive_s: int = 15
    # Offloads queued here at most (0: QUEUE_BUDGET_BYTES of them, at most MAX_QUEUE_ITEMS), split fairly
    # among the recently active devices.
    max_queue: int = 0
    # The longest an offload may wait here, and the deadline of one that carries no MessageExpiryInterval.
    max_expiry_s: float = 30.0
    # How often the worker publishes its load (protocol.load) on Topics.cloud_load(worker_id); 0: never.
    load_interval_s: float = 0.5

    def __post_init__(self) -> None:
        if self.max_batch < 1 or self.max_wait_ms < 0:
            raise ValueError("max_batch must be >= 1 and max_wait_ms >= 0")
        if self.max_queue < 0 or self.receive_maximum < 0:
            raise ValueError("max_queue and receive_maximum must be >= 0")
        if not (self.max_expiry_s > 0 and math.isfinite(self.max_expiry_s)):
            raise ValueError(f"max_expiry_s must be a positive number of seconds, got {self.max_expiry_s}")
        if self.streams < 1:
            raise ValueError(f"streams must be >= 1, got {self.streams}")
        if self.streams > 1 and self.meters:
            # Energy windows of batches that overlap would each count the other's joules.
            raise ValueError("metering needs streams = 1 (concurrent batches' energy windows would overlap)")
        if not (self.load_interval_s >= 0 and math.isfinite(self.load_interval_s)):
            raise ValueError(f"load_interval_s must be >= 0 seconds (0: no load), got {self.load_interval_s}")

    def intra_op_threads(self) -> Optional[int]:
        """onnxruntime intra-op threads per run: the setting, else 1 with several streams (concurrent runs
        would otherwise share one pool of every core), else onnxruntime's default."""
        return self.threads or (1 if self.streams > 1 else None)

    def receive_maximum_or_default(self) -> int:
        """MQTT 5 Receive Maximum to announce: the setting, else 4 batches' worth."""
        return self.receive_maximum or max(4 * self.max_batch, 64)

    def queue_bound(self, offload_bytes: int) -> int:
        """Offloads queued at most: the setting, else QUEUE_BUDGET_BYTES of them (at most MAX_QUEUE_ITEMS)."""
        return self.max_queue or max(
            self.receive_maximum_or_default(), min(MAX_QUEUE_ITEMS, QUEUE_BUDGET_BYTES // offload_bytes)
        )
