"""Results database: schema, migrations, the MQTT→SQL collector, views, queries and the report.

Imports are lazy (PEP 562) so that `edgecascade --help`, which imports `results_db.cli`, needs neither
SQLAlchemy nor paho: a device installs only the `device` extra.
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
