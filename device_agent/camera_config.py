"""What a REACT camera agent runs with (`CameraConfig`, validated once) and reports (`CameraSummary`)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional

from device_agent.config import check_positive
from protocol.ids import check_device_id, check_run_id
from protocol.mqtt import BrokerAddress
from protocol.topics import Topics

# edge-only: the detector on every frame; edge+tracker: every k-th, tracked between; cloud-only: no detector,
# the latest cloud answer carried forward and tracked; react: edge every k-th + tracker + cloud fusion.
METHODS = ("edge-only", "edge+tracker", "cloud-only", "react")
EDGE_MS_KEPT = 10_000  # per-frame edge times a summary keeps (its p50 is over these)


@dataclass(frozen=True)
class CameraConfig:
    """Everything a `CameraAgent` needs; validated when built."""

    device_id: str
    broker: BrokerAddress
    topics: Topics = field(default_factory=Topics)
    model_dir: Path = Path("models/video-fmnist")
    state_dir: Path = Path("state")
    run_id: Optional[str] = None
    method: str = "react"
    detect_every: int = 5  # k (edge-only runs the detector on every frame whatever this says)
    cloud_every: Optional[int] = None  # m: offload every m-th frame; None: whenever the last answer is back
    extra_delay_ms: float = 0.0
    deadline_s: float = 2.0  # an answer later than this (after the injected delay) is given up
    fps: float = 30.0  # pacing; 0: as fast as the device goes
    threads: int = 1  # the edge detector's intra-op threads: the device budget is one core
    meters: List[str] = field(default_factory=lambda: ["rapl", "estimate"])
    meter_options: Dict[str, Any] = field(default_factory=dict)
    idle_seconds: float = 0.0
    window_size: int = 30  # frames per energy window (one second at 30 fps) ...
    window_max_s: float = 1.0  # ... and at most this long open (a slow source)
    results_batch: int = 100
    flush_s: float = 0.2
    results_receipts: bool = True
    receipt_timeout_s: float = 30.0
    session_expiry_s: int = 3600
    connect_timeout_s: float = 10.0
    close_timeout_s: float = 30.0
    outbox_wait_s: Optional[float] = 300.0
    outbox_max_entries: int = 200_000
    outbox_max_bytes: int = 512 * 1024 * 1024
    dataset: str = "synthetic-video"
    split: str = "test"
    profile: str = "x86"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_device_id(self.device_id)
        if self.run_id is not None:
            check_run_id(self.run_id)
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if self.detect_every < 1 or (self.cloud_every is not None and self.cloud_every < 1):
            raise ValueError("detect_every and cloud_every must be at least 1")
        for name in ("extra_delay_ms", "fps", "idle_seconds", "connect_timeout_s", "close_timeout_s"):
            check_positive(name, getattr(self, name), zero=True)
        for name in ("deadline_s", "flush_s", "receipt_timeout_s", "window_max_s"):
            check_positive(name, getattr(self, name))
        for name in ("window_size", "results_batch", "outbox_max_entries", "outbox_max_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")

    @property
    def uses_cloud(self) -> bool:
        return self.method in ("cloud-only", "react")


@dataclass
class CameraSummary:
    run_id: str
    method: str
    frames: int = 0
    sent: int = 0
    answered: int = 0
    lost: int = 0  # offloads given up: the answer missed the deadline, or a worker refused the frame
    refused: int = 0  # ... of them refused by a worker (its queue would have answered too late)
    late: int = 0  # answers that came after their frame was given up, or for an earlier clip
    seconds: float = 0.0
    behind_s: float = 0.0  # the most the loop ever ran behind the source's clock
    edge_ms: Deque[float] = field(default_factory=lambda: deque(maxlen=EDGE_MS_KEPT), repr=False)

    def add_frame(self, edge_ms: float) -> None:
        self.frames += 1
        self.edge_ms.append(edge_ms)  # the latest only: a camera runs for months

    @property
    def fps(self) -> float:
        return self.frames / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> Dict[str, Any]:
        ms = sorted(self.edge_ms)
        return {
            "run_id": self.run_id,
            "method": self.method,
            "frames": self.frames,
            "sent": self.sent,
            "answered": self.answered,
            "lost": self.lost,
            "refused": self.refused,
            "late": self.late,
            "seconds": round(self.seconds, 3),
            "fps": round(self.fps, 2),
            "behind_s": round(self.behind_s, 3),
            "edge_ms_p50": ms[len(ms) // 2] if ms else None,  # of the last EDGE_MS_KEPT frames
        }
