"""`edgecascade bench` end to end on a few hundred samples: real broker, collector, worker, agent, SQLite."""

from __future__ import annotations

import io
import json
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SAMPLES = 200
PACED = 40  # at 20 Hz: 2 s per policy
POLICIES = {"edge-only", "cloud-only", "meanet", "hi-threshold", "hi-online", "entropy"}

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("bench")
    cmd = [
        sys.executable,
        "-m",
        "edgecascade",
        "bench",
        "--quick",
        "--samples",
        str(SAMPLES),
        "--results",
        str(out),
        "--idle-seconds",
        "0.5",
        "--no-progress",
        "--json",
        str(out / "bench.json"),
        "--rate",
        "20",
        "--paced-samples",
        str(PACED),
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout + proc.stderr  # targets are judged below, not by the exit status
    return out, json.loads((out / "bench.json").read_text())


def test_one_row_per_sample_per_policy(bench_run: tuple[Path, dict]) -> None:
    out, figures = bench_run
    with sqlite3.connect(out / "bench.db") as db:
        rows = dict(
            db.execute(
                "SELECT r.policy, COUNT(*) FROM inferences i JOIN runs r USING (run_id) GROUP BY r.policy"
            ).fetchall()
        )
        per_run = dict(db.execute("SELECT run_id, COUNT(*) FROM inferences GROUP BY run_id").fetchall())
        dupes = db.execute(
            "SELECT COUNT(*) FROM (SELECT run_id, device_id, seq FROM inferences "
            "GROUP BY run_id, device_id, seq HAVING COUNT(*) > 1)"
        ).fetchone()[0]
    assert POLICIES | {"http-peer"} == set(rows)
    assert all(n == SAMPLES + PACED for n in rows.values()), rows  # a flat-out and a paced run each
    assert dupes == 0
    assert set(figures["runs"]) == set(figures["paced_runs"]) == POLICIES | {"http-peer"}
    assert all(per_run[r] == SAMPLES for r in figures["runs"].values())
    assert all(per_run[r] == PACED for r in figures["paced_runs"].values())


def test_paced_runs_keep_the_pace_and_give_the_latency_columns(bench_run: tuple[Path, dict]) -> None:
    _, figures = bench_run
    # n samples at frame times 0, 1/rate, ...: a paced run can never be faster than its rate.
    for label, hz in figures["paced_hz"].items():
        assert 0 < hz <= 20 * PACED / (PACED - 1), (label, hz)
    for label, row in figures["summary"].items():
        assert row["paced_p99_ms"] >= row["paced_p50_ms"] > 0, label


def test_the_exit_status_says_whether_the_run_finished_and_check_makes_targets_count() -> None:
    from rich.console import Console

    from bench.cli import exit_status

    quiet = Console(file=io.StringIO())
    missed = [("a", "1", True), ("b", "2", False)]
    assert exit_status(missed, check=False, console=quiet) == 0
    assert exit_status(missed, check=True, console=quiet) == 1
    assert exit_status(missed[:1], check=True, console=quiet) == 0


def test_summary_view_agrees_with_raw_rows(bench_run: tuple[Path, dict]) -> None:
    out, _ = bench_run
    with sqlite3.connect(out / "bench.db") as db:
        db.row_factory = sqlite3.Row
        for s in db.execute("SELECT * FROM run_summary").fetchall():
            raw = db.execute(
                "SELECT label, prediction, exit_stage, edge_ms, network_ms, cloud_ms, bytes_up, bytes_down "
                "FROM inferences WHERE run_id = ?",
                (s["run_id"],),
            ).fetchall()
            n = len(raw)
            assert s["samples"] == n
            assert s["accuracy"] == pytest.approx(sum(r["label"] == r["prediction"] for r in raw) / n)
            offloaded = sum(r["exit_stage"] in ("cloud", "fallback") for r in raw)
            assert s["offload_fraction"] == pytest.approx(offloaded / n)
            lat = sorted(r["edge_ms"] + (r["network_ms"] or 0) + (r["cloud_ms"] or 0) for r in raw)
            rank = -(-50 * n // 100)  # nearest rank
            assert s["latency_p50_ms"] == pytest.approx(lat[rank - 1])
            bytes_total = sum(r["bytes_up"] + r["bytes_down"] for r in raw)
            assert s["bytes_per_inference"] == pytest.approx(bytes_total / n)


def test_cascade_does_what_the_policies_promise(bench_run: tuple[Path, dict]) -> None:
    _, figures = bench_run
    summary = figures["summary"]
    assert summary["edge-only"]["offload_fraction"] == 0
    assert summary["cloud-only"]["offload_fraction"] == pytest.approx(1.0)
    assert 0 < summary["meanet"]["offload_fraction"] <= 0.35
    met = {t["target"]: t["met"] for t in figures["targets"]}
    assert met["one row per sample, every policy"] and met["zero lost offloads"]


def test_report_files_are_written(bench_run: tuple[Path, dict]) -> None:
    out, _ = bench_run
    report = out / "report"
    assert (report / "report.md").read_text().count("![") >= 3
    for png in report.glob("*.png"):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
