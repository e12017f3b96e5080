"""bench.results_sql: the fleet benchmarks' accounting queries, on a SQLite file and a PostgreSQL URL."""

from __future__ import annotations

from bench.results_sql import query
from results_db import RecordWriter, open_database
from results_db.synthetic import inference_records, run_record


def test_the_same_query_reads_a_sqlite_file_and_a_postgresql_url(db_url: str) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    for run in ("fleet1-sim-000", "fleet1-sim-001", "other-sim-000"):
        writer.write([run_record(run, run[-7:])] + inference_records(run, run[-7:], 3))
    engine.dispose()
    rows = query(
        db_url,
        "SELECT run_id, COUNT(*) FROM inferences WHERE run_id LIKE ? AND seq IN (?, ?) GROUP BY run_id "
        "ORDER BY run_id",
        ("fleet1-%", 0, 2),
    )
    assert rows == [("fleet1-sim-000", 2), ("fleet1-sim-001", 2)]
