"""Initial schema: runs, devices, inferences, energy_windows, idle_baselines, and the views.

Revision ID: 0001
Revises:
Create Date: 2026-11-27

The views are written once in SQL that SQLite (>= 3.25, window functions) and PostgreSQL run identically; they
are frozen here rather than imported, so that this migration keeps meaning what it meant when it shipped. A
later migration that changes a view drops and recreates it.

Definitions (per run):
- latency_ms of an inference = edge_ms + COALESCE(network_ms, 0) + COALESCE(cloud_ms, 0): edge compute, then,
  for offloaded samples, transport (network_ms, the round trip minus the cloud's own time) and cloud compute.
- percentiles are nearest-rank: p-th percentile = the value at rank ceil(p/100 * n) in ascending order,
  written as (p * n + 99) / 100 in integer arithmetic. It always returns a stored value, so both databases
  give bit-identical results (percentile_cont would interpolate, and SQLite has none).
- offload_fraction = (cloud + fallback) / samples: a fallback was offloaded but answered at the edge because
  the reply missed its deadline.
- device_j_*_per_inference = mean of the per-inference device joules (NULLs, i.e. unmetered, are skipped);
  cloud_j_per_inference = cloud joules summed over the run / all samples; cloud_j_per_offload = mean over the
  offloaded samples that report cloud joules.
- pareto_points: runs with an accuracy and a device gross J/inference; on_front = 1 when no run of the same
  dataset is at least as accurate for at most the energy and strictly better in one of them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

_LATENCY = "i.edge_ms + COALESCE(i.network_ms, 0) + COALESCE(i.cloud_ms, 0)"

INFERENCE_FACTS = f"""
SELECT i.id, i.run_id, i.device_id, i.seq, i.label, i.prediction, i.exit_stage,
       i.p_main, i.p_ext, i.p_cloud, i.edge_ms, i.network_ms, i.cloud_ms, i.bytes_up, i.bytes_down,
       i.device_j_gross, i.device_j_net, i.device_j_analytic, i.cloud_j, i.energy_source, i.ts_unix,
       r.policy, r.profile, r.dataset, r.split, r.model_sha256,
       {_LATENCY} AS latency_ms,
       CASE WHEN i.label IS NULL THEN NULL WHEN i.prediction = i.label THEN 1 ELSE 0 END AS correct,
       CASE WHEN i.exit_stage IN ('cloud', 'fallback') THEN 1 ELSE 0 END AS offloaded,
       i.bytes_up + i.bytes_down AS bytes_total
FROM inferences i JOIN runs r ON r.run_id = i.run_id
"""


def _pct(p: int) -> str:
    return f"MAX(CASE WHEN latency_rank = ({p} * run_samples + 99) / 100 THEN latency_ms END)"


def _frac(expr: str) -> str:
    return f"CAST({expr} AS DOUBLE PRECISION) / NULLIF(COUNT(*), 0)"


def _stage(stage: str) -> str:
    return f"SUM(CASE WHEN exit_stage = '{stage}' THEN 1 ELSE 0 END)"


RUN_SUMMARY = f"""
WITH ranked AS (
    SELECT f.*,
           ROW_NUMBER() OVER (PARTITION BY f.run_id ORDER BY f.latency_ms) AS latency_rank,
           COUNT(*) OVER (PARTITION BY f.run_id) AS run_samples
    FROM inference_facts f
), agg AS (
    SELECT run_id,
           COUNT(*) AS samples,
           COUNT(correct) AS labelled,
           SUM(correct) AS correct,
           {_stage("main")} AS exit_main,
           {_stage("extension")} AS exit_extension,
           {_stage("cloud")} AS exit_cloud,
           {_stage("fallback")} AS exit_fallback,
           {_frac(_stage("main"))} AS frac_main,
           {_frac(_stage("extension"))} AS frac_extension,
           {_frac(_stage("cloud"))} AS frac_cloud,
           {_frac(_stage("fallback"))} AS frac_fallback,
           {_frac("SUM(offloaded)")} AS offload_fraction,
           AVG(device_j_gross) AS device_j_gross_per_inference,
           AVG(device_j_net) AS device_j_net_per_inference,
           AVG(device_j_analytic) AS device_j_analytic_per_inference,
           SUM(cloud_j) / COUNT(*) AS cloud_j_per_inference,
           AVG(cloud_j) AS cloud_j_per_offload,
           CASE WHEN COUNT(DISTINCT energy_source) = 1 THEN MIN(energy_source) ELSE 'mixed' END
               AS energy_source,
           AVG(latency_ms) AS latency_mean_ms,
           {_pct(50)} AS latency_p50_ms,
           {_pct(95)} AS latency_p95_ms,
           {_pct(99)} AS latency_p99_ms,
           MAX(latency_ms) AS latency_max_ms,
           AVG(CAST(bytes_up AS DOUBLE PRECISION)) AS bytes_up_per_inference,
           AVG(CAST(bytes_down AS DOUBLE PRECISION)) AS bytes_down_per_inference,
           AVG(CAST(bytes_total AS DOUBLE PRECISION)) AS bytes_per_inference,
           MIN(ts_unix) AS first_ts_unix,
           MAX(ts_unix) AS last_ts_unix
    FROM ranked
    GROUP BY run_id
)
SELECT r.run_id, r.device_id, r.policy, r.profile, r.dataset, r.split, r.model_sha256, r.code_revision,
       r.started_unix, r.ended_unix,
       COALESCE(a.samples, 0) AS samples, COALESCE(a.labelled, 0) AS labelled,
       COALESCE(a.correct, 0) AS correct,
       CAST(a.correct AS DOUBLE PRECISION) / NULLIF(a.labelled, 0) AS accuracy,
       a.exit_main, a.exit_extension, a.exit_cloud, a.exit_fallback,
       a.frac_main, a.frac_extension, a.frac_cloud, a.frac_fallback, a.offload_fraction,
       a.device_j_gross_per_inference, a.device_j_net_per_inference, a.device_j_analytic_per_inference,
       a.cloud_j_per_inference, a.cloud_j_per_offload, a.energy_source,
       a.latency_mean_ms, a.latency_p50_ms, a.latency_p95_ms, a.latency_p99_ms, a.latency_max_ms,
       a.bytes_up_per_inference, a.bytes_down_per_inference, a.bytes_per_inference,
       a.first_ts_unix, a.last_ts_unix
