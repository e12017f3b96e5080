"""`edgecascade report --serve`: a real Datasette process on a free port serves the ten named queries from a
real SQLite results database, row for row what `run_query` returns, read-only, with the views described."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Dict, Iterator, Tuple

import pytest
from waiting import wait_for

from results_db.browse import units_of
from results_db.database import open_database
from results_db.ingest import RecordWriter
from results_db.queries import QUERIES, run_query
from results_db.synthetic import full_run

# A prefix of the model every synthetic run names, so that runs-of-model has rows to serve.
PARAMS: Dict[str, Dict[str, str]] = {"runs-of-model": {"model_sha256": "0000"}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(url: str) -> Tuple[int, Any]:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    text = body.decode()
    return status, json.loads(text) if url.split("?")[0].endswith(".json") else text


def _up(base: str) -> bool:
    try:
        return _get(f"{base}/-/versions.json")[0] == 200
    except (urllib.error.URLError, ConnectionError):
        return False


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("serve") / "bench.db"
    engine = open_database(path)
    writer = RecordWriter(engine)
    writer.write(full_run("meanet-1", "dev-a", 300, device_j=0.012, offload_fraction=0.22))
    writer.write(full_run("edge-1", "dev-b", 200, policy="edge-only", offload_fraction=0.0, device_j=0.009))
    writer.write(full_run("cloud-1", "dev-a", 150, policy="cloud-only", offload_fraction=1.0, device_j=0.02))
    writer.write(full_run("rapl-1", "dev-c", 100, policy="meanet", energy_source="rapl", seed=3))
    engine.dispose()
    return path


def _serve(db: Path, *extra: str) -> Iterator[str]:
    port = _free_port()
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecascade",
            "report",
            "--db",
            str(db),
            "--serve",
            "--port",
            str(port),
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: _up(base) or process.poll() is not None, 60, "Datasette to listen")
        assert process.poll() is None, process.communicate()[0].decode()
        yield base
    finally:
        process.send_signal(signal.SIGTERM)
        output = process.communicate(timeout=30)[0].decode()
        # Stopped by SIGTERM: uvicorn finishes the requests in flight, then re-raises the signal.
        assert process.returncode in (0, -signal.SIGTERM), output


@pytest.fixture(scope="module")
def server(results: Path) -> Iterator[str]:
    yield from _serve(results)


@pytest.mark.parametrize("name", sorted(QUERIES))
def test_each_canned_query_serves_what_run_query_returns(server: str, results: Path, name: str) -> None:
    params = PARAMS.get(name, {})
    query = urllib.parse.urlencode({"_shape": "objects", **params})
    status, body = _get(f"{server}/bench/{name}.json?{query}")
    assert status == 200, body
    engine = open_database(results)
    columns, rows = run_query(engine, name, **params)
    engine.dispose()
    assert rows, f"{name} has no rows: the test database should give every query some"
    assert body["columns"] == columns
    assert body["rows"] == rows
    assert set(QUERIES[name].units) <= set(columns), "a unit for a column the query does not return"


def test_the_metadata_names_every_query_with_its_question_and_units(server: str) -> None:
    status, metadata = _get(f"{server}/-/metadata.json")
    assert status == 200
    queries = metadata["databases"]["bench"]["queries"]
    assert set(queries) == set(QUERIES)
    for name, query in QUERIES.items():
        assert queries[name]["title"] == query.question
        for column, unit in query.units.items():
            assert f"{column} in {unit}" in queries[name]["description"]
    status, page = _get(f"{server}/bench/energy-per-correct")
    assert status == 200 and QUERIES["energy-per-correct"].question.replace("*", "") in page.replace("*", "")
    assert "device_j_per_correct in J" in page


def test_the_views_are_served_described_and_with_units(server: str, results: Path) -> None:
    status, body = _get(f"{server}/bench/run_summary.json?_shape=objects")
    assert status == 200 and {r["run_id"] for r in body["rows"]} == {
        "meanet-1",
        "edge-1",
        "cloud-1",
        "rapl-1",
    }
    status, page = _get(f"{server}/bench/run_summary")
    assert status == 200
    assert "One row per run" in page and "nearest-rank percentile" in page  # description, column notes
    assert "mJ" in page  # device_j_gross_per_inference, through Pint: 12 mJ, not 0.012
    metadata = _get(f"{server}/-/metadata.json")[1]["databases"]["bench"]["tables"]
    assert metadata["inference_facts"]["units"]["latency_ms"] == "ms"
    assert metadata["inferences"]["units"]["device_j_gross"] == "J"
    assert "ts_unix" not in metadata["inferences"]["units"]


def test_it_is_read_only(server: str, results: Path) -> None:
    status, body = _get(f"{server}/bench.json?" + urllib.parse.urlencode({"sql": "DELETE FROM runs"}))
    assert status == 400 and not body["ok"]
    status, body = _get(
        f"{server}/bench.json?" + urllib.parse.urlencode({"sql": "SELECT COUNT(*) AS n FROM runs"})
    )
    assert status == 200 and body["rows"] == [[4]]


def test_an_immutable_file_is_served_too(results: Path) -> None:
    for base in _serve(results, "--immutable"):
        status, body = _get(f"{base}/bench/latency-by-policy.json?_shape=objects")
        assert status == 200 and {r["policy"] for r in body["rows"]} == {"meanet", "edge-only", "cloud-only"}


def test_serve_refuses_what_datasette_cannot_read(tmp_path: Path) -> None:
    from edgecascade.cli import main

    assert main(["report", "--db", "postgresql+psycopg://nobody@127.0.0.1:1/none", "--serve"]) == 2
    assert main(["report", "--db", str(tmp_path / "missing.db"), "--serve"]) == 2


def test_units_come_from_the_column_names() -> None:
    assert [units_of(c) for c in ("edge_ms", "latency_p99_ms", "cloud_ms_mean", "device_j_gross")] == [
        "ms",
        "ms",
        "ms",
        "J",
    ]
    assert [units_of(c) for c in ("gross_j", "bytes_up", "idle_w", "duration_s")] == ["J", "B", "W", "s"]
    assert [units_of(c) for c in ("ts_unix", "started_unix", "accuracy", "samples", "frac_shed")] == [
        None
    ] * 5
