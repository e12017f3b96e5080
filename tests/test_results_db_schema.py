"""Results database schema: migrations to head match the models, SQLite settings, idempotent writes.

Every test taking `db_url` runs on a SQLite file and on a fresh schema of a scratch PostgreSQL database.
"""

from __future__ import annotations

import sqlite3
from typing import Any, Optional

import pytest
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import func, inspect, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from results_db.database import (
    DatabaseUnusable,
    alembic_config,
    current_revision,
    head_revision,
    open_database,
    resolve_url,
)
from results_db.ingest import RecordWriter
from results_db.models import Base, Device, EnergyWindow, IdleBaseline, Inference, Run
from results_db.partitions import DEFAULT, PREFIX
from results_db.synthetic import full_run, inference_records, run_end_record, run_record

TABLES = {"runs", "devices", "inferences", "energy_windows", "idle_baselines", "rejected_records"}
TABLES |= {"frames", "video_runs", "drift_checks"}
VIEWS = {"inference_facts", "run_summary", "class_accuracy", "pareto_points", "video_run_summary"}
VIEWS |= {"drift_timeline"}
PARTITION_PREFIXES = (PREFIX, DEFAULT)
RUN_DEVICE_KEY = "uq_runs_run_id_device_id"  # 0010, PostgreSQL only


def _not_a_partition(name: Optional[str], type_: str, parents: Any) -> bool:
    """Alembic's include_name: the partitions of `inferences` (PostgreSQL, 0008) are part of that table."""
    return not (type_ == "table" and name is not None and name.startswith(PARTITION_PREFIXES))


def _named_difference(diff: Any) -> bool:
    """A difference from the models that PostgreSQL's schema has on purpose (0008, 0010)."""
    kind, item = diff[0], diff[1]
    if kind in ("add_constraint", "remove_constraint", "add_fk", "remove_fk"):
        return item.table.name == "inferences" or (
            kind == "remove_constraint" and item.name == RUN_DEVICE_KEY
        )
    return False


def test_empty_database_migrates_to_head_matching_the_models(db_url: str) -> None:
    engine = open_database(db_url)
    assert current_revision(engine) == head_revision() is not None
    with engine.connect() as connection:
        opts = {"compare_type": True, "include_name": _not_a_partition}
        diffs = compare_metadata(MigrationContext.configure(connection, opts=opts), Base.metadata)
        inspector = inspect(connection)
        tables = {t for t in inspector.get_table_names() if _not_a_partition(t, "table", {})}
        tables -= {"alembic_version"}
        views = set(inspector.get_view_names())
        unique = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("inferences")}
    if engine.dialect.name == "postgresql":
        # 0008: the partitioned table's natural key holds the partition key (the writer keeps it unique
        # without it: test_partitions.py); 0010: a row references its run by (run_id, device_id), the one
        # key the models do not declare; everything else matches the models.
        assert unique == {("run_id", "device_id", "seq", "ts_unix")}
        with engine.connect() as connection:
            inspector = inspect(connection)
            keys = {(tuple(k["constrained_columns"]), k["referred_table"], tuple(k["referred_columns"]))
                    for k in inspector.get_foreign_keys("inferences")}  # fmt: skip
            run_keys = {tuple(u["column_names"]) for u in inspector.get_unique_constraints("runs")}
        assert keys == {(("run_id", "device_id"), "runs", ("run_id", "device_id"))}
        assert run_keys == {("run_id", "device_id")}
        diffs = [d for d in diffs if not _named_difference(d)]
        assert len(diffs) == 0
    assert diffs == []
    assert tables == TABLES
    assert views == VIEWS
    engine.dispose()
    # Opening again finds the schema current and leaves it alone.
    again = open_database(db_url)
    assert current_revision(again) == head_revision()
    again.dispose()


def test_downgrade_to_base_and_upgrade_again(db_url: str) -> None:
    engine = open_database(db_url)
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "base")
    with engine.connect() as connection:
        inspector = inspect(connection)
        assert set(inspector.get_table_names()) <= {"alembic_version"}
        assert inspector.get_view_names() == []
    engine.dispose()
    engine = open_database(db_url)
    with engine.connect() as connection:
        assert set(inspect(connection).get_view_names()) == VIEWS
    engine.dispose()


