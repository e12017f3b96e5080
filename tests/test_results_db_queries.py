"""The ten named queries, each checked against a Python recomputation on SQLite and on PostgreSQL."""

from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Any, Dict, List

import pytest

from results_db.database import open_database
from results_db.ingest import RecordWriter
from results_db.queries import QUERIES, run_query
from results_db.synthetic import inference_records, run_record

START = 1_700_000_000.0  # 22:13:20 UTC: runs cross into the next hour

# run_id -> (device, policy, model sha, samples, offload, fallback, device J, seed)
RUNS = {
    "r-meanet": ("dev-a", "meanet", "aaaa" + "0" * 60, 400, 0.25, 0.03, 0.010, 1),
    "r-edge": ("dev-b", "edge-only", "bbbb" + "0" * 60, 300, 0.0, 0.0, 0.008, 2),
    "r-cloud": ("dev-a", "cloud-only", "aaaa" + "1" * 60, 200, 1.0, 0.05, 0.004, 3),
}


@pytest.fixture
def loaded(db_url: str):
    engine = open_database(db_url)
    records: List[Dict[str, Any]] = []
    for run_id, (dev, policy, sha, n, off, fb, joules, seed) in RUNS.items():
        records.append(run_record(run_id, dev, policy=policy, model_sha256=sha, started_unix=START + seed))
        records += inference_records(
            run_id,
            dev,
            n,
            offload_fraction=off,
            fallback_fraction=fb,
            shed_fraction=0.1 if policy == "meanet" else 0.0,  # offloads a capacity-aware device kept
            device_j=joules,
            ts_start=START,
            ts_step=13.0,  # 400 samples span ~1.4 h
            seed=seed,
        )
    RecordWriter(engine).write(records)
    inf = [dict(r, policy=RUNS[r["run_id"]][1]) for r in records if r["type"] == "inference"]
    yield engine, inf
    engine.dispose()


def _by(rows: List[Dict[str, Any]], key: str) -> Dict[Any, Dict[str, Any]]:
    return {r[key]: r for r in rows}


def _groups(inf: List[Dict[str, Any]], key: str) -> Dict[Any, List[Dict[str, Any]]]:
    out = defaultdict(list)
    for r in inf:
        out[r[key]].append(r)
    return out


def _correct(r: Dict[str, Any]) -> bool:
    return r["prediction"] == r["label"]


def _offloaded(r: Dict[str, Any]) -> bool:
    return r["exit_stage"] in ("cloud", "fallback")


def test_there_are_ten_queries_with_questions() -> None:
    assert len(QUERIES) == 10
    assert all(q.question.endswith("?") and "SELECT" in q.sql for q in QUERIES.values())


def test_energy_per_correct_inference_by_policy(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "energy-per-correct")
    got = _by(rows, "policy")
    for policy, mine in _groups(inf, "policy").items():
        correct = sum(map(_correct, mine))
        assert got[policy]["correct"] == correct
        assert got[policy]["device_j_per_correct"] == pytest.approx(
            sum(r["device_j_gross"] for r in mine) / correct
        )
        cloud = sum(r["cloud_j"] or 0 for r in mine)
        total = (sum(r["device_j_gross"] for r in mine) + cloud) / correct
        assert got[policy]["total_j_per_correct"] == pytest.approx(total)
    assert [r["device_j_per_correct"] for r in rows] == sorted(r["device_j_per_correct"] for r in rows)


def test_classes_offloaded_most(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "classes-offloaded-most")
    for row in rows:
        mine = [r for r in inf if r["label"] == row["label"]]
        assert (row["samples"], row["offloaded"]) == (len(mine), sum(map(_offloaded, mine)))
    fractions = [r["offload_fraction"] for r in rows]
    assert fractions == sorted(fractions, reverse=True) and len(rows) == 10


def test_offload_fraction_per_device_per_hour(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "offload-per-device-hour")
    expected: Dict[tuple, List[bool]] = defaultdict(list)
    for r in inf:
        hour = time.strftime("%Y-%m-%d %H:00", time.gmtime(r["ts_unix"]))
        expected[(r["device_id"], hour)].append(_offloaded(r))
    assert len(expected) >= 3  # the data crosses an hour boundary
    assert {(r["device_id"], r["hour_utc"]): (r["samples"], r["offloaded"]) for r in rows} == {
        key: (len(flags), sum(flags)) for key, flags in expected.items()
    }


