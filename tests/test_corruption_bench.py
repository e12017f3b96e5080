"""`edgecascade bench --corruptions` end to end on one corruption and a few hundred samples: real broker,
collector, worker, agents, SQLite; the committed models. One row per policy per corruption (and clean), the
runs labelled with their corruption, and the figures the same as the models give offline."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from device_agent.cascade import EdgeCascade
from device_agent.sources import load_idx_dataset
from training.corruptions import Corruption, corrupt

REPO = Path(__file__).resolve().parent.parent
SAMPLES = 350  # past one drift window (300): each run with an edge is tested once
POLICIES = {"edge-only", "cloud-only", "meanet", "hi-threshold", "hi-online", "entropy"}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def corruption_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("corruptions")
    cmd = [
        sys.executable, "-m", "edgecascade", "bench", "--corruptions",
        "--kinds", "gaussian-noise", "--severities", "2", "--samples", str(SAMPLES),
        "--results", str(out), "--json", str(out / "corruptions.json"),
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "gaussian-noise-2" in proc.stdout and "vs max(edge, cloud)" in proc.stdout
    return out, json.loads((out / "corruptions.json").read_text())


def test_one_row_per_policy_per_corruption_with_every_sample(corruption_run: tuple[Path, dict]) -> None:
    out, result = corruption_run
    rows = result["rows"]
    assert {(r["corruption"], r["policy"]) for r in rows} == {
        (c, p) for c in ("clean", "gaussian-noise-2") for p in POLICIES
    }
    assert all(r["samples"] == SAMPLES for r in rows)
    assert "synthetic" in result["label"] and "0.15" in result["corruptions"]["gaussian-noise-2"]
    with sqlite3.connect(out / "corruptions" / "bench.db") as db:
        splits = dict(db.execute("SELECT run_id, split FROM runs").fetchall())
    assert {splits[r["run_id"]] for r in rows} == {"test:clean", "test:gaussian-noise-2"}


def test_the_figures_are_the_models_on_the_corrupted_images(corruption_run: tuple[Path, dict]) -> None:
    _, result = corruption_run
    images, labels = load_idx_dataset("fashion-mnist", "test", limit=SAMPLES)
    noisy = corrupt(images, Corruption("gaussian-noise", 2))
    cascade = EdgeCascade(REPO / "models" / "fashion-mnist")
    edge = np.array([d.prediction for d in cascade.decide(noisy, gated=False)])  # edge-only: ungated
    row = {(r["corruption"], r["policy"]): r for r in result["rows"]}
    assert row["gaussian-noise-2", "edge-only"]["accuracy"] == pytest.approx(np.mean(edge == labels))
    assert row["gaussian-noise-2", "edge-only"]["offload_fraction"] == 0.0
    assert row["gaussian-noise-2", "cloud-only"]["offload_fraction"] == 1.0
    meanet = row["gaussian-noise-2", "meanet"]
    best = max(row["gaussian-noise-2", p]["accuracy"] for p in ("edge-only", "cloud-only"))
    assert meanet["vs_best_single"] == pytest.approx(meanet["accuracy"] - best)
    # Noise moves the main block's outputs: the agents' drift monitor flags the corrupted runs, not clean.
    assert row["gaussian-noise-2", "edge-only"]["drift_alarms"] >= 1
    assert row["clean", "edge-only"]["drift_checks"] == 2 and row["clean", "edge-only"]["drift_alarms"] == 0
    assert row["gaussian-noise-2", "cloud-only"]["drift_checks"] == 0  # nothing runs on the device