def _insert_inference(connection, run_id: str, seq: int, stage: str) -> None:
    connection.execute(
        text(
            "INSERT INTO inferences (run_id, device_id, seq, prediction, exit_stage, edge_ms, bytes_up, "
            "bytes_down, energy_source, ts_unix) VALUES (:run, 'dev-m', :seq, 1, :stage, 1.0, 0, 0, 'x', 0)"
        ),
        {"run": run_id, "seq": seq, "stage": stage},
    )


def test_a_database_at_0004_upgrades_and_then_takes_shed_rows(db_url: str) -> None:
    """Migration 0005 widens the exit-stage CHECK (SQLite: a table rebuild) and run_summary counts `shed`;
    the rows already there come through unchanged."""
    engine = open_database(db_url)
    RecordWriter(engine).write(full_run("run-m", "dev-m", 20))  # written at head: today's writer
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0004")
    with pytest.raises(IntegrityError), engine.begin() as connection:  # 0004 refuses the new stage
        _insert_inference(connection, "run-m", 100, "shed")
    with engine.connect() as connection:
        before = connection.execute(text("SELECT * FROM inferences ORDER BY seq")).all()
        assert "exit_shed" not in list(connection.execute(text("SELECT * FROM run_summary")).keys())
    engine.dispose()
    engine = open_database(db_url)  # upgrades to head
    assert current_revision(engine) == head_revision()
    with engine.begin() as connection:
        _insert_inference(connection, "run-m", 100, "shed")
        _insert_inference(connection, "run-m", 101, "shed")
    with pytest.raises(IntegrityError), engine.begin() as connection:  # still a checked list
        _insert_inference(connection, "run-m", 102, "teleport")
    with engine.connect() as connection:
        columns = ", ".join(before[0]._fields)  # 0007 added model_version (NULL for these rows)
        after = connection.execute(
            text(f"SELECT {columns} FROM inferences WHERE seq < 100 ORDER BY seq")
        ).all()
        summary = connection.execute(text("SELECT * FROM run_summary WHERE run_id = 'run-m'")).one()._mapping
        views = set(inspect(connection).get_view_names())
    assert after == before
    assert views == VIEWS
    assert (summary["samples"], summary["exit_shed"]) == (22, 2)
    assert summary["frac_shed"] == pytest.approx(2 / 22)
    stages = sum(summary[f"exit_{s}"] for s in ("main", "extension", "cloud", "fallback", "shed"))
    assert stages == 22
    # Back to 0004 only without shed rows (narrowing the constraint would have to drop them).
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        with pytest.raises(RuntimeError, match="2 inference rows have exit stage 'shed'"):
            command.downgrade(cfg, "0004")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM inferences WHERE exit_stage = 'shed'"))
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0004")
    with engine.connect() as connection:
        assert "exit_shed" not in list(connection.execute(text("SELECT * FROM run_summary")).keys())
        assert len(connection.execute(text("SELECT * FROM inferences")).all()) == 20
    engine.dispose()


