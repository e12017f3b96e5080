"""Rows of one query on a benchmark's results database: a SQLite file path or a database URL (PostgreSQL).

The fleet benchmarks account for their rows in SQL (`bench.accounting`); with `--postgres` or `--db URL`
the collector writes PostgreSQL instead of `fleet.db`, and the same queries read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, List, Sequence, Tuple, Union

from sqlalchemy import create_engine

from results_db.database import resolve_url


def query(db: Union[str, Path], sql: str, params: Sequence[Any] = ()) -> List[Tuple[Any, ...]]:
    """The rows of `sql`, written with qmark placeholders (`?`, as sqlite3 takes them), on `db`."""
    url = resolve_url(db)
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            if engine.dialect.paramstyle != "qmark":  # psycopg: %s (no literal % in these queries)
                sql = sql.replace("?", "%s")
            return [tuple(row) for row in connection.exec_driver_sql(sql, tuple(params))]
    finally:
        engine.dispose()
