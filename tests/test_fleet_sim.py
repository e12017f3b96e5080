"""Fleet simulation, small: agents as separate processes, a worker and the broker SIGKILLed mid-run."""

from __future__ import annotations

from pathlib import Path

import pytest
from rich.console import Console

from bench.fleet_sim import run_fleet

REPO = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_fleet_loses_nothing_through_worker_and_broker_kills(tmp_path: Path) -> None:
    result = run_fleet(
        agents=4,
        workers=2,
        samples=300,
        policy="cloud-only",
        models=REPO / "models/fashion-mnist",
        results=tmp_path,
        rate=40.0,  # each agent streams for 7.5 s after its start-up, so both kills fall mid-stream
        kill_worker_at=3.0,
        kill_broker_at=5.0,
        hard_broker_kill=True,  # SIGKILL: what it had acknowledged and not saved is gone; receipts recover it
        console=Console(quiet=True),
    )
    assert len(result.events) == 2, result.events  # both kills happened
    assert result.agent_failures == 0
    assert result.duplicates == 0
    assert result.lost == 0, f"{result.lost} of {result.expected} samples have no row"
    assert result.rows == result.expected
    assert {d["device_id"] for d in result.per_device} == {f"sim-{i:03d}" for i in range(4)}
