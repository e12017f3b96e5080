"""Migration 0009: the gateway tier's columns (p_gateway, gateway_ms, gateway_j) on SQLite and PostgreSQL
(partitioned by 0008): written by today's writer, shown by inference_facts (whose latency adds gateway_ms),
dropped by the downgrade with every row kept, NULL after upgrading again."""

from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import text

from results_db.database import alembic_config, current_revision, head_revision, open_database
from results_db.ingest import RecordWriter
from results_db.synthetic import full_run


def test_0009_holds_the_gateways_figures_and_goes_back_to_0008(db_url: str) -> None:
    engine = open_database(db_url)
    records = full_run("run-gw", "dev-gw", 8)
    inferences = [r for r in records if r["type"] == "inference"]
    for r in inferences[:3]:
        r.update(exit_stage="gateway", p_gateway=0.75, gateway_ms=2.5, gateway_j=4.5e-5, network_ms=1.0)
        r.update(cloud_ms=None)
    RecordWriter(engine).write(records)
    with engine.connect() as connection:
        facts = connection.execute(
            text(
                "SELECT seq, p_gateway, gateway_ms, gateway_j, latency_ms, edge_ms FROM inference_facts "
                "WHERE run_id = 'run-gw' ORDER BY seq"
            )
        ).all()
    assert [(f.p_gateway, f.gateway_ms, f.gateway_j) for f in facts[:3]] == [(0.75, 2.5, 4.5e-5)] * 3
    assert all(f.p_gateway is None and f.gateway_ms is None for f in facts[3:])
    assert [f.latency_ms for f in facts[:3]] == pytest.approx([f.edge_ms + 1.0 + 2.5 for f in facts[:3]])
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0008")
    with engine.connect() as connection:
        columns = list(connection.execute(text("SELECT * FROM inferences")).keys())
        facts = list(connection.execute(text("SELECT * FROM inference_facts")).keys())
        assert connection.execute(text("SELECT COUNT(*) FROM inferences")).scalar() == 8
    assert not {"p_gateway", "gateway_ms", "gateway_j"} & (set(columns) | set(facts))
    engine.dispose()
    engine = open_database(db_url)  # to head again
    assert current_revision(engine) == head_revision()
    with engine.connect() as connection:
        rows = connection.execute(text("SELECT gateway_ms FROM inferences ORDER BY seq")).all()
    assert [r.gateway_ms for r in rows] == [None] * 8
    engine.dispose()
