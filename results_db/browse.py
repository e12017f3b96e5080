"""`edgecascade report --serve`: the results database in Datasette, read-only, with the named queries.

Datasette (datasette.io) serves a SQLite file as web pages and JSON. What this module adds is the metadata
that makes the results readable there: the ten named queries of `results_db.queries` as canned queries (the
question as title, the units of their columns in the description), the views described column by column, and
units on every column whose name carries one (`edge_ms`, `device_j_gross`, `bytes_up`, `idle_w`: the names
are the one place units are written down), which Datasette shows through Pint (12.3 mJ, 958 B).

Read-only by default: Datasette opens the file with `mode=ro` and no canned query writes, so a collector can
go on writing it; `immutable=True` (a finished file that nothing writes) lets SQLite skip locking and
Datasette cache row counts. PostgreSQL is not served: Datasette reads SQLite only.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

from results_db.queries import QUERIES

DEFAULT_PORT = 8001
SQL_TIME_LIMIT_MS = 5000  # Datasette's default 1 s is short for the percentile queries on a fleet's database

_FRACTION = "fraction of the run's samples, 0-1"
_LATENCY = "edge_ms + network_ms + gateway_ms + cloud_ms"

# What each view is for, and what its less obvious columns mean. Units are not repeated here (see units_of).
VIEWS: Dict[str, Dict[str, Any]] = {
    "inference_facts": {
        "description": "One row per inference, its run's policy, profile, dataset, split and model "
        "joined in, with its latency, whether it was correct and whether it was offloaded. The view "
        "the named queries and the report read.",
        "columns": {
            "exit_stage": "main, extension, cloud; fallback: offloaded, the reply missed its "
            "deadline, the edge answer was used; shed: kept at the edge because the reply would "
            "have come too late (not sent)",
            "latency_ms": _LATENCY,
            "correct": "1 when prediction = label, 0 when not, NULL when the sample had no label",
            "offloaded": "1 for exit stage cloud or fallback (sent to the cloud), else 0",
            "device_j_gross": "device joules of this sample as metered: its window's joules in "
            "proportion to its compute time",
            "device_j_net": "device_j_gross less the idle baseline",
            "device_j_analytic": "the model card's MACs and bytes x Horowitz's 45 nm energies per "
            "operation: a model, never a measurement",
            "gateway_j": "the fault hierarchy's gateway joules for the sample, analytic like "
            "device_j_analytic; NULL where no gateway saw it",
            "energy_source": "the meter (rapl, jtop, tegrastats, ina3221, nvml); estimate: process "
            "CPU time x assumed watts per core, not a measurement; none: no joules",
            "ts_unix": "when the device settled the sample, seconds since 1970 (UTC)",
        },
    },
    "run_summary": {
        "description": "One row per run: accuracy, exit mix, offload fraction, device and cloud "
        "joules per inference, latency percentiles (nearest rank), bytes per inference. What "
        "`edgecascade report` tabulates. A run id ending in -paced is a latency run of "
        "`edgecascade bench` fed at a camera's rate.",
        "columns": {
            "accuracy": "correct / labelled, 0-1",
            "offload_fraction": "(cloud + fallback) / samples, 0-1; shed samples were not sent",
            "frac_main": _FRACTION,
            "frac_extension": _FRACTION,
            "frac_cloud": _FRACTION,
            "frac_fallback": _FRACTION,
            "frac_shed": _FRACTION,
            "device_j_gross_per_inference": "mean device joules per sample, as metered (see energy_source)",
            "device_j_net_per_inference": "the same less the idle baseline",
            "device_j_analytic_per_inference": "mean analytic joules per sample (a model, not a measurement)",
            "cloud_j_per_inference": "the cloud workers' joules over all samples of the run",
            "cloud_j_per_offload": "the cloud workers' joules per answered offload",
            "energy_source": "one meter for the whole run, else 'mixed'; estimate is not a measurement",
            "latency_p50_ms": f"{_LATENCY}, nearest-rank percentile",
            "latency_p95_ms": f"{_LATENCY}, nearest-rank percentile",
            "latency_p99_ms": f"{_LATENCY}, nearest-rank percentile",
            "started_unix": "seconds since 1970 (UTC)",
            "ended_unix": "seconds since 1970 (UTC)",
        },
    },
    "class_accuracy": {
        "description": "Accuracy and offload fraction per run and true class (labelled samples only).",
        "columns": {"accuracy": "correct / samples, 0-1", "offload_fraction": "offloaded / samples, 0-1"},
    },
    "pareto_points": {
        "description": "Runs with both accuracy and gross device joules; on_front = 1 when no run of "
        "the same dataset is at least as accurate for no more joules. It compares gross joules "
        "whatever their source (an estimate against a meter): the report's figure draws metered "
        "and analytic fronts apart.",
        "columns": {"on_front": "1 on the accuracy/energy Pareto front of its dataset, else 0"},
    },
    "video_run_summary": {
        "description": "One row per REACT camera run: method, detector and cloud intervals, injected "
        "delay, mAP (pycocotools), frames per second, joules and bytes per frame, fraction of "
        "frames sent.",
        "columns": {
            "fps": "(frames - 1) / seconds between the first and last frame",
            "map50": "COCO mAP at IoU 0.5, 0-1",
            "map": "COCO mAP over IoU 0.5:0.95, 0-1",
            "sent_fraction": "frames sent to the cloud / frames, 0-1",
        },
    },
}
TABLES: Dict[str, str] = {
    "runs": "One row per run: as its `run` record announced it (NULL fields until it arrives).",
    "devices": "Every device that published results; first and last time the collector heard of it.",
    "inferences": "One row per sample: every field of the device's `inference` record.",
    "energy_windows": "Meter windows as the device measured them: joules per rail, duration, samples.",
    "idle_baselines": "The idle power measured before a run (subtracted for the net figures).",
    "rejected_records": "Records the collector could not store, with the reason: none dropped silently.",
    "frames": "One row per video frame of a REACT camera run.",
    "video_runs": "mAP of each camera run, evaluated from its frames' rows.",
}
HIDDEN = ("alembic_version",)


def units_of(column: str) -> Optional[str]:
    """The Pint unit a column's name carries (`edge_ms` ms, `device_j_gross` J, `bytes_up` B, `idle_w` W,
    `duration_s` s), or None; timestamps (`*_unix`) and fractions carry none."""
    parts = column.lower().split("_")
    if "unix" in parts:
        return None
    if "ms" in parts:
        return "ms"
    if "j" in parts:
        return "J"
    if parts[0] == "bytes":
        return "B"
    if parts[-1] == "w" and len(parts) > 1:
        return "W"
    if parts[-1] == "s" and len(parts) > 1:
        return "s"
    return None


def query_description(name: str) -> str:
    query = QUERIES[name]
    units = ", ".join(f"{column} in {unit}" for column, unit in query.units.items())
    params = ", ".join(f":{p}" for p in query.params)
    return (
        f"`edgecascade report --query {name}`."
        + (f" Units: {units}." if units else "")
        + (f" Parameter {params} (empty: all)." if params else "")
    )


def _columns(db_path: Path) -> Dict[str, List[str]]:
    """Every table and view of the file with its columns (read-only)."""
    connection = sqlite3.connect(f"file:{db_path}?mode=ro", uri=True)
    try:
        names = [
            row[0]
            for row in connection.execute(
                "SELECT name FROM sqlite_master WHERE type IN ('table', 'view') AND name NOT LIKE 'sqlite_%'"
            )
        ]
        return {
            name: [row[1] for row in connection.execute(f"PRAGMA table_info({json.dumps(name)})")]
            for name in names
        }
    finally:
        connection.close()


def datasette_metadata(db_path: Path) -> Dict[str, Any]:
    """Datasette metadata for the results file: the canned queries, the views and tables described, units."""
    tables: Dict[str, Dict[str, Any]] = {}
    for name, columns in _columns(db_path).items():
        doc = VIEWS.get("inference_facts" if name == "inferences" else name, {})  # the same fields
        meta: Dict[str, Any] = {}
        description = doc.get("description") or TABLES.get(name)
        if description:
            meta["description"] = description
        if doc.get("columns"):
            meta["columns"] = {c: d for c, d in doc["columns"].items() if c in columns}
        units = {c: u for c in columns if (u := units_of(c))}
        if units:
            meta["units"] = units
        if name in HIDDEN:
            meta["hidden"] = True
        tables[name] = meta
    queries = {
        name: {"title": query.question, "description": query_description(name), "sql": query.sql.strip()}
        for name, query in QUERIES.items()
    }
    return {
        "title": "edgecascade results",
        "description": "Results of edgecascade runs, read-only. Start with the views run_summary and "
        "inference_facts, or one of the ten named queries.",
        "about": "edgecascade report --serve",
        "databases": {db_path.stem: {"tables": tables, "queries": queries}},
    }


def datasette_app(db_path: Path, *, immutable: bool = False) -> Any:
    """The Datasette instance for the file, read-only (`immutable` for a finished file)."""
    from datasette.app import Datasette

    return Datasette(
        [] if immutable else [str(db_path)],
        immutables=[str(db_path)] if immutable else [],
        metadata=datasette_metadata(db_path),
        settings={"sql_time_limit_ms": SQL_TIME_LIMIT_MS},
    )


def serve(
    db_path: Path, *, host: str = "127.0.0.1", port: int = DEFAULT_PORT, immutable: bool = False
) -> None:
    """Serve the file until SIGINT or SIGTERM (uvicorn's handlers: it finishes the requests in flight)."""
    import asyncio

    import uvicorn

    datasette = datasette_app(db_path, immutable=immutable)
    asyncio.run(datasette.invoke_startup())
    mode = "immutable" if immutable else "read-only"
    print(f"serving {db_path} ({mode}) at http://{host}:{port}/{db_path.stem}", file=sys.stderr)
    uvicorn.run(datasette.app(), host=host, port=port, log_level="warning")