FROM runs r LEFT JOIN agg a ON a.run_id = r.run_id
"""

CLASS_ACCURACY = f"""
SELECT run_id, policy, label,
       COUNT(*) AS samples,
       SUM(correct) AS correct,
       {_frac("SUM(correct)")} AS accuracy,
       SUM(offloaded) AS offloaded,
       {_frac("SUM(offloaded)")} AS offload_fraction
FROM inference_facts
WHERE label IS NOT NULL
GROUP BY run_id, policy, label
"""

PARETO_POINTS = """
SELECT s.run_id, s.policy, s.dataset, s.device_id, s.profile, s.samples, s.accuracy,
       s.device_j_gross_per_inference, s.device_j_net_per_inference, s.offload_fraction,
       CASE WHEN EXISTS (
           SELECT 1 FROM run_summary o
           WHERE COALESCE(o.dataset, '') = COALESCE(s.dataset, '')
             AND o.accuracy IS NOT NULL AND o.device_j_gross_per_inference IS NOT NULL
             AND o.accuracy >= s.accuracy
             AND o.device_j_gross_per_inference <= s.device_j_gross_per_inference
             AND (o.accuracy > s.accuracy OR o.device_j_gross_per_inference < s.device_j_gross_per_inference)
       ) THEN 0 ELSE 1 END AS on_front
