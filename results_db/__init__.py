"""Results database: schema, migrations, the MQTT→SQL collector, views, queries and the report.

Imports are lazy (PEP 562) so that `edgecascade --help`, which imports `results_db.cli`, needs neither
SQLAlchemy nor paho: a device installs only the `device` extra.

    collector   Collector: results from MQTT into SQL, committed before acknowledged; messages: one message
    ingest      RecordWriter: validated records in one idempotent transaction per batch
    models      the SQLAlchemy 2 schema; database: open SQLite/PostgreSQL and migrate (Alembic)
    queries     the users' questions as SQL; stats: the one percentile (nearest rank)
    report      `edgecascade report` (rich, PNGs via plots, Markdown); video: the REACT mAP report
    synthetic   well-formed records for tests and benchmarks; testing: a private PostgreSQL for tests
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "open_database": "results_db.database",
    "resolve_url": "results_db.database",
    "Collector": "results_db.collector",
    "CollectorConfig": "results_db.collector",
    "RecordWriter": "results_db.ingest",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'results_db' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
