"""A test agent's config on the real test broker: the settings every end-to-end agent test starts from."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

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
