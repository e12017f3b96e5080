"""Write validated result records to the database: one transaction per batch, idempotent.

Data rows are inserted with `INSERT ... ON CONFLICT (natural key) DO NOTHING`, so a re-delivered batch writes
nothing twice and costs one index probe per row; its rowcount says how many were new, which is how we count
duplicates. On SQLite they go straight to the driver's `executemany` as tuples (SQLAlchemy's per-row
parameter processing would halve the rate). On PostgreSQL they are COPYed in binary into a temporary staging
table, then moved with one `INSERT ... SELECT ... ON CONFLICT DO NOTHING` per batch (`results_db.pg_copy`;
the README's "PostgreSQL at fleet rates" has the figures). Runs and devices, a few rows per batch, use the
dialect's own insert construct (`on_conflict_do_update`).

A `run` record may arrive after the rows that reference it (or never, if the collector joined late): a bare
`runs` row is created first and filled in when the record comes. A run belongs to the device that first
wrote to it: records of another device for that run id are refused (a device cannot take over another's run).

A row already present is a duplicate only if its content is the same: a row of the same key with another
content is refused as a conflict, never taken as stored (an agent that once reused window numbers after a
restart lost whole batches that way). Refused records are returned (`WriteCounts.refused`, by position in the
input) and, with `rejected=`, kept in `rejected_records` in the same transaction: once each, keyed by topic
and content (`rejected_digest`), however often the broker or the device delivers the message again.
"""

from __future__ import annotations

import hashlib
import json
import operator
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import msgpack
from sqlalchemy import JSON, Connection, Engine, Table, func, select
from sqlalchemy.dialects import postgresql, sqlite

from results_db.models import (
    Device,
    DriftCheck,
    EnergyWindow,
    Frame,
    IdleBaseline,
    Inference,
    RejectedRecord,
    Run,
)
from results_db.partitions import PartitionKeeper, is_partitioned
from results_db.pg_copy import StagedCopy

DEVICES: Table = Device.__table__  # type: ignore[assignment]
RUNS: Table = Run.__table__  # type: ignore[assignment]
REJECTED: Table = RejectedRecord.__table__  # type: ignore[assignment]

