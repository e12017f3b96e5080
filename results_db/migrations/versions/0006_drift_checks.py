"""drift_checks and drift_timeline: the devices' drift tests, and drift per device over time.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-03

`drift_checks` holds one row per test of a device's drift monitor (the `drift` record, `device_agent.drift`):
the window's last sample, the most significant feature's KS statistic and p-value, the per-test level and
the verdict. The view `drift_timeline` puts them in order per device and run, with the run's policy, the
alarms so far and `onset` = 1 where a run of drift begins (the test before it was clean, or there was none).
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None

_ORDER = "PARTITION BY d.device_id, d.run_id ORDER BY d.seq"
DRIFT_TIMELINE = f"""
SELECT d.device_id, d.run_id, r.policy, d.seq, d.ts_unix, d.samples, d.window_size, d.statistic, d.feature,
       d.p_value, d.level, d.drift,
       SUM(d.drift) OVER ({_ORDER} ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS alarms_so_far,
       CASE WHEN d.drift = 1 AND COALESCE(LAG(d.drift) OVER ({_ORDER}), 0) = 0 THEN 1 ELSE 0 END AS onset
FROM drift_checks d LEFT JOIN runs r ON r.run_id = d.run_id
"""


def upgrade() -> None:
    op.create_table(
        "drift_checks",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("samples", sa.BigInteger(), nullable=False),
        sa.Column("window_size", sa.Integer(), nullable=False),
        sa.Column("statistic", sa.Double(), nullable=False),
        sa.Column("feature", sa.String(length=32), nullable=False),
        sa.Column("p_value", sa.Double(), nullable=False),
        sa.Column("level", sa.Double(), nullable=False),
        sa.Column("drift", sa.Integer(), nullable=False),
        sa.Column("ts_unix", sa.Double(), nullable=False),
        sa.CheckConstraint("drift IN (0, 1)", name=op.f("ck_drift_checks_drift")),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_drift_checks_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_drift_checks_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_drift_checks")),
        sa.UniqueConstraint("run_id", "device_id", "seq", name=op.f("uq_drift_checks_run_id_device_id_seq")),
    )
    op.create_index(
        op.f("ix_drift_checks_device_id_ts_unix"), "drift_checks", ["device_id", "ts_unix"], unique=False
    )
    op.execute(f"CREATE VIEW drift_timeline AS {DRIFT_TIMELINE}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS drift_timeline")
    op.drop_index(op.f("ix_drift_checks_device_id_ts_unix"), table_name="drift_checks")
    op.drop_table("drift_checks")
