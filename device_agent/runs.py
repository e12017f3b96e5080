"""What a run reports: its opening record and its summary; and the stream `run_dataset` hands the loop."""

from __future__ import annotations

import functools
import platform
import socket
import subprocess
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Sequence, Set, Tuple

import numpy as np

from device_agent.card import sha256_file
from device_agent.durable import Origin, SourceProgress
from protocol.records import InferenceRecord, RunRecord


@dataclass
class RunSummary:
    """What a run (or one `run_dataset` call) did."""

    run_id: str
    device_id: str
    policy: str
    samples: int = 0
    exits: Dict[str, int] = field(default_factory=dict)  # exit_stage -> samples
    offloaded: int = 0
    fallbacks: int = 0
    shed: int = 0  # offloads the capacity rule kept at the edge (answered there, exit stage `shed`)
    late_replies: int = 0
    failed: int = 0
    labelled: int = 0
    correct: int = 0
    seconds: float = 0.0
    device_j_gross: Optional[float] = None
    energy_source: str = "none"
    policy_report: Dict[str, Any] = field(default_factory=dict)
    capacity: Dict[str, Any] = field(
        default_factory=dict
    )  # CapacityRule.report(): sheds by reason, estimates
    drift: Dict[str, Any] = field(default_factory=dict)  # DriftMonitor.report(): tests, alarms, the first
    cloud_watch: Dict[str, Any] = field(default_factory=dict)  # CloudWatch.report(): back-offs, kept at edge
    outbox_left: Dict[str, int] = field(default_factory=dict)  # set by close(): what waits for next start
    rejected_inputs: int = 0  # samples that are not an image the model takes (never started)
    skipped_files: int = 0  # watched files that could not be read (remembered: never read again)
    pass_number: int = 0  # a resumable dataset source: which pass over it this is
    resumed_done: int = 0  # ... and how many of its items an earlier process had already recorded
    recovered_offloads: int = 0  # offloads an earlier process left, recorded as fallbacks at start
    refused_records: int = 0  # records the collector could not store (kept in its rejected_records table)
    model_versions: Dict[str, int] = field(default_factory=dict)  # model version -> samples it answered
    rollout: Dict[str, Any] = field(default_factory=dict)  # ModelRollout.stats and refusals by reason

    @property
    def accuracy(self) -> Optional[float]:
        return self.correct / self.labelled if self.labelled else None

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.seconds if self.seconds > 0 else 0.0

    def add(self, record: InferenceRecord) -> None:
        self.samples += 1
        self.exits[record.exit_stage] = self.exits.get(record.exit_stage, 0) + 1
        version = str(record.model_version)
        self.model_versions[version] = self.model_versions.get(version, 0) + 1
        if record.exit_stage in ("cloud", "fallback") and record.bytes_up:
            self.offloaded += 1
        self.fallbacks += record.exit_stage == "fallback"
        self.shed += record.exit_stage == "shed"
        if record.label is not None:
            self.labelled += 1
            self.correct += record.prediction == record.label
        if record.device_j_gross is not None:
            self.device_j_gross = (self.device_j_gross or 0.0) + record.device_j_gross

    def as_dict(self) -> Dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items()}
        out.update(accuracy=self.accuracy, samples_per_s=self.samples_per_s)
        return out


class Stream:
    """A `run_dataset` iterable for the inference thread, the tally of its samples, and (for a resumable
    source) its progress: the stream's items done in an earlier process are skipped."""

    def __init__(
        self,
        samples: Iterator[Tuple[np.ndarray, Optional[int]]],
        summary: RunSummary,
        progress: bool,
        source: Optional[SourceProgress] = None,
    ):
        self.samples = samples
        self.summary = summary
        self.progress = progress
        self.source = source
        self._done_before: Set[str] = set()
        if source is not None:
            summary.pass_number, done = source.begin_pass()
            self._done_before = set(done)
            summary.resumed_done = len(done)
        self.error: Optional[BaseException] = None
        self.done = threading.Event()
        self._lock = threading.Lock()
        self._pending = 0
        self._exhausted = False

    def done_before(self, index: int) -> bool:
        return bool(self._done_before) and str(index) in self._done_before

    def origin(self, index: int) -> Optional[Origin]:
        return None if self.source is None else self.source.origin(str(index))

    def started(self) -> None:
        with self._lock:
            self._pending += 1

    def rejected(self) -> None:
        """Not an image the model takes: counted, never started."""
        with self._lock:
            self.summary.rejected_inputs += 1

    def finished(self, record: Optional[InferenceRecord]) -> None:
        """A started sample's final record (None: processing it failed)."""
        with self._lock:
            if record is None:
                self.summary.failed += 1
            else:
                self.summary.add(record)
            self._pending -= 1
            if self._exhausted and self._pending == 0:
                self.done.set()

    def exhaust(self) -> None:
        with self._lock:
            self._exhausted = True
            if self._pending == 0:
                self.done.set()


def run_record(
    config: Any,
    run_id: str,
    *,
    policy: str,
    params: Dict[str, Any],
    meter: str,
    providers: Sequence[str],
    **host: Any,
) -> RunRecord:
    """The `run` record that opens a run (or announces its resumption); `config` is an `AgentConfig` or a
    `CameraConfig`, `host` adds facts about the device (e.g. `task="video"`)."""
    import onnxruntime

    return RunRecord(
        run_id=run_id,
        device_id=config.device_id,
        policy=policy,
        policy_params=plain(params),
        profile=config.profile,
        dataset=config.dataset,
        split=config.split,
        model_sha256=sha256_file(config.model_dir / "card.json"),
        code_revision=code_revision(),
        host={
            "hostname": socket.gethostname(),
            "machine": platform.machine(),
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "providers": list(providers),
            "meter": meter,
            **host,
        },
        started_unix=time.time(),
    )


def plain(value: Any) -> Any:
    """msgpack-able copy (numpy scalars and arrays become Python numbers and lists)."""
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


@functools.lru_cache(maxsize=None)
def code_revision() -> str:
    """The package version and, when the code runs from a checkout, the git commit (`0.1.0+g1a2b3c4`, then
    `.dirty` with local changes): what a result row was made with, beyond a version bumped once a year."""
    from edgecascade import __version__

    here = Path(__file__).resolve().parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(here), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
        )
        if sha.returncode != 0:
            return __version__
        dirty = subprocess.run(
            ["git", "-C", str(here), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):  # no git on the device: the version is what we know
        return __version__
    return f"{__version__}+g{sha.stdout.strip()}{'.dirty' if dirty else ''}"


class LiveTally:
    """A live source's samples (a watched directory, an MQTT input), tallied into `summary` as they finish,
    so a run of months keeps no futures; `wait` returns once every tracked one is on disk."""

    def __init__(self, summary: RunSummary) -> None:
        self.summary = summary
        self._lock = threading.Lock()
        self._finished = threading.Semaphore(0)
        self._tracked = 0
        self._started = time.monotonic()

    def track(self, future: Future) -> None:
        self._tracked += 1
        future.add_done_callback(self._done)

    def _done(self, future: Future) -> None:
        with self._lock:
            if future.exception() is None:
                self.summary.add(future.result())
            else:
                self.summary.failed += 1
        self._finished.release()

    def wait(self) -> RunSummary:
        """Block until every tracked sample has finished; the summary, its `seconds` the span since made."""
        for _ in range(self._tracked):
            self._finished.acquire()
        self.summary.seconds = time.monotonic() - self._started
        return self.summary
