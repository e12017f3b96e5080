"""A test agent's config on the real test broker: the settings every end-to-end agent test starts from; and
agents streaming together with a hold in the middle, for the outage tests."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

from broker.launcher import BrokerProcess
from device_agent import AgentConfig
from protocol.topics import Topics


def quick_agent_config(
    broker: BrokerProcess, topics: Topics, models: Path, state_dir: Path, **overrides: Any
) -> AgentConfig:
    """A fresh device (its own account on `broker`), meanet, the estimate meter without an idle baseline,
    small windows and quick flushes, so that a test of a few dozen samples settles in well under a second."""
    device_id = overrides.pop("device_id", f"dev-{uuid.uuid4().hex[:8]}")
    settings: Any = {
        "policy": {"name": "meanet", "params": {}},
        "meters": ["estimate"],
        "idle_seconds": 0.0,
        "window_size": 8,
        "flush_s": 0.05,
        "connect_timeout_s": 5.0,
        **overrides,
    }
    return AgentConfig(
        device_id=device_id,
        broker=broker.credentials(device_id),
        topics=topics,
        model_dir=models,
        state_dir=state_dir,
        **settings,
    )


class HeldStreams:
    """Each agent streams the same images on a thread of its own and waits (bounded) before item `hold_at`
    until `release()`: a fault lands while every device has `done` some samples, and some follow its end."""

    def __init__(self, images: Any, labels: Any, hold_at: int) -> None:
        self.images, self.labels, self.hold_at = images, labels, hold_at
        self.done: Dict[str, int] = {}  # device -> the last item handed to its agent
        self.summaries: Dict[str, Any] = {}
        self._back = threading.Event()
        self._runners: List[threading.Thread] = []

    def _source(self, device: str) -> Iterator[Tuple[Any, int]]:
        for i in range(len(self.labels)):
            if i == self.hold_at:
                self._back.wait(60)
            self.done[device] = i
            yield self.images[i], int(self.labels[i])

    def start(self, agents: Dict[str, Any]) -> None:
        for device, agent in agents.items():
            run = lambda d=device, a=agent: self.summaries.setdefault(d, a.run_dataset(self._source(d)))  # noqa: E731
            self._runners.append(threading.Thread(target=run))
        for runner in self._runners:
            runner.start()

    def reached(self, n: int) -> bool:
        """Whether every agent has been handed at least `n` samples."""
        return len(self.done) == len(self._runners) and all(i >= n for i in self.done.values())

    def release_and_join(self, timeout_s: float = 120) -> None:
        self._back.set()
        for runner in self._runners:
            runner.join(timeout_s)
