"""SQL views against a Python recomputation; nearest-rank percentiles identical on SQLite and PostgreSQL."""

from __future__ import annotations

import random
from typing import Any, Dict, List

import pytest
from sqlalchemy import text

from protocol.records import EXIT_STAGES, InferenceRecord
from results_db.database import open_database
from results_db.ingest import RecordWriter
from results_db.stats import nearest_rank
from results_db.synthetic import full_run, run_record


def latency(r: Dict[str, Any]) -> float:
    return r["edge_ms"] + (r["network_ms"] or 0) + (r["cloud_ms"] or 0)


def expected_summary(records: List[Dict[str, Any]]) -> Dict[str, Any]:
    inf = [r for r in records if r["type"] == "inference"]
    labelled = [r for r in inf if r["label"] is not None]
    n = len(inf)
    stage = {s: sum(r["exit_stage"] == s for r in inf) for s in EXIT_STAGES}
    gross = [r["device_j_gross"] for r in inf if r["device_j_gross"] is not None]
    net = [r["device_j_net"] for r in inf if r["device_j_net"] is not None]
    cloud = [r["cloud_j"] for r in inf if r["cloud_j"] is not None]
    lat = [latency(r) for r in inf]
    return {
        "samples": n,
        "labelled": len(labelled),
        "correct": sum(r["prediction"] == r["label"] for r in labelled),
        "accuracy": sum(r["prediction"] == r["label"] for r in labelled) / len(labelled),
        "exit_main": stage["main"],
        "exit_extension": stage["extension"],
        "exit_cloud": stage["cloud"],
        "exit_fallback": stage["fallback"],
        "exit_shed": stage["shed"],
        "exit_gateway": stage["gateway"],
        "frac_cloud": stage["cloud"] / n,
        "frac_shed": stage["shed"] / n,
        "frac_gateway": stage["gateway"] / n,
        "offload_fraction": (stage["cloud"] + stage["fallback"] + stage["gateway"]) / n,
        "device_j_gross_per_inference": sum(gross) / len(gross),
        "device_j_net_per_inference": sum(net) / len(net),
        "cloud_j_per_inference": sum(cloud) / n,
        "cloud_j_per_offload": sum(cloud) / len(cloud),
        "latency_p50_ms": nearest_rank(lat, 50),
        "latency_p95_ms": nearest_rank(lat, 95),
        "latency_p99_ms": nearest_rank(lat, 99),
        "latency_max_ms": max(lat),
        "bytes_per_inference": sum(r["bytes_up"] + r["bytes_down"] for r in inf) / n,
        "energy_source": "estimate",
        "policy": "meanet",
    }


def test_run_summary_matches_a_python_recomputation(db_url: str) -> None:
    records = full_run("run-1", "dev-1", 400, seed=5, shed_fraction=0.1, gateway_fraction=0.05)
    stages = {r["exit_stage"] for r in records if r["type"] == "inference"}
    assert stages == set(EXIT_STAGES)  # every stage is counted: shed (not offloaded), gateway (offloaded)
    engine = open_database(db_url)
    RecordWriter(engine).write(records)
    with engine.connect() as connection:
        row = dict(
            connection.execute(text("SELECT * FROM run_summary WHERE run_id = 'run-1'")).one()._mapping
        )
    for key, value in expected_summary(records).items():
        if isinstance(value, str):
            assert row[key] == value, key
        else:
            assert row[key] == pytest.approx(value, rel=1e-12), key
    assert row["ended_unix"] is not None and row["dataset"] == "fashion-mnist"
    engine.dispose()


def test_class_accuracy_matches_a_python_recomputation(db_url: str) -> None:
    records = full_run("run-2", "dev-2", 300, seed=7)
    engine = open_database(db_url)
    RecordWriter(engine).write(records)
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT * FROM class_accuracy ORDER BY label")).mappings().all()
    inf = [r for r in records if r["type"] == "inference"]
    assert [r["label"] for r in rows] == sorted({r["label"] for r in inf})
    for row in rows:
        mine = [r for r in inf if r["label"] == row["label"]]
        assert row["samples"] == len(mine)
        assert row["accuracy"] == pytest.approx(sum(r["prediction"] == r["label"] for r in mine) / len(mine))
        offloaded = sum(r["exit_stage"] in ("cloud", "fallback") for r in mine)
        assert row["offload_fraction"] == pytest.approx(offloaded / len(mine))
    engine.dispose()


