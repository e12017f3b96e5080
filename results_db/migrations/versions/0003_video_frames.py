"""frames and video_runs: the REACT video task's per-frame outputs and per-run accuracy.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02

`frames` holds one row per video frame (the `frame` record, boxes as JSON); `video_runs` one row per
evaluated run (mAP@0.5 and mAP@0.5:0.95 from pycocotools against the run's ground truth), written by the
benchmark. The view `video_run_summary` joins them with the frames' rates, bytes, joules and cloud latency.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

# Nearest rank, as everywhere (results_db/stats.py): the value at rank ceil(p * n / 100).
VIDEO_RUN_SUMMARY = """
WITH answered AS (
    SELECT run_id, answer_ms,
           ROW_NUMBER() OVER (PARTITION BY run_id ORDER BY answer_ms) AS rank_in_run,
           COUNT(*) OVER (PARTITION BY run_id) AS answers
    FROM frames WHERE answer_ms IS NOT NULL
), latency AS (
    SELECT run_id,
           MAX(CASE WHEN rank_in_run = (50 * answers + 99) / 100 THEN answer_ms END) AS cloud_latency_p50_ms
    FROM answered GROUP BY run_id
), agg AS (
    SELECT run_id, device_id, COUNT(*) AS frames,
           (MAX(ts_unix) - MIN(ts_unix)) AS seconds,
           AVG(edge_ms) AS edge_ms_mean,
           AVG(device_j_gross) AS device_j_per_frame,
           AVG(device_j_analytic) AS device_j_analytic_per_frame,
           CAST(SUM(bytes_up + bytes_down) AS DOUBLE PRECISION) / COUNT(*) AS bytes_per_frame,
           CAST(SUM(sent) AS DOUBLE PRECISION) / COUNT(*) AS sent_fraction
    FROM frames GROUP BY run_id, device_id
)
SELECT a.run_id, a.device_id, v.method, v.detect_every, v.cloud_every, v.delay_ms, a.frames,
       CASE WHEN a.seconds > 0 THEN (a.frames - 1) / a.seconds END AS fps,
       v.map50, v.map, a.edge_ms_mean, a.device_j_per_frame, a.device_j_analytic_per_frame,
       a.bytes_per_frame, a.sent_fraction, l.cloud_latency_p50_ms
FROM agg a LEFT JOIN video_runs v ON v.run_id = a.run_id LEFT JOIN latency l ON l.run_id = a.run_id
"""


def upgrade() -> None:
    op.create_table(
        "frames",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("sequence", sa.Integer(), nullable=False),
        sa.Column("frame", sa.Integer(), nullable=False),
        sa.Column("source", sa.String(length=16), nullable=False),
        sa.Column("boxes", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("edge_ms", sa.Double(), nullable=False),
        sa.Column("sent", sa.Integer(), nullable=False),
        sa.Column("bytes_up", sa.BigInteger(), nullable=False),
        sa.Column("bytes_down", sa.BigInteger(), nullable=False),
        sa.Column("answer_frame", sa.Integer(), nullable=True),
        sa.Column("answer_ms", sa.Double(), nullable=True),
        sa.Column("cloud_ms", sa.Double(), nullable=True),
        sa.Column("device_j_gross", sa.Double(), nullable=True),
        sa.Column("device_j_net", sa.Double(), nullable=True),
        sa.Column("device_j_analytic", sa.Double(), nullable=True),
        sa.Column("energy_source", sa.String(length=32), nullable=False),
        sa.Column("ts_unix", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "source IN ('edge', 'tracked', 'fused', 'cloud', 'none')", name=op.f("ck_frames_source")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_frames_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_frames_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_frames")),
        sa.UniqueConstraint("run_id", "device_id", "seq", name=op.f("uq_frames_run_id_device_id_seq")),
    )
    op.create_table(
        "video_runs",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("method", sa.String(length=32), nullable=False),
        sa.Column("detect_every", sa.Integer(), nullable=True),
        sa.Column("cloud_every", sa.Integer(), nullable=True),
        sa.Column("delay_ms", sa.Double(), nullable=False),
        sa.Column("frames", sa.Integer(), nullable=False),
        sa.Column("images_evaluated", sa.Integer(), nullable=False),
        sa.Column("map50", sa.Double(), nullable=False),
        sa.Column("map", sa.Double(), nullable=False),
        sa.Column("ground_truth", sa.Text(), nullable=False),
        sa.Column("evaluated_unix", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_video_runs_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_video_runs")),
    )
    op.execute(f"CREATE VIEW video_run_summary AS {VIDEO_RUN_SUMMARY}")


def downgrade() -> None:
    op.execute("DROP VIEW IF EXISTS video_run_summary")
    op.drop_table("video_runs")
    op.drop_table("frames")
