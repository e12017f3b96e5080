"""`edgecascade report`: valid PNGs whose plotted data match SQL, a Markdown table that matches SQL, and the
same report as one HTML page that loads nothing from anywhere."""

from __future__ import annotations

import base64
import io
import math
import re
import struct
from html.parser import HTMLParser
from pathlib import Path

import pytest
from rich.console import Console
from sqlalchemy import text

from edgecascade.cli import main
from metering.common import SOURCES
from results_db.database import open_database
from results_db.ingest import RecordWriter
from results_db.labels import METERED_SOURCES, run_pace
from results_db.plots import DPI
from results_db.report import COLUMNS, build_report, ecdf
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
    # Two runs a meter measured: they are drawn on their gross joules, the estimates on their analytic ones.
    writer.write(
        full_run("rapl-edge", "dev-d", 120, policy="edge-only", device_j=0.007, energy_source="rapl", seed=6)
    )
    writer.write(full_run("rapl-meanet", "dev-d", 120, policy="meanet", device_j=0.011, energy_source="rapl"))
    # Paced runs beside flat-out ones of the same policy: `edgecascade bench` names them -paced, the HTTP
    # peer's run record says its rate.
    writer.write(full_run("meanet-1-paced", "dev-a", 60, policy="meanet", device_j=0.012, seed=5))
    peer = {"filter": "meanet", "transport": "http"}
    writer.write(full_run("peer", "dev-e", 80, policy="http-peer", policy_params=peer, seed=7))
    writer.write(
        full_run(
            "peer-paced", "dev-e", 40, policy="http-peer", policy_params={**peer, "rate_hz": 30.0}, seed=8
        )
    )
    engine.dispose()
    return path


def front_of(points: list) -> list:
    """(x, y) points no other point beats (no more energy, no less accuracy, one of them strictly), by x."""
    return sorted(p for p in set(points) if not any(q[0] <= p[0] and q[1] >= p[1] and q != p for q in points))


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
    assert png_size(result.files["accuracy_energy"]) == (12 * DPI, int(4.5 * DPI))  # two panels
    assert png_size(result.files["latency_cdf"]) == (7 * DPI, int(4.5 * DPI))
    assert png_size(result.files["exit_mix"]) == (int((1.2 * 5 + 3.0) * DPI), int(4.5 * DPI))

    # Accuracy vs energy: metered runs on their gross joules, the others on the analytic column, in a panel
    # of their own whose axis says so; dark-1 has neither. Each panel's front is its own.
    panels = result.series["accuracy_energy"]
    assert list(panels) == ["metered", "analytic"]
    summary = {
        r[0]: r[1:]
        for r in sql(
            db,
            "SELECT run_id, energy_source, device_j_gross_per_inference, device_j_analytic_per_inference, "
            "accuracy FROM run_summary",
        )
    }
    for basis, panel in panels.items():
        points = {run_id: (x, y) for run_id, _, x, y in panel["points"]}
        expected = {
            run_id: ((gross if basis == "metered" else analytic) * 1e3, accuracy * 100)
            for run_id, (source, gross, analytic, accuracy) in summary.items()
            if (source == "rapl") == (basis == "metered")
            and analytic is not None
            and not run_id.endswith("-paced")  # latency runs: another (smaller) sample set, left out
        }
        assert set(points) == set(expected), basis
        for run_id, point in expected.items():
            assert points[run_id] == pytest.approx(point), (basis, run_id)
        assert panel["front"] == front_of(list(points.values())), basis
    assert set(panels["metered"]["points"][i][0] for i in range(2)) == {"rapl-edge", "rapl-meanet"}
    assert "metered by rapl" in panels["metered"]["xlabel"]
    assert (
        "ANALYTIC" in panels["analytic"]["xlabel"]
        and "no meter read: estimate" in panels["analytic"]["xlabel"]
    )
    estimated = {run for run, _, _, _ in panels["analytic"]["points"]}
    assert "meanet-1" in estimated and "dark-1" not in estimated

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
    assert set(mix) == set(totals) == {"meanet", "edge-only", "cloud-only", "entropy", "http-peer"}
    for policy, stage, n in counts:
        assert mix[policy][stage] == pytest.approx(n / totals[policy])

    # Latency CDF: one curve per (policy, pace), never paced and flat-out runs in one; steps are measured
    # latencies, monotonic, ending at the maximum with 100 %.
    cdf = result.series["latency_cdf"]
    assert {k for k in cdf if k[0] in ("meanet", "http-peer")} == {
        ("meanet", "flat out"),
        ("meanet", "paced"),
        ("http-peer", "flat out"),
        ("http-peer", "paced 30 Hz"),
    }
    paces = {
        run_id: run_pace(run_id, params)
        for run_id, params in sql(db, "SELECT run_id, policy_params FROM runs")
    }
    for (policy, pace), (xs, ys) in cdf.items():
        latencies = sorted(
            latency
            for run_id, latency in sql(
                db,
                "SELECT i.run_id, i.edge_ms + COALESCE(i.network_ms, 0) + COALESCE(i.cloud_ms, 0) "
                "FROM inferences i JOIN runs r USING (run_id) WHERE r.policy = :p",
                p=policy,
            )
            if paces[run_id] == pace
        )
        assert (xs, ys) == ecdf(latencies, 400), (policy, pace)
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
    # The estimates stay in the table, labelled by their source and a note; the analytic column beside them.
    analytic = COLUMNS.index(("analytic mJ/inf", "device_j_analytic_per_inference", COLUMNS[-1][2]))
    for run_id, source, gross, analytic_j in sql(
        db,
        "SELECT run_id, energy_source, device_j_gross_per_inference, device_j_analytic_per_inference "
        "FROM run_summary",
    ):
        assert table[run_id][7] == ("–" if gross is None else f"{gross * 1e3:.3f}"), run_id
        assert table[run_id][15] == source and table[run_id][analytic] == (
            "–" if analytic_j is None else f"{analytic_j * 1e3:.3f}"
        )
    assert "*No meter was read for 8 of 10 runs (energy source estimate, none):" in report
    assert "No meter was read for 8 of 10 runs" in re.sub(r"\s+", " ", out.getvalue())


