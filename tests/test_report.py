"""`edgecascade report`: valid PNGs whose plotted data match SQL, and a Markdown table that matches SQL."""

from __future__ import annotations

import io
import math
import re
import struct
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import text

from edgecascade.cli import main
from results_db.database import open_database
from results_db.ingest import RecordWriter
from results_db.plots import DPI
from results_db.report import build_report, ecdf
from results_db.synthetic import full_run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple:
    """(width, height) from the IHDR chunk, after checking the signature."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", path
    return struct.unpack(">II", head[16:24])


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "bench.db"
    engine = open_database(path)
    writer = RecordWriter(engine)
    writer.write(full_run("meanet-1", "dev-a", 300, policy="meanet", device_j=0.012, offload_fraction=0.22))
    writer.write(full_run("meanet-2", "dev-b", 200, policy="meanet", device_j=0.013, seed=3))
    edge_only = {"offload_fraction": 0.0, "fallback_fraction": 0.0}
    writer.write(full_run("edge-1", "dev-a", 250, policy="edge-only", device_j=0.009, seed=1, **edge_only))
    writer.write(
        full_run("cloud-1", "dev-b", 150, policy="cloud-only", offload_fraction=1.0, device_j=0.02, seed=2)
    )
    writer.write(full_run("dark-1", "dev-c", 50, policy="entropy", device_j=None, seed=4))  # unmetered
    engine.dispose()
    return path


def sql(db: Path, query: str, **params) -> list:
    engine = open_database(db)
    with engine.connect() as connection:
        rows = connection.execute(text(query), params).all()
    engine.dispose()
    return rows


def test_report_files_are_pngs_whose_data_match_sql(db: Path, tmp_path: Path) -> None:
    engine = open_database(db)
    out = io.StringIO()
    result = build_report(engine, tmp_path / "report", console=Console(file=out, width=250))
    engine.dispose()
    assert png_size(result.files["accuracy_energy"]) == (7 * DPI, int(4.5 * DPI))
    assert png_size(result.files["latency_cdf"]) == (7 * DPI, int(4.5 * DPI))
    assert png_size(result.files["exit_mix"]) == (int((1.2 * 4 + 3.0) * DPI), int(4.5 * DPI))

    # Accuracy vs energy: one point per metered run, the front is what pareto_points marks.
    pareto = sql(db, "SELECT run_id, device_j_gross_per_inference, accuracy, on_front FROM pareto_points")
    points = {run_id: (x, y) for run_id, _, x, y in result.series["accuracy_energy"]["points"]}
    assert set(points) == {"meanet-1", "meanet-2", "edge-1", "cloud-1"}  # dark-1 has no joules
    for run_id, joules, accuracy, _ in pareto:
        assert points[run_id] == pytest.approx((joules * 1e3, accuracy * 100))
    on_front = [
        v for point in sorted((j * 1e3, a * 100) for _, j, a, front in pareto if front) for v in point
    ]
    assert [v for point in result.series["accuracy_energy"]["front"] for v in point] == pytest.approx(
        on_front
    )
    assert len(on_front) >= 4  # at least two runs on the front: the plot shows a real trade-off

    # Exit mix: fractions recomputed from the raw table.
    counts = sql(
        db,
        "SELECT r.policy, i.exit_stage, COUNT(*) FROM inferences i JOIN runs r USING (run_id) "
        "GROUP BY r.policy, i.exit_stage",
    )
    totals: dict = {}
    for policy, _, n in counts:
        totals[policy] = totals.get(policy, 0) + n
    mix = result.series["exit_mix"]
    assert set(mix) == set(totals) == {"meanet", "edge-only", "cloud-only", "entropy"}
    for policy, stage, n in counts:
        assert mix[policy][stage] == pytest.approx(n / totals[policy])

    # Latency CDF: steps are measured latencies, monotonic, ending at the maximum with 100 %.
    for policy, (xs, ys) in result.series["latency_cdf"].items():
        latencies = sorted(
            row[0]
            for row in sql(
                db,
                "SELECT i.edge_ms + COALESCE(i.network_ms, 0) + COALESCE(i.cloud_ms, 0) FROM inferences i "
                "JOIN runs r USING (run_id) WHERE r.policy = :p",
                p=policy,
            )
        )
        assert (xs, ys) == ecdf(latencies, 400)
        assert xs[-1] == latencies[-1] and ys[-1] == 1.0 and xs == sorted(xs)

    # The terminal table and the Markdown table carry the same, SQL-checked numbers.
    assert all(run in out.getvalue() for run in ("meanet-1", "edge-1", "dark-1"))
    report = result.files["report"].read_text()
    for name in ("accuracy_energy.png", "exit_mix.png", "latency_cdf.png"):
        assert f"]({name})" in report and (result.files["report"].parent / name).is_file()
    table = {
        cells[0]: cells
        for cells in (
            [c.strip() for c in line.strip("|").split("|")]
            for line in report.splitlines()
            if line.startswith("| ")
        )
    }
    for run_id, correct, labelled in sql(
        db,
        "SELECT run_id, SUM(CASE WHEN prediction = label THEN 1 ELSE 0 END), COUNT(label) "
        "FROM inferences GROUP BY run_id",
    ):
        assert table[run_id][4] == f"{correct / labelled * 100:.2f}", run_id
        values = sorted(
            row[0]
            for row in sql(
                db,
                "SELECT edge_ms + COALESCE(network_ms, 0) + COALESCE(cloud_ms, 0) FROM inferences "
                "WHERE run_id = :r",
                r=run_id,
            )
        )
        assert table[run_id][12] == f"{values[math.ceil(0.99 * len(values)) - 1]:.2f}", run_id  # p99
    assert table["dark-1"][7] == "–"  # unmetered: no made-up joules


def test_report_on_one_run(db: Path, tmp_path: Path) -> None:
    engine = open_database(db)
    result = build_report(engine, tmp_path / "one", "meanet-2")
    engine.dispose()
    assert [r["run_id"] for r in result.data.runs] == ["meanet-2"]
    assert set(result.series["exit_mix"]) == {"meanet"}
    assert len(result.series["accuracy_energy"]["points"]) == 4  # seen among all runs
    assert result.files["report"].read_text().startswith("# edgecascade results: run `meanet-2`")


def test_report_cli(db: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli-report"
    assert main(["report", "--db", str(db), "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "meanet-1" in stdout and "cloud-only" in stdout
    assert {p.name for p in out.iterdir()} == {
        "accuracy_energy.png",
        "exit_mix.png",
        "latency_cdf.png",
        "report.md",
    }

    assert main(["report", "--db", str(db), "--query", "devices-by-energy"]) == 0
    stdout = capsys.readouterr().out
    assert re.search(r"dev-a.*\n.*dev-b|dev-b.*\n.*dev-a", stdout) and "dev-c" in stdout

    assert main(["report", "--list-queries"]) == 0
    assert capsys.readouterr().out.count("SELECT") >= 10

    assert main(["report", "--db", str(tmp_path / "missing.db")]) == 2
    assert main(["report", "--db", str(db), "--run", "no-such-run", "--out", str(out)]) == 2
    assert main(["report", "--db", str(db), "--query", "no-such-query"]) == 2
    assert "no run 'no-such-run'" in capsys.readouterr().err