FROM run_summary s
WHERE s.accuracy IS NOT NULL AND s.device_j_gross_per_inference IS NOT NULL
"""

# (name, body) in dependency order: created in this order, dropped in reverse.
VIEWS = [
    ("inference_facts", INFERENCE_FACTS),
    ("run_summary", RUN_SUMMARY),
    ("class_accuracy", CLASS_ACCURACY),
    ("pareto_points", PARETO_POINTS),
]


def upgrade() -> None:
    op.create_table(
        "devices",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("profile", sa.String(length=64), nullable=True),
        sa.Column("host", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True),
        sa.Column("first_seen_unix", sa.Double(), nullable=False),
        sa.Column("last_seen_unix", sa.Double(), nullable=False),
        sa.PrimaryKeyConstraint("device_id", name=op.f("pk_devices")),
    )
    op.create_table(
        "runs",
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("policy", sa.String(length=64), nullable=True),
        sa.Column("policy_params", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True),
        sa.Column("profile", sa.String(length=64), nullable=True),
        sa.Column("dataset", sa.String(length=64), nullable=True),
        sa.Column("split", sa.String(length=32), nullable=True),
        sa.Column("model_sha256", sa.String(length=64), nullable=True),
        sa.Column("code_revision", sa.String(length=64), nullable=True),
        sa.Column("host", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=True),
        sa.Column("started_unix", sa.Double(), nullable=True),
        sa.Column("ended_unix", sa.Double(), nullable=True),
        sa.Column("samples", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["devices.device_id"], name=op.f("fk_runs_device_id_devices")),
        sa.PrimaryKeyConstraint("run_id", name=op.f("pk_runs")),
    )
    op.create_index(op.f("ix_runs_model_sha256"), "runs", ["model_sha256"])
    op.create_index(op.f("ix_runs_policy"), "runs", ["policy"])

    op.create_table(
        "energy_windows",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("window_seq", sa.BigInteger(), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("rails", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("start_unix", sa.Double(), nullable=False),
        sa.Column("end_unix", sa.Double(), nullable=False),
        sa.Column("samples", sa.Integer(), nullable=False),
        sa.Column("meter_samples", sa.Integer(), nullable=False),
        sa.Column("idle_w", sa.Double(), nullable=True),
        sa.Column("gross_j", sa.Double(), nullable=False),
        sa.Column("net_j", sa.Double(), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_energy_windows_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_energy_windows_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_energy_windows")),
        sa.UniqueConstraint(
            "run_id", "device_id", "window_seq", name=op.f("uq_energy_windows_run_id_device_id_window_seq")
        ),
    )
    op.create_table(
        "idle_baselines",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("source", sa.String(length=32), nullable=False),
        sa.Column("rails", sa.JSON().with_variant(postgresql.JSONB(), "postgresql"), nullable=False),
        sa.Column("duration_s", sa.Double(), nullable=False),
        sa.Column("idle_w", sa.Double(), nullable=False),
        sa.Column("measured_unix", sa.Double(), nullable=False),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_idle_baselines_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_idle_baselines_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_idle_baselines")),
        sa.UniqueConstraint(
            "run_id",
            "device_id",
            "source",
            "measured_unix",
            name=op.f("uq_idle_baselines_run_id_device_id_source_measured_unix"),
        ),
    )
    op.create_table(
        "inferences",
        sa.Column(
            "id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), autoincrement=True, nullable=False
        ),
        sa.Column("run_id", sa.String(length=128), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("label", sa.Integer(), nullable=True),
        sa.Column("prediction", sa.Integer(), nullable=False),
        sa.Column("exit_stage", sa.String(length=16), nullable=False),
        sa.Column("p_main", sa.Double(), nullable=True),
        sa.Column("p_ext", sa.Double(), nullable=True),
        sa.Column("p_cloud", sa.Double(), nullable=True),
        sa.Column("edge_ms", sa.Double(), nullable=False),
        sa.Column("network_ms", sa.Double(), nullable=True),
        sa.Column("cloud_ms", sa.Double(), nullable=True),
        sa.Column("bytes_up", sa.BigInteger(), nullable=False),
        sa.Column("bytes_down", sa.BigInteger(), nullable=False),
        sa.Column("device_j_gross", sa.Double(), nullable=True),
        sa.Column("device_j_net", sa.Double(), nullable=True),
        sa.Column("device_j_analytic", sa.Double(), nullable=True),
        sa.Column("cloud_j", sa.Double(), nullable=True),
        sa.Column("energy_source", sa.String(length=32), nullable=False),
        sa.Column("ts_unix", sa.Double(), nullable=False),
        sa.CheckConstraint(
            "exit_stage IN ('main', 'extension', 'cloud', 'fallback')", name=op.f("ck_inferences_exit_stage")
        ),
        sa.ForeignKeyConstraint(
            ["device_id"], ["devices.device_id"], name=op.f("fk_inferences_device_id_devices")
        ),
        sa.ForeignKeyConstraint(
            ["run_id"], ["runs.run_id"], name=op.f("fk_inferences_run_id_runs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inferences")),
        sa.UniqueConstraint("run_id", "device_id", "seq", name=op.f("uq_inferences_run_id_device_id_seq")),
    )
    op.create_index(op.f("ix_inferences_device_id_ts_unix"), "inferences", ["device_id", "ts_unix"])

    for name, body in VIEWS:
        op.execute(f"CREATE VIEW {name} AS {body}")


def downgrade() -> None:
    for name, _ in reversed(VIEWS):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    op.drop_index("ix_inferences_device_id_ts_unix", table_name="inferences")
    op.drop_table("inferences")
    op.drop_table("idle_baselines")
    op.drop_table("energy_windows")
    op.drop_index("ix_runs_policy", table_name="runs")
    op.drop_index("ix_runs_model_sha256", table_name="runs")
    op.drop_table("runs")
    op.drop_table("devices")
