"""Write validated result records to the database: one transaction per batch, idempotent.

Data rows are inserted with `INSERT ... ON CONFLICT (natural key) DO NOTHING`, so a re-delivered batch writes
nothing twice and costs one index probe per row. They go straight to the driver's `executemany` as tuples:
SQLAlchemy's per-row parameter processing would halve the rate on SQLite, and its batched path on PostgreSQL
loses the rowcount, which is how we count duplicates (the drivers sum it over the batch). Runs and devices,
a few rows per batch, use the dialect's own insert construct (`on_conflict_do_update`).

A `run` record may arrive after the rows that reference it (or never, if the collector joined late): a bare
`runs` row is created first and filled in when the record comes.
"""

from __future__ import annotations

import json
import operator
import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Sequence

from sqlalchemy import JSON, Connection, Engine, Table
from sqlalchemy.dialects import postgresql, sqlite

from results_db.models import Device, EnergyWindow, IdleBaseline, Inference, Run

DEVICES: Table = Device.__table__  # type: ignore[assignment]
RUNS: Table = Run.__table__  # type: ignore[assignment]

# record type -> (table, natural key); every column but the surrogate id comes from the record's field of
# the same name.
DATA_TABLES: Dict[str, Table] = {
    "inference": Inference.__table__,  # type: ignore[dict-item]
    "energy_window": EnergyWindow.__table__,  # type: ignore[dict-item]
    "idle_baseline": IdleBaseline.__table__,  # type: ignore[dict-item]
}
NATURAL_KEYS: Dict[str, List[str]] = {
    "inference": ["run_id", "device_id", "seq"],
    "energy_window": ["run_id", "device_id", "window_seq"],
    "idle_baseline": ["run_id", "device_id", "source", "measured_unix"],
}
RUN_FIELDS = [
    "device_id",
    "policy",
    "policy_params",
    "profile",
    "dataset",
    "split",
    "model_sha256",
    "code_revision",
    "host",
    "started_unix",
]
_COLUMNS = {kind: [c.name for c in table.columns if c.name != "id"] for kind, table in DATA_TABLES.items()}
# Picks a record's values in column order, at C speed (the hot path for inferences).
_GETTERS = {kind: operator.itemgetter(*columns) for kind, columns in _COLUMNS.items()}
_JSON_COLUMNS = {
    kind: {c.name for c in table.columns if isinstance(c.type, JSON)} for kind, table in DATA_TABLES.items()
}


def _insert_sql(kind: str, placeholder: str) -> str:
    columns = _COLUMNS[kind]
    return (
        f"INSERT INTO {DATA_TABLES[kind].name} ({', '.join(columns)}) "
        f"VALUES ({', '.join(placeholder for _ in columns)}) "
        f"ON CONFLICT ({', '.join(NATURAL_KEYS[kind])}) DO NOTHING"
    )


_INSERTS: Dict[str, Callable[[Table], Any]] = {
    "sqlite": sqlite.insert,
    "postgresql": postgresql.insert,
}


@dataclass
class WriteCounts:
    """What one `write` did: data rows newly inserted, data rows already present, run records applied."""

    inserted: int = 0
    duplicates: int = 0
    run_records: int = 0

    def add(self, other: WriteCounts) -> None:
        self.inserted += other.inserted
        self.duplicates += other.duplicates
        self.run_records += other.run_records


class RecordWriter:
    """Writes batches of validated records (`protocol.records.validate_record`) to one database."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        dialect = engine.dialect.name
        if dialect not in _INSERTS:
            raise ValueError(f"unsupported database dialect {dialect!r}: use SQLite or PostgreSQL")
        insert = _INSERTS[dialect]
        placeholder = "?" if dialect == "sqlite" else "%s"  # sqlite3 is qmark, psycopg format style
        self._insert_sql = {kind: _insert_sql(kind, placeholder) for kind in DATA_TABLES}
        device = insert(DEVICES)
        self._device_seen = device.on_conflict_do_update(
            index_elements=["device_id"], set_={"last_seen_unix": device.excluded.last_seen_unix}
        )
        self._device_profile = device.on_conflict_do_update(
            index_elements=["device_id"],
            set_={"profile": device.excluded.profile, "host": device.excluded.host},
        )
        run = insert(RUNS)
        self._run_stub = run.on_conflict_do_nothing(index_elements=["run_id"])
        self._run_full = run.on_conflict_do_update(
            index_elements=["run_id"], set_={f: run.excluded[f] for f in RUN_FIELDS}
        )
        self._run_end = run.on_conflict_do_update(
            index_elements=["run_id"],
            set_={"ended_unix": run.excluded.ended_unix, "samples": run.excluded.samples},
        )

    def write(self, records: Sequence[Dict[str, Any]]) -> WriteCounts:
        """Write `records` in one transaction (committed on return)."""
        with self.engine.begin() as connection:
            return self.write_in(connection, records)

    def write_in(self, connection: Connection, records: Iterable[Dict[str, Any]]) -> WriteCounts:
        """Write `records` inside the caller's transaction."""
        now = time.time()
        by_kind: Dict[str, List[Dict[str, Any]]] = defaultdict(list)
        run_devices: Dict[str, str] = {}  # run -> the first device seen with it
        devices = set()
        for record in records:
            by_kind[record["type"]].append(record)
            run_devices.setdefault(record["run_id"], record["device_id"])
            devices.add(record["device_id"])
        if not run_devices:
            return WriteCounts()
        counts = WriteCounts()

        connection.execute(
            self._device_seen,
            [{"device_id": d, "first_seen_unix": now, "last_seen_unix": now} for d in sorted(devices)],
        )
        runs = by_kind.get("run", [])
        if runs:
            connection.execute(
                self._device_profile,
                [
                    {
                        "device_id": r["device_id"],
                        "profile": r["profile"],
                        "host": r["host"],
                        "first_seen_unix": now,
                        "last_seen_unix": now,
                    }
                    for r in runs
                ],
            )
            connection.execute(
                self._run_full, [{"run_id": r["run_id"], **{f: r[f] for f in RUN_FIELDS}} for r in runs]
            )
        connection.execute(
            self._run_stub, [{"run_id": run_id, "device_id": dev} for run_id, dev in run_devices.items()]
        )
        ends = by_kind.get("run_end", [])
        if ends:
            connection.execute(
                self._run_end,
                [
                    {
                        "run_id": r["run_id"],
                        "device_id": r["device_id"],
                        "ended_unix": r["ended_unix"],
                        "samples": r["samples"],
                    }
                    for r in ends
                ],
            )
        counts.run_records = len(runs) + len(ends)

        for kind in DATA_TABLES:
            rows = by_kind.get(kind)
            if rows:
                inserted = self._insert(connection, kind, rows)
                counts.inserted += inserted
                counts.duplicates += len(rows) - inserted
        return counts

    def _insert(self, connection: Connection, kind: str, rows: List[Dict[str, Any]]) -> int:
        """Insert the rows that are new; return how many were."""
        columns = _COLUMNS[kind]
        json_columns = _JSON_COLUMNS[kind]
        if json_columns:
            tuples = [tuple(json.dumps(r[c]) if c in json_columns else r[c] for c in columns) for r in rows]
        else:
            tuples = list(map(_GETTERS[kind], rows))
        result = connection.exec_driver_sql(self._insert_sql[kind], tuples)  # type: ignore[arg-type]
        return max(result.rowcount, 0)
