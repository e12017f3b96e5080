"""Per-row model version, and exit stage `gateway`.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03

- `inferences.model_version`: the version of the model a sample was answered with. A run's `model_sha256`
  no longer says it once models roll out while agents run (a hot swap lands between two samples of one run).
  NULL for rows written before, or by agents that do not report it. `inference_facts` shows it.
- exit stage `gateway`: the three-tier fault-detection hierarchy (sensor → gateway → cloud) ends some samples
  at a gateway near the sensor. Such a sample left the sensor, so it counts as offloaded; `run_summary` counts
  it (`exit_gateway`, `frac_gateway`).

As in 0005, the views are dropped and created again around the table rebuild (SQLite checks every view when
`inferences` is renamed), from the definitions frozen in 0005 with the additions above. The downgrade refuses
while gateway rows exist.
"""

from __future__ import annotations

import importlib

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_v0005 = importlib.import_module("results_db.migrations.versions.0005_exit_stage_shed")

STAGES_0006 = _v0005.STAGES
STAGES = (*STAGES_0006, "gateway")

_OFFLOADED_0006 = "CASE WHEN i.exit_stage IN ('cloud', 'fallback') THEN 1 ELSE 0 END AS offloaded"
INFERENCE_FACTS = _v0005.INFERENCE_FACTS.replace(
    "i.energy_source, i.ts_unix,", "i.energy_source, i.ts_unix, i.model_version,"
).replace(
    _OFFLOADED_0006,
    "CASE WHEN i.exit_stage IN ('cloud', 'fallback', 'gateway') THEN 1 ELSE 0 END AS offloaded",
)

_stage, _frac = _v0005._stage, _v0005._frac
RUN_SUMMARY = (
    _v0005.RUN_SUMMARY.replace(
        f"           {_stage('shed')} AS exit_shed,\n",
        f"           {_stage('shed')} AS exit_shed,\n           {_stage('gateway')} AS exit_gateway,\n",
    )
    .replace(
        f"           {_frac(_stage('shed'))} AS frac_shed,\n",
        f"           {_frac(_stage('shed'))} AS frac_shed,\n"
        f"           {_frac(_stage('gateway'))} AS frac_gateway,\n",
    )
    .replace("a.exit_fallback, a.exit_shed,", "a.exit_fallback, a.exit_shed, a.exit_gateway,")
    .replace("a.frac_fallback, a.frac_shed,", "a.frac_fallback, a.frac_shed, a.frac_gateway,")
)


def _views(inference_facts: str, run_summary: str) -> dict:
    return {
        "inference_facts": inference_facts,
        "run_summary": run_summary,
        "class_accuracy": _v0005.CLASS_ACCURACY,
        "pareto_points": _v0005.PARETO_POINTS,
    }


def _rebuild(stages: tuple, views: dict, add_column: bool) -> None:
    for name in reversed(_v0005.VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    allowed = ", ".join(f"'{s}'" for s in stages)
    with op.batch_alter_table("inferences") as batch:
        if add_column:
            batch.add_column(sa.Column("model_version", sa.String(length=64), nullable=True))
        else:
            batch.drop_column("model_version")
        batch.drop_constraint(op.f("ck_inferences_exit_stage"), type_="check")
        batch.create_check_constraint(op.f("ck_inferences_exit_stage"), f"exit_stage IN ({allowed})")
    for name in _v0005.VIEW_NAMES:
        op.execute(f"CREATE VIEW {name} AS {views[name]}")


def upgrade() -> None:
    _rebuild(STAGES, _views(INFERENCE_FACTS, RUN_SUMMARY), add_column=True)


def downgrade() -> None:
    count = "SELECT COUNT(*) FROM inferences WHERE exit_stage = 'gateway'"
    gateway = op.get_bind().execute(sa.text(count)).scalar()
    if gateway:
        raise RuntimeError(
            f"{gateway} inference rows have exit stage 'gateway', which revision 0006 cannot hold: "
            "delete them (or keep this revision) before downgrading"
        )
    _rebuild(STAGES_0006, _views(_v0005.INFERENCE_FACTS, _v0005.RUN_SUMMARY), add_column=False)
