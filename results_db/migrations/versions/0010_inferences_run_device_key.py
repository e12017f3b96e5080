"""PostgreSQL: a row of `inferences` references its run by (run_id, device_id); a no-op on SQLite.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-03

Each inserted row fired two foreign-key triggers, one into `runs` and one into `devices`: 48 % of the
collector's INSERT ... SELECT of 5,000 rows (EXPLAIN ANALYZE, PostgreSQL 15). One key, (run_id, device_id)
referencing `runs (run_id, device_id)`, checks a row's device with its run in one probe (the statement
23 % shorter) and says more than the two did: the row's device is its run's device (the writer refuses
anything else, `results_db.ingest`, and `runs.device_id` references `devices`), so a row can no longer name
a device other than its run's. ON DELETE CASCADE from `runs` stays. `runs` gets the unique key the reference
needs (run_id alone is its primary key, so it holds already).

On SQLite the two keys stay (a new key there means rebuilding the table, and SQLite's writer is not the one
at fleet rates); tests/test_results_db_schema.py names the difference, as it does for 0008's partitions.
The upgrade fails if a stored row's device is not its run's (none such is written by the collector).
"""

from __future__ import annotations

from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

RUN_DEVICE_KEY = "uq_runs_run_id_device_id"
ROW_RUN = "fk_inferences_run_id_device_id_runs"


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(f"ALTER TABLE runs ADD CONSTRAINT {RUN_DEVICE_KEY} UNIQUE (run_id, device_id)")
    op.execute(
        "ALTER TABLE inferences DROP CONSTRAINT fk_inferences_run_id_runs, "
        "DROP CONSTRAINT fk_inferences_device_id_devices, "
        f"ADD CONSTRAINT {ROW_RUN} FOREIGN KEY (run_id, device_id) REFERENCES runs (run_id, device_id) "
        "ON DELETE CASCADE"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        f"ALTER TABLE inferences DROP CONSTRAINT {ROW_RUN}, "
        "ADD CONSTRAINT fk_inferences_run_id_runs FOREIGN KEY (run_id) REFERENCES runs (run_id) "
        "ON DELETE CASCADE, "
        "ADD CONSTRAINT fk_inferences_device_id_devices FOREIGN KEY (device_id) "
        "REFERENCES devices (device_id)"
    )
    op.execute(f"ALTER TABLE runs DROP CONSTRAINT {RUN_DEVICE_KEY}")