def test_0007_keeps_each_rows_model_version_and_counts_gateway_exits(db_url: str) -> None:
    """Migration 0007: inferences carry the model version (shown by inference_facts); `gateway` is an exit
    stage that counts as offloaded; back to 0006 only without gateway rows, and the rows stay."""
    engine = open_database(db_url)
    records = full_run("run-g", "dev-m", 10)
    inferences = [r for r in records if r["type"] == "inference"]
    for r in inferences[:4]:
        r.update(exit_stage="gateway", model_version="v2")
    RecordWriter(engine).write(records)
    with engine.connect() as connection:
        facts = connection.execute(
            text(
                "SELECT seq, model_version, offloaded FROM inference_facts "
                "WHERE run_id = 'run-g' ORDER BY seq"
            )
        ).all()
        summary = connection.execute(text("SELECT * FROM run_summary WHERE run_id = 'run-g'")).one()._mapping
    assert [f.model_version for f in facts] == ["v2"] * 4 + [None] * 6
    assert all(f.offloaded == 1 for f in facts[:4])
    offloaded = 4 + sum(r["exit_stage"] in ("cloud", "fallback") for r in inferences[4:])
    assert (summary["exit_gateway"], summary["frac_gateway"]) == (4, pytest.approx(0.4))
    assert summary["offload_fraction"] == pytest.approx(offloaded / 10)
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        with pytest.raises(RuntimeError, match="4 inference rows have exit stage 'gateway'"):
            command.downgrade(cfg, "0006")
    with engine.begin() as connection:
        connection.execute(text("DELETE FROM inferences WHERE exit_stage = 'gateway'"))
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0006")
    with engine.connect() as connection:
        assert "exit_gateway" not in list(connection.execute(text("SELECT * FROM run_summary")).keys())
        assert "model_version" not in list(connection.execute(text("SELECT * FROM inferences")).keys())
        assert len(connection.execute(text("SELECT * FROM inferences")).all()) == 6
    engine.dispose()


