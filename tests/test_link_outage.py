"""The link benchmark's outage run (`bench.link_bench.run_outage`) end to end on a short run: the device side
behind an emulated `lan` link, the link down mid-run; every dataset item has exactly one row, the offloads
made during the outage are answered at the edge (labelled), and the outbox drains once the link is back."""

from __future__ import annotations

import argparse
import sqlite3
from pathlib import Path

import pytest
from rich.console import Console

from bench.link_bench import run_outage

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "fashion-mnist"

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_an_outage_loses_nothing_answers_at_the_edge_and_the_outbox_drains(tmp_path: Path) -> None:
    args = argparse.Namespace(
        profile="x86",
        models=MODELS,
        results=tmp_path,
        progress=False,
        outage_link="lan",
        rate=30.0,
        outage_run_s=8.0,
        outage_at_s=2.0,
        outage_s=4.0,
    )
    out = run_outage(args, Console(file=None, quiet=True))
    assert out.samples == 240 and out.rows == 240
    assert (out.lost, out.duplicates) == (0, 0)
    # 2 s of the 4 s outage lie a deadline before its end: ~12 offloads, every one answered at the edge.
    assert out.offloads_in_outage > 0
    assert out.answered_at_edge_in_outage == out.offloads_in_outage
    assert out.drain_s is not None and out.drain_s >= 0
    db = next((tmp_path / "outage-lan").glob("bench.db"))
    with sqlite3.connect(db) as conn:
        stages = dict(
            conn.execute("SELECT exit_stage, COUNT(*) FROM inferences GROUP BY exit_stage").fetchall()
        )
    assert stages.get("cloud", 0) > 0  # before and after the outage the cloud answers
    assert stages.get("fallback", 0) + stages.get("shed", 0) >= out.offloads_in_outage
