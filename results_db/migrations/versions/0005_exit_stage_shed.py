"""Exit stage `shed`: an offload the device kept at the edge because it would have come back too late.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02

Capacity-aware devices (`device_agent.capacity`) answer such a sample with the edge's answer and say so:
`inferences.exit_stage` may now be `shed`. Its CHECK constraint is widened (on SQLite by rebuilding the table,
Alembic's batch mode). `run_summary` counts the new stage (`exit_shed`, `frac_shed`, beside fallback); a
shed sample is not offloaded (no bytes left the device), so `offload_fraction` is unchanged in meaning.

SQLite checks every view when a table is renamed, and the rebuild renames `inferences`: all four views of 0001
are dropped first and created again after, from the definitions frozen below (0001's, with run_summary's new
columns). The downgrade refuses while shed rows exist: narrowing the constraint would have to drop them.
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

STAGES_0004 = ("main", "extension", "cloud", "fallback")
STAGES = (*STAGES_0004, "shed")

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
           {_stage("shed")} AS exit_shed,
           {_frac(_stage("main"))} AS frac_main,
           {_frac(_stage("extension"))} AS frac_extension,
           {_frac(_stage("cloud"))} AS frac_cloud,
           {_frac(_stage("fallback"))} AS frac_fallback,
           {_frac(_stage("shed"))} AS frac_shed,
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
       a.exit_main, a.exit_extension, a.exit_cloud, a.exit_fallback, a.exit_shed,
       a.frac_main, a.frac_extension, a.frac_cloud, a.frac_fallback, a.frac_shed, a.offload_fraction,
       a.device_j_gross_per_inference, a.device_j_net_per_inference, a.device_j_analytic_per_inference,
       a.cloud_j_per_inference, a.cloud_j_per_offload, a.energy_source,
       a.latency_mean_ms, a.latency_p50_ms, a.latency_p95_ms, a.latency_p99_ms, a.latency_max_ms,
       a.bytes_up_per_inference, a.bytes_down_per_inference, a.bytes_per_inference,
       a.first_ts_unix, a.last_ts_unix
FROM runs r LEFT JOIN agg a ON a.run_id = r.run_id
"""

# 0001's run_summary, for the downgrade.
RUN_SUMMARY_0004 = (
    RUN_SUMMARY.replace(f"           {_stage('shed')} AS exit_shed,\n", "")
    .replace(f"           {_frac(_stage('shed'))} AS frac_shed,\n", "")
    .replace("a.exit_fallback, a.exit_shed,", "a.exit_fallback,")
    .replace("a.frac_fallback, a.frac_shed,", "a.frac_fallback,")
)

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

VIEW_NAMES = ("inference_facts", "run_summary", "class_accuracy", "pareto_points")  # dependency order


def _recreate(stages: tuple, run_summary: str) -> None:
    for name in reversed(VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    allowed = ", ".join(f"'{s}'" for s in stages)
    with op.batch_alter_table("inferences") as batch:
        batch.drop_constraint(op.f("ck_inferences_exit_stage"), type_="check")
        batch.create_check_constraint(op.f("ck_inferences_exit_stage"), f"exit_stage IN ({allowed})")
    bodies = {
        "inference_facts": INFERENCE_FACTS,
        "run_summary": run_summary,
        "class_accuracy": CLASS_ACCURACY,
        "pareto_points": PARETO_POINTS,
    }
    for name in VIEW_NAMES:
        op.execute(f"CREATE VIEW {name} AS {bodies[name]}")


def upgrade() -> None:
    _recreate(STAGES, RUN_SUMMARY)


def downgrade() -> None:
    shed = (
        op.get_bind().execute(sa.text("SELECT COUNT(*) FROM inferences WHERE exit_stage = 'shed'")).scalar()
    )
    if shed:
        raise RuntimeError(
            f"{shed} inference rows have exit stage 'shed', which revision 0004 cannot hold: "
            "delete them (or keep this revision) before downgrading"
        )
    _recreate(STAGES_0004, RUN_SUMMARY_0004)