def test_runs_where_fallback_happened(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "runs-with-fallback")
    fallbacks = {
        run: sum(r["exit_stage"] == "fallback" for r in mine) for run, mine in _groups(inf, "run_id").items()
    }
    assert {r["run_id"]: r["fallbacks"] for r in rows} == {k: v for k, v in fallbacks.items() if v}
    shed = {run: sum(r["exit_stage"] == "shed" for r in mine) for run, mine in _groups(inf, "run_id").items()}
    assert {r["run_id"]: r["shed"] for r in rows} == {r["run_id"]: shed[r["run_id"]] for r in rows}
    assert shed["r-meanet"] > 0  # and a shed sample is no offload: _offloaded() in the hourly query
    assert "r-edge" not in {r["run_id"] for r in rows}


def test_accuracy_by_exit_stage(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "accuracy-by-exit-stage")
    groups: Dict[tuple, List[bool]] = defaultdict(list)
    for r in inf:
        groups[(r["policy"], r["exit_stage"])].append(_correct(r))
    assert {(r["policy"], r["exit_stage"]): r["samples"] for r in rows} == {
        k: len(v) for k, v in groups.items()
    }
    for row in rows:
        flags = groups[(row["policy"], row["exit_stage"])]
        assert row["accuracy"] == pytest.approx(sum(flags) / len(flags))


def test_latency_percentiles_by_policy(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "latency-by-policy")
    for row in rows:
        values = sorted(
            r["edge_ms"] + (r["network_ms"] or 0) + (r["cloud_ms"] or 0)
            for r in inf
            if r["policy"] == row["policy"]
        )
        # exact equality: nearest rank picks a stored value, on both databases
        assert row["latency_p50_ms"] == values[math.ceil(0.50 * len(values)) - 1]
        assert row["latency_p99_ms"] == values[math.ceil(0.99 * len(values)) - 1]
    assert (
        _by(rows, "policy")["edge-only"]["latency_p99_ms"]
        < _by(rows, "policy")["cloud-only"]["latency_p99_ms"]
    )


def test_bytes_per_inference_by_policy(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "bytes-per-inference")
    for policy, mine in _groups(inf, "policy").items():
        row = _by(rows, "policy")[policy]
        assert row["bytes_per_inference"] == pytest.approx(
            sum(r["bytes_up"] + r["bytes_down"] for r in mine) / len(mine)
        )
        assert row["bytes_up_per_inference"] == pytest.approx(sum(r["bytes_up"] for r in mine) / len(mine))
    assert _by(rows, "policy")["edge-only"]["bytes_per_inference"] == 0


def test_cloud_joules_per_offload(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "cloud-joules-per-offload")
    answered = [r for r in inf if r["exit_stage"] == "cloud"]
    for policy, mine in _groups(answered, "policy").items():
        row = _by(rows, "policy")[policy]
        assert row["cloud_answers"] == len(mine)
        assert row["cloud_j_per_offload"] == pytest.approx(sum(r["cloud_j"] for r in mine) / len(mine))
        assert row["cloud_ms_mean"] == pytest.approx(sum(r["cloud_ms"] for r in mine) / len(mine))
    assert "edge-only" not in _by(rows, "policy")


def test_devices_by_energy(loaded) -> None:
    engine, inf = loaded
    _, rows = run_query(engine, "devices-by-energy")
    totals = {dev: sum(r["device_j_gross"] for r in mine) for dev, mine in _groups(inf, "device_id").items()}
    assert [r["device_id"] for r in rows] == sorted(totals, key=totals.__getitem__, reverse=True)
    for row in rows:
        assert row["device_j_gross_total"] == pytest.approx(totals[row["device_id"]])
        assert row["energy_source"] == "estimate"


def test_runs_of_a_given_model(loaded) -> None:
    engine, _ = loaded
    _, rows = run_query(engine, "runs-of-model", model_sha256="aaaa")
    assert [r["run_id"] for r in rows] == ["r-meanet", "r-cloud"]  # by start time
    _, rows = run_query(engine, "runs-of-model", model_sha256=RUNS["r-edge"][2])
    assert [(r["run_id"], r["samples"]) for r in rows] == [("r-edge", 300)]
    with pytest.raises(ValueError, match="parameters"):
        run_query(engine, "runs-of-model", sha="aaaa")
