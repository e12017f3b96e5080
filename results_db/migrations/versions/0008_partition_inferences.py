"""`inferences` partitioned by day on PostgreSQL (RANGE on ts_unix); a no-op on SQLite.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03

A fleet writes millions of rows a day; retention must drop whole days, not DELETE row by row (which leaves
the table and its indexes as large as before and costs as much as the inserts did). So on PostgreSQL the
table becomes `PARTITION BY RANGE (ts_unix)`, one partition per UTC day (`results_db.partitions`: the
writer creates them ahead, `edgecascade db retention` drops them) and a default partition for rows of a day
without one.

A partitioned table's unique constraints must include the partition key: the primary key becomes
(id, ts_unix) and the natural key's constraint (run_id, device_id, seq, ts_unix). That alone would let a
record of a stored key with another ts_unix in as a second row: the writer therefore inserts only keys not
stored yet, in any partition (`results_db.ingest`), and compares the rest, as before.

Existing rows are copied into partitions of their days; ids keep their sequence. The views are dropped and
created again around the swap (they reference the table), from 0007's definitions. The downgrade copies the
rows back into one plain table.
"""

from __future__ import annotations

import importlib

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

_v0005 = importlib.import_module("results_db.migrations.versions.0005_exit_stage_shed")
_v0007 = importlib.import_module("results_db.migrations.versions.0007_model_version_gateway")
VIEWS = _v0007._views(_v0007.INFERENCE_FACTS, _v0007.RUN_SUMMARY)
OLD = "inferences_unpartitioned"
DAY_S = 86_400


def _swap(partitioned: bool) -> None:
    """Replace `inferences` with a partitioned (or plain) copy of itself, rows, ids and names kept."""
    for name in reversed(_v0005.VIEW_NAMES):
        op.execute(f"DROP VIEW {name}")
    op.execute(f"ALTER TABLE inferences RENAME TO {OLD}")
    # Index names live in the schema's namespace: move the old ones out of the way of the new.
    key = "run_id, device_id, seq, ts_unix" if partitioned else "run_id, device_id, seq"
    old_key = "run_id_device_id_seq" if partitioned else "run_id_device_id_seq_ts_unix"
    for index in ("pk_inferences", f"uq_inferences_{old_key}", "ix_inferences_device_id_ts_unix"):
        op.execute(f"ALTER INDEX {index} RENAME TO {index}_old")
    tail = " PARTITION BY RANGE (ts_unix)" if partitioned else ""
    op.execute(f"CREATE TABLE inferences (LIKE {OLD} INCLUDING DEFAULTS INCLUDING CONSTRAINTS){tail}")
    new_key = key.replace(", ", "_")
    op.execute(
        "ALTER TABLE inferences "
        f"ADD CONSTRAINT pk_inferences PRIMARY KEY ({'id, ts_unix' if partitioned else 'id'}), "
        f"ADD CONSTRAINT uq_inferences_{new_key} UNIQUE ({key}), "
        "ADD CONSTRAINT fk_inferences_run_id_runs FOREIGN KEY (run_id) REFERENCES runs (run_id) "
        "ON DELETE CASCADE, "
        "ADD CONSTRAINT fk_inferences_device_id_devices FOREIGN KEY (device_id) "
        "REFERENCES devices (device_id)"
    )
    op.execute("CREATE INDEX ix_inferences_device_id_ts_unix ON inferences (device_id, ts_unix)")
    if partitioned:
        # Rows of days without a partition of their own (results_db.partitions) land here.
        op.execute("CREATE TABLE inferences_default PARTITION OF inferences DEFAULT")
        days = op.get_bind().exec_driver_sql(f"SELECT DISTINCT floor(ts_unix / {DAY_S})::bigint FROM {OLD}")
        for (day,) in days.all():
            name = op.get_bind().exec_driver_sql(
                f"SELECT to_char(to_timestamp({day} * {DAY_S}) AT TIME ZONE 'UTC', 'YYYYMMDD')"
            )
            op.execute(
                f"CREATE TABLE inferences_p{name.scalar()} PARTITION OF inferences "
                f"FOR VALUES FROM ({day * DAY_S}) TO ({(day + 1) * DAY_S})"
            )
    op.execute(f"INSERT INTO inferences SELECT * FROM {OLD}")
    # The id sequence belongs to the old table's column: hand it over before that table goes.
    op.execute("ALTER SEQUENCE inferences_id_seq OWNED BY inferences.id")
    op.execute(f"DROP TABLE {OLD}")
    for name in _v0005.VIEW_NAMES:
        op.execute(f"CREATE VIEW {name} AS {VIEWS[name]}")


def upgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _swap(partitioned=True)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        _swap(partitioned=False)