def _designed_run(run_id: str, accuracy_pct: int, device_j: float, dataset: str = "fashion-mnist") -> list:
    """100 labelled samples, `accuracy_pct` of them right, each costing `device_j`."""
    records = [run_record(run_id, "dev-p", policy=run_id.split("-")[0], dataset=dataset)]
    for seq in range(100):
        records.append(
            InferenceRecord(
                run_id, "dev-p", seq, prediction=1 if seq < accuracy_pct else 2, exit_stage="main",
                edge_ms=1.0, label=1, device_j_gross=device_j, energy_source="estimate",
            ).to_record()
        )  # fmt: skip
    return records


def test_pareto_points_mark_the_non_dominated_runs(db_url: str) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    designed = {
        "a-best": (90, 0.010),  # front
        "b-cheap": (80, 0.005),  # front: cheapest
        "c-worse": (85, 0.012),  # dominated by a
        "d-same-acc": (90, 0.011),  # dominated by a: same accuracy, more energy
        "e-other-dataset": (50, 0.020),  # alone on its dataset's front
    }
    for run_id, (acc, joules) in designed.items():
        writer.write(
            _designed_run(run_id, acc, joules, "mnist" if run_id.startswith("e") else "fashion-mnist")
        )
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT run_id, accuracy, on_front FROM pareto_points")).all()
    assert {r.run_id: r.on_front for r in rows} == {
        "a-best": 1,
        "b-cheap": 1,
        "c-worse": 0,
        "d-same-acc": 0,
        "e-other-dataset": 1,
    }
    assert {r.run_id: r.accuracy for r in rows}["c-worse"] == pytest.approx(0.85)
    engine.dispose()


@pytest.mark.integration
def test_percentiles_are_identical_on_sqlite_and_postgresql(tmp_path, pg_url_factory) -> None:
    rng = random.Random(11)
    records: List[Dict[str, Any]] = []
    for run_no, n in enumerate((1, 2, 7, 20, 99, 101, 1013)):  # sizes where ceil(p*n) is and is not exact
        run_id = f"run-{n}"
        records.append(run_record(run_id, "dev-q", policy=f"policy-{run_no % 3}"))
        for seq in range(n):
            offloaded = rng.random() < 0.3
            records.append(
                InferenceRecord(
                    run_id, "dev-q", seq, prediction=0, exit_stage="cloud" if offloaded else "main",
                    edge_ms=rng.lognormvariate(0, 0.6), label=0,
                    network_ms=rng.uniform(0.1, 9.9) if offloaded else None,
                    cloud_ms=rng.expovariate(0.5) if offloaded else None, energy_source="none",
                ).to_record()
            )  # fmt: skip
    results = {}
    for name, url in (("sqlite", str(tmp_path / "p.db")), ("postgresql", pg_url_factory())):
        engine = open_database(url)
        RecordWriter(engine).write(records)
        with engine.connect() as connection:
            results[name] = connection.execute(
                text(
                    "SELECT run_id, samples, latency_p50_ms, latency_p95_ms, latency_p99_ms, latency_max_ms "
                    "FROM run_summary ORDER BY run_id"
                )
            ).all()
        engine.dispose()
    assert len(results["sqlite"]) == 7
    assert results["sqlite"] == results["postgresql"]  # exact: nearest rank returns stored values
    by_run: Dict[str, List[float]] = {}
    for r in records:
        if r["type"] == "inference":
            by_run.setdefault(r["run_id"], []).append(latency(r))
    for row in results["sqlite"]:
        values = by_run[row.run_id]
        assert row.latency_p50_ms == nearest_rank(values, 50)
        assert row.latency_p95_ms == nearest_rank(values, 95)
        assert row.latency_p99_ms == nearest_rank(values, 99)