def test_sqlite_is_a_wal_file_with_busy_timeout_and_foreign_keys(tmp_path) -> None:
    path = tmp_path / "sub" / "bench.db"
    engine = open_database(path)
    with engine.connect() as connection:
        pragma = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "busy_timeout", "foreign_keys", "synchronous")
        }
        assert pragma == {"journal_mode": "wal", "busy_timeout": 30000, "foreign_keys": 1, "synchronous": 1}
        with pytest.raises(IntegrityError):  # foreign keys are enforced: no inference without its run
            connection.exec_driver_sql(
                "INSERT INTO inferences (run_id, device_id, seq, prediction, exit_stage, edge_ms, bytes_up, "
                "bytes_down, energy_source, ts_unix) VALUES ('nope', 'nope', 0, 1, 'main', 1.0, 0, 0, 'x', 0)"
            )
    engine.dispose()
    assert path.is_file()
    with sqlite3.connect(path) as raw:  # WAL is a property of the file, seen by any client
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_resolve_url(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.delenv("EDGECASCADE_DB_URL", raising=False)
    assert resolve_url(None).database.endswith("results/bench.db")
    assert resolve_url(tmp_path / "a.db").render_as_string() == f"sqlite:///{tmp_path / 'a.db'}"
    pg = resolve_url("postgresql://postgres@127.0.0.1:5432/test")
    assert pg.drivername == "postgresql+psycopg" and pg.database == "test"
    monkeypatch.setenv("EDGECASCADE_DB_URL", "postgresql+psycopg://u@h/db")
    assert resolve_url(None).host == "h"
    assert resolve_url("x.db").get_backend_name() == "sqlite"  # an argument beats the environment


def _counts(engine) -> dict:
    with Session(engine) as session:
        return {
            model.__tablename__: session.scalar(select(func.count()).select_from(model))
            for model in (Run, Device, Inference, EnergyWindow, IdleBaseline)
        }


def test_writer_is_idempotent(db_url: str) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    records = full_run("run-a", "dev-a", 100)
    first = writer.write(records)
    # 100 inferences + 4 energy windows + 1 idle baseline; run + run_end applied
    assert (first.inserted, first.duplicates, first.run_records) == (105, 0, 2)
    before = _counts(engine)
    assert before == {"runs": 1, "devices": 1, "inferences": 100, "energy_windows": 4, "idle_baselines": 1}
    second = writer.write(records)
    assert (second.inserted, second.duplicates, second.refused) == (0, 105, [])
    stored = [r for r in records if r["type"] == "inference"][90:]
    fresh = [r for r in inference_records("run-a", "dev-a", 20, start_seq=90) if r["seq"] >= 100]
    overlap = writer.write(stored + fresh)
    assert (overlap.inserted, overlap.duplicates, overlap.refused) == (10, 10, [])
    assert _counts(engine)["inferences"] == 110
    engine.dispose()


def test_a_stored_key_with_other_content_is_refused_not_taken_for_a_duplicate(db_url: str) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    records = full_run("run-c", "dev-c", 10)
    writer.write(records)
    window = next(r for r in records if r["type"] == "energy_window")
    changed = [{**r, "prediction": (r["prediction"] + 1) % 10} for r in records if r["type"] == "inference"][
        :3
    ]
    other_window = {**window, "gross_j": window["gross_j"] + 1.0, "rails": {"cpu": 1.5}}
    counts = writer.write([*changed, other_window, window])
    assert (counts.inserted, counts.duplicates) == (0, 1)
    assert [r.index for r in counts.refused] == [0, 1, 2, 3]
    assert "conflicts with the stored inference row" in counts.refused[0].reason
    assert "prediction differs" in counts.refused[0].reason
    assert "energy_window" in counts.refused[3].reason
    engine.dispose()


def test_a_device_cannot_write_into_another_devices_run(db_url: str) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    writer.write(full_run("victim-run", "victim", 5))
    forged = [
        run_record("victim-run", "attacker", policy="forged"),
        run_end_record("victim-run", "attacker", 999, 1.0),
        *inference_records("victim-run", "attacker", 3, start_seq=100),
    ]
    counts = writer.write(forged, rejected=[])
    assert counts.inserted == 0 and counts.run_records == 0 and len(counts.refused) == 5
    assert all("belongs to device 'victim'" in r.reason for r in counts.refused)
    with Session(engine) as session:
        run = session.get(Run, "victim-run")
        assert run is not None and run.device_id == "victim" and run.policy != "forged" and run.samples == 5
    engine.dispose()


def test_rows_before_their_run_record_are_kept_and_completed(db_url: str) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    writer.write(inference_records("late-run", "dev-b", 5))
    with Session(engine) as session:
        stub = session.get(Run, "late-run")
        assert stub is not None and stub.policy is None and stub.device_id == "dev-b"
    writer.write(
        [run_record("late-run", "dev-b", policy="hi-threshold"), run_end_record("late-run", "dev-b", 5, 9.5)]
    )
    with Session(engine) as session:
        run = session.get(Run, "late-run")
        assert run is not None
        assert (run.policy, run.policy_params, run.host["cores"], run.ended_unix, run.samples) == (
            "hi-threshold",
            {"tau": 0.31},
            2,
            9.5,
            5,
        )
        device = session.get(Device, "dev-b")
        assert device is not None and device.profile == "x86"
        window = session.scalars(select(Inference).where(Inference.run_id == "late-run")).first()
        assert window is not None and window.exit_stage in ("main", "extension", "cloud", "fallback", "shed")
    engine.dispose()


def test_orm_reads_back_every_inference_field(db_url: str) -> None:
    engine = open_database(db_url)
    records = full_run("run-c", "dev-c", 40)
    RecordWriter(engine).write(records)
    sent = {r["seq"]: r for r in records if r["type"] == "inference"}
    with Session(engine) as session:
        rows = session.scalars(select(Inference).order_by(Inference.seq)).all()
        assert len(rows) == 40
        for row in rows:
            record = sent[row.seq]
            for name in record:
                if name != "type":
                    assert getattr(row, name) == record[name], name
        window = session.scalars(select(EnergyWindow).order_by(EnergyWindow.window_seq)).first()
        assert window is not None and window.rails == {"package-0": 0.32}
    engine.dispose()


def test_exit_stage_is_checked_by_the_database(db_url: str) -> None:
    engine = open_database(db_url)
    RecordWriter(engine).write(inference_records("run-d", "dev-d", 1))
    with pytest.raises(IntegrityError), engine.begin() as connection:
        connection.execute(
            text(
                "INSERT INTO inferences (run_id, device_id, seq, prediction, exit_stage, edge_ms, bytes_up, "
                "bytes_down, energy_source, ts_unix) "
                "VALUES ('run-d', 'dev-d', 99, 1, 'teleport', 1.0, 0, 0, 'x', 0)"
            )
        )
    engine.dispose()


def test_every_record_field_has_its_column_and_every_column_its_field() -> None:
    """protocol/records.py declares each record kind once; the result tables must hold exactly those fields
    (and the migrations match the models: test_empty_database_migrates_to_head_matching_the_models)."""
    from protocol.records import RECORD_FIELDS
    from results_db.ingest import DATA_TABLES, RUN_FIELDS

    for kind, table in DATA_TABLES.items():
        columns = [c.name for c in table.columns if c.name != "id"]
        assert sorted(columns) == sorted(RECORD_FIELDS[kind]), kind
        nullable = {c.name for c in table.columns if c.nullable}
        assert nullable == {f for f, types in RECORD_FIELDS[kind].items() if type(None) in types}, kind
    run_columns = {c.name for c in Run.__table__.columns}
    assert set(RECORD_FIELDS["run"]) - {"run_id"} == set(RUN_FIELDS) and set(RUN_FIELDS) <= run_columns
    assert set(RECORD_FIELDS["run_end"]) <= run_columns | {"ended_unix", "samples"}


def test_an_unusable_database_is_refused_with_no_connection_left_open(db_url: str, monkeypatch) -> None:
    """open_database used to raise DatabaseUnusable with the engine's pooled connection still open."""
    from results_db import database

    engines = []

    def recording_engine(*args, **kwargs):
        engines.append(real_create(*args, **kwargs))
        return engines[-1]

    real_create = database.create_db_engine
    monkeypatch.setattr(database, "create_db_engine", recording_engine)
    other = database.create_db_engine(db_url)
    with other.begin() as connection:  # another application's table
        connection.exec_driver_sql("CREATE TABLE invoices (id INTEGER PRIMARY KEY)")
    other.dispose()
    with pytest.raises(DatabaseUnusable, match="another application"):
        open_database(db_url)
    assert engines[-1].pool.checkedin() == 0
    with engines[-1].begin() as connection:  # ours after all, at a revision from the future
        connection.exec_driver_sql("DROP TABLE invoices")
        connection.exec_driver_sql("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        connection.exec_driver_sql("INSERT INTO alembic_version VALUES ('9999')")
    engines[-1].dispose()
    with pytest.raises(DatabaseUnusable, match="'9999', which this version does not know"):
        open_database(db_url)
    assert engines[-1].pool.checkedin() == 0


def test_a_locked_database_is_a_passing_fault_a_missing_table_is_not(tmp_path) -> None:
    """The collector retries what `is_transient` calls passing; it used to retry "no such table" forever."""
    import sqlite3

    from sqlalchemy.exc import InterfaceError, OperationalError

    from results_db.database import is_transient

    path = tmp_path / "results.db"
    engine = open_database(path)
    with pytest.raises(OperationalError) as missing, engine.connect() as connection:
        connection.exec_driver_sql("SELECT * FROM no_such_table")
    assert not is_transient(missing.value)
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(sqlite3.OperationalError, match="locked") as locked:
            sqlite3.connect(path, timeout=0).execute("DELETE FROM runs")
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert is_transient(OperationalError("DELETE FROM runs", {}, locked.value))
    # PostgreSQL's OperationalErrors are connection and resource faults (its schema faults are
    # ProgrammingError); SQLite's InterfaceError is a value it cannot bind, no lost connection.
    assert is_transient(OperationalError("INSERT", {}, Exception("server closed the connection")))
    assert is_transient(InterfaceError("INSERT", {}, Exception("connection already closed")))
    assert not is_transient(InterfaceError("INSERT", {}, sqlite3.InterfaceError("Error binding parameter")))
    # Neither passing nor a row's fault: the collector stops rather than refusing records over it. SQLite
    # says so as OperationalError, PostgreSQL ("relation does not exist") as ProgrammingError.
    from sqlalchemy.exc import ProgrammingError

    from results_db.database import is_schema_fault

    assert is_schema_fault(missing.value)
    assert is_schema_fault(ProgrammingError("INSERT", {}, Exception('relation "inferences" does not exist')))
    assert not is_schema_fault(OperationalError("DELETE FROM runs", {}, locked.value))
    assert not is_schema_fault(IntegrityError("INSERT", {}, Exception("CHECK constraint failed")))
    engine.dispose()