class _Page(HTMLParser):
    """What a page would load (every src and href) and the text of its table cells."""

    def __init__(self) -> None:
        super().__init__()
        self.loads: list = []
        self.cells: list = []
        self._in_cell = False

    def handle_starttag(self, tag: str, attrs: list) -> None:
        self.loads += [(tag, name, value) for name, value in attrs if name in ("src", "href")]
        self.loads += [(tag, "tag", "") for _ in [tag] if tag in ("link", "script", "iframe")]
        self._in_cell = tag in ("td", "th")
        if self._in_cell:
            self.cells.append("")

    def handle_endtag(self, tag: str) -> None:
        self._in_cell = self._in_cell and tag not in ("td", "th")

    def handle_data(self, data: str) -> None:
        if self._in_cell:
            self.cells[-1] += data


def test_the_html_report_is_report_md_with_its_figures_inlined(db: Path, tmp_path: Path) -> None:
    engine = open_database(db)
    result = build_report(engine, tmp_path / "html")
    engine.dispose()
    page = _Page()
    page.feed(result.files["html"].read_text())
    images = [value for tag, name, value in page.loads if tag == "img"]
    assert len(images) == 3 and len(page.loads) == 3  # the three figures and nothing else: no link, no script
    for uri, name in zip(images, ("accuracy_energy.png", "exit_mix.png", "latency_cdf.png")):
        assert uri.startswith("data:image/png;base64,")
        assert base64.b64decode(uri.split(",", 1)[1]) == (result.files["report"].parent / name).read_bytes()
    # Every cell of report.md's tables is a cell of the page, in order.
    md_cells = [
        c.strip()
        for line in result.files["report"].read_text().splitlines()
        if line.startswith("| ")
        for c in line.strip().strip("|").split("|")
    ]
    assert page.cells == md_cells
    assert "No meter was read" in result.files["html"].read_text()


def test_the_metered_sources_are_metering_s_less_the_estimate() -> None:
    assert tuple(s for s in SOURCES if s != "estimate") == METERED_SOURCES


def test_report_on_one_run(db: Path, tmp_path: Path) -> None:
    engine = open_database(db)
    result = build_report(engine, tmp_path / "one", "meanet-2")
    engine.dispose()
    assert [r["run_id"] for r in result.data.runs] == ["meanet-2"]
    assert set(result.series["exit_mix"]) == {"meanet"}
    # among all flat-out runs (the two paced ones are left out)
    assert sum(len(p["points"]) for p in result.series["accuracy_energy"].values()) == 7
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
        "report.html",
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