# record type -> (table, natural key); every column but the surrogate id comes from the record's field of
# the same name.
DATA_TABLES: Dict[str, Table] = {
    "inference": Inference.__table__,  # type: ignore[dict-item]
    "energy_window": EnergyWindow.__table__,  # type: ignore[dict-item]
    "idle_baseline": IdleBaseline.__table__,  # type: ignore[dict-item]
    "frame": Frame.__table__,  # type: ignore[dict-item]
    "drift": DriftCheck.__table__,  # type: ignore[dict-item]
}
NATURAL_KEYS: Dict[str, List[str]] = {
    "inference": ["run_id", "device_id", "seq"],
    "energy_window": ["run_id", "device_id", "window_seq"],
    "idle_baseline": ["run_id", "device_id", "source", "measured_unix"],
    "frame": ["run_id", "device_id", "seq"],
    "drift": ["run_id", "device_id", "seq"],
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


def rejected_digest(topic: str, record: bytes) -> str:
    """The key of a kept refused record: sha256 of its topic, a NUL byte and its bytes (migration 0004
    computes the same for the rows stored before it)."""
    return hashlib.sha256(topic.encode("utf-8", "surrogatepass") + b"\0" + record).hexdigest()


@dataclass
class Refusal:
    """A record that cannot be stored where it belongs (`index`: its position in what was written)."""

    index: int
    reason: str


@dataclass
class Rejected:
    """A record (or an undecodable payload) for `rejected_records`."""

    topic: str
    device_id: Optional[str]
    kind: Optional[str]
    reason: str
    record: Any  # a map, or the raw bytes of a message that could not be decoded

    @classmethod
    def of(cls, topic: str, device_id: Optional[str], record: Any, reason: str) -> Rejected:
        kind = record.get("type") if isinstance(record, dict) else None
        return cls(topic, device_id, kind if isinstance(kind, str) else None, reason, record)


@dataclass
class WriteCounts:
    """What one `write` did: data rows newly inserted, identical rows already present, run records
    applied, and the records refused (foreign run, conflicting content)."""

    inserted: int = 0
    duplicates: int = 0
    run_records: int = 0
    refused: List[Refusal] = field(default_factory=list)


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
        self._copy = dialect == "postgresql"
        with engine.connect() as connection:
            partitioned = is_partitioned(connection)
        # inferences partitioned by day (PostgreSQL, 0008): the writer creates the days it writes into
        self._partitions = PartitionKeeper(engine) if partitioned else None
        self._copies = {
            kind: StagedCopy(table, _COLUMNS[kind], NATURAL_KEYS[kind], partitioned and kind == "inference")
            for kind, table in DATA_TABLES.items()
            if self._copy
        }
        self._placeholder = placeholder
        self._json_is_text = dialect == "sqlite"  # psycopg hands JSONB back decoded, sqlite3 as text
        self._reject = insert(REJECTED).on_conflict_do_nothing(index_elements=["digest"])
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
        # A resumed run announces itself again: the latest announcement wins; it started when it first did.
        self._run_full = run.on_conflict_do_update(
            index_elements=["run_id"],
            set_={
                **{f: run.excluded[f] for f in RUN_FIELDS},
                "started_unix": func.coalesce(RUNS.c.started_unix, run.excluded.started_unix),
            },
        )
        self._run_end = run.on_conflict_do_update(
            index_elements=["run_id"],
            set_={"ended_unix": run.excluded.ended_unix, "samples": run.excluded.samples},
        )

    def write(
        self,
        records: Sequence[Dict[str, Any]],
        rejected: Sequence[Rejected] = (),
        topics: Optional[Sequence[str]] = None,
    ) -> WriteCounts:
        """Write `records` in one transaction (committed on return); `rejected`, and the records this write
        refuses (with their `topics`, when given), are kept in `rejected_records` in the same transaction."""
        if self._partitions is not None:  # before the transaction: creating one locks the parent table
            self._partitions.ensure((r["ts_unix"] for r in records if r["type"] == "inference"), time.time())
        with self.engine.begin() as connection:
            counts = self.write_in(connection, records)
            own = [
                Rejected.of(
                    topics[r.index] if topics else "",
                    records[r.index]["device_id"],
                    records[r.index],
                    r.reason,
                )
                for r in counts.refused
            ]
            self.reject_in(connection, [*rejected, *own])
            return counts

    def reject_in(self, connection: Connection, rejected: Sequence[Rejected]) -> None:
        """Keep refused records in `rejected_records`, inside the caller's transaction."""
        if not rejected:
            return
        now = time.time()
        rows = []
        for r in rejected:
            body = r.record if isinstance(r.record, bytes) else msgpack.packb(r.record, use_bin_type=True)
            rows.append(
                {
                    "received_unix": now,
                    "topic": r.topic,
                    "device_id": r.device_id,
                    "kind": r.kind,
                    "reason": r.reason[:2000],
                    "record": body,
                    "digest": rejected_digest(r.topic, body),
                }
            )
        connection.execute(self._reject, rows)  # a copy already kept (re-delivery) is skipped

    def write_in(self, connection: Connection, records: Sequence[Dict[str, Any]]) -> WriteCounts:
        """Write `records` inside the caller's transaction."""
        now = time.time()
        counts = WriteCounts()
        if not records:
            return counts
        devices = sorted({r["device_id"] for r in records})
        connection.execute(
            self._device_seen,
            [{"device_id": d, "first_seen_unix": now, "last_seen_unix": now} for d in devices],
        )
        first_device: Dict[str, str] = {}  # run -> the first device seen with it in this batch
        for record in records:
            first_device.setdefault(record["run_id"], record["device_id"])
        connection.execute(
            self._run_stub, [{"run_id": run_id, "device_id": dev} for run_id, dev in first_device.items()]
        )
        owners = self._owners(connection, list(first_device))
        by_kind: Dict[str, List[Tuple[int, Dict[str, Any]]]] = defaultdict(list)
        for i, record in enumerate(records):
            owner = owners.get(record["run_id"])
            if owner != record["device_id"]:
                counts.refused.append(Refusal(i, f"run {record['run_id']!r} belongs to device {owner!r}"))
            else:
                by_kind[record["type"]].append((i, record))

        runs = [r for _, r in by_kind.get("run", [])]
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
        ends = [r for _, r in by_kind.get("run_end", [])]
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
                inserted = self._insert(connection, kind, [r for _, r in rows])
                counts.inserted += inserted
                if inserted < len(rows):  # some were there already: the same, or not?
                    conflicts = self._conflicts(connection, kind, rows)
                    counts.refused += conflicts
                    counts.duplicates += len(rows) - inserted - len(conflicts)
        return counts

    def _owners(self, connection: Connection, run_ids: List[str]) -> Dict[str, str]:
        owners: Dict[str, str] = {}
        for start in range(0, len(run_ids), 500):
            chunk = run_ids[start : start + 500]
            result = connection.execute(
                select(RUNS.c.run_id, RUNS.c.device_id).where(RUNS.c.run_id.in_(chunk))
            )
            owners.update({str(run): str(dev) for run, dev in result})
        return owners

    def _insert(self, connection: Connection, kind: str, rows: List[Dict[str, Any]]) -> int:
        """Insert the rows that are new; return how many were."""
        if self._copy:
            return self._copies[kind].insert(connection, self._tuples(kind, rows))
        result = connection.exec_driver_sql(self._insert_sql[kind], self._tuples(kind, rows))  # type: ignore[arg-type]
        return max(result.rowcount, 0)

    def _tuples(self, kind: str, rows: List[Dict[str, Any]]) -> List[Tuple[Any, ...]]:
        columns = _COLUMNS[kind]
        json_columns = _JSON_COLUMNS[kind]
        if json_columns:
            return [tuple(json.dumps(r[c]) if c in json_columns else r[c] for c in columns) for r in rows]
        return list(map(_GETTERS[kind], rows))

    def _conflicts(
        self, connection: Connection, kind: str, rows: List[Tuple[int, Dict[str, Any]]]
    ) -> List[Refusal]:
        """The rows whose key is stored with another content (re-delivery is only ever the same content).

        The insert's rowcount says how many rows were new, not which: the stored rows of the batch's keys
        come back in one query per (run, device) and 500 keys, and those this transaction has just
        inserted compare equal."""
        columns = _COLUMNS[kind]
        json_columns = _JSON_COLUMNS[kind]
        keys = NATURAL_KEYS[kind]
        stored = self._stored(connection, kind, [record for _, record in rows])
        refused = []
        for index, record in rows:
            key = tuple(record[k] for k in keys)
            row = stored.get(key)
            if row is None:  # cannot be: it was refused as present
                refused.append(Refusal(index, f"{kind} row neither inserted nor found"))
                continue
            for column, value in zip(columns, row):
                if column in json_columns:
                    same = _json_normal(value, self._json_is_text) == _json_normal(record[column], False)
                else:
                    same = value == record[column]
                if not same:
                    shown = ", ".join(f"{k}={v!r}" for k, v in zip(keys, key))
                    refused.append(
                        Refusal(index, f"conflicts with the stored {kind} row ({shown}): {column} differs")
                    )
                    break
        return refused

    def _stored(
        self, connection: Connection, kind: str, records: List[Dict[str, Any]]
    ) -> Dict[Tuple[Any, ...], Any]:
        """The stored rows (all columns but id) of these records' natural keys, by key."""
        columns = _COLUMNS[kind]
        keys = NATURAL_KEYS[kind]
        *prefix, last = keys  # the last key column varies within a run: IN (...) on it, = on the others
        positions = [columns.index(k) for k in keys]
        groups: Dict[Tuple[Any, ...], List[Any]] = defaultdict(list)
        for record in records:
            groups[tuple(record[k] for k in prefix)].append(record[last])
        ph = self._placeholder
        head = f"SELECT {', '.join(columns)} FROM {DATA_TABLES[kind].name} WHERE " + "".join(
            f"{k} = {ph} AND " for k in prefix
        )
        found: Dict[Tuple[Any, ...], Any] = {}
        for group, values in groups.items():
            for start in range(0, len(values), 500):
                chunk = values[start : start + 500]
                sql = f"{head}{last} IN ({', '.join(ph for _ in chunk)})"
                for row in connection.exec_driver_sql(sql, (*group, *chunk)):
                    found[tuple(row[i] for i in positions)] = row
        return found


def _json_normal(value: Any, is_text: bool) -> Any:
    """A JSON value as it compares: through a JSON round trip, every number a float (PostgreSQL's JSONB keeps
    numbers as numeric and gives 1.5e300 back as an int; SQLite keeps the text)."""
    return _floats(json.loads(value) if is_text and isinstance(value, str) else json.loads(json.dumps(value)))


def _floats(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return value
