"""The gateway tier's own columns: `inferences.p_gateway`, `gateway_ms`, `gateway_j`.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

The fault-detection hierarchy (sensor → gateway → cloud) decides some samples at a gateway (0007's exit stage
`gateway`). Until now a row held the gateway's max-softmax in `p_ext` (the extension block's column) and the
gateway's compute inside `cloud_ms` (the remote tiers together); its joules were in no column. Now:

- `p_gateway`: the gateway model's max-softmax, where the sample reached a gateway;
- `gateway_ms`: the gateway's model time for the sample (its share of the batch's run; not the wait for the
  cloud), so `cloud_ms` is the cloud's alone and `network_ms` the rest of the round trip;
- `gateway_j`: the gateway's joules for the sample (the fault gateway computes them from the model card:
  analytic, like `device_j_analytic`).

NULL where no gateway was involved (every classification row). `inference_facts` shows them and its
`latency_ms` adds `gateway_ms` (unchanged for rows without one). The views are dropped and created again
around the change (PostgreSQL: `run_summary` selects `inference_facts.*`), from 0007's definitions with the
additions above. On PostgreSQL the partitioned table (0008) takes the columns into every partition.
"""

from __future__ import annotations

import importlib
from typing import Callable

import sqlalchemy as sa
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

_v0005 = importlib.import_module("results_db.migrations.versions.0005_exit_stage_shed")
_v0007 = importlib.import_module("results_db.migrations.versions.0007_model_version_gateway")

COLUMNS = ("p_gateway", "gateway_ms", "gateway_j")
_LATENCY = "i.edge_ms + COALESCE(i.network_ms, 0) + COALESCE(i.gateway_ms, 0) + COALESCE(i.cloud_ms, 0)"
INFERENCE_FACTS = _v0007.INFERENCE_FACTS.replace(
    "i.ts_unix, i.model_version,", "i.ts_unix, i.model_version, i.p_gateway, i.gateway_ms, i.gateway_j,"
).replace(_v0005._LATENCY, _LATENCY)
assert INFERENCE_FACTS.count("i.gateway_ms") == 2, "0007's inference_facts is not what this migration edits"


def _recreate_views(inference_facts: str, change: Callable[[], None]) -> None:
    for name in reversed(_v0005.VIEW_NAMES):
        op.execute(f"DROP VIEW IF EXISTS {name}")
    change()
    views = _v0007._views(inference_facts, _v0007.RUN_SUMMARY)
    for name in _v0005.VIEW_NAMES:
        op.execute(f"CREATE VIEW {name} AS {views[name]}")


def upgrade() -> None:
    def add() -> None:
        for name in COLUMNS:  # ALTER TABLE ADD COLUMN on both: no table rebuild on SQLite
            op.add_column("inferences", sa.Column(name, sa.Double(), nullable=True))

    _recreate_views(INFERENCE_FACTS, add)


def downgrade() -> None:
    def drop() -> None:
        with op.batch_alter_table("inferences") as batch:  # SQLite: a rebuild; PostgreSQL: DROP COLUMN
            for name in COLUMNS:
                batch.drop_column(name)

    _recreate_views(_v0007.INFERENCE_FACTS, drop)
