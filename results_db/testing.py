"""Scratch databases for tests and benchmarks: a throw-away PostgreSQL database with one schema per test.

PostgreSQL comes from `$EDGECASCADE_TEST_PG_URL` (default: the local trust-auth server,
`postgresql+psycopg://postgres@127.0.0.1:5432/test`). A scratch database is created next to that one and
dropped (WITH (FORCE)) afterwards; each test gets a fresh schema in it, selected through libpq's
`options=-csearch_path=...`, so that Alembic, the views and the queries all run unqualified, as in production.
"""

from __future__ import annotations

import os
import uuid
from contextlib import contextmanager
from typing import Any, Iterator, Optional

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

PG_URL_ENV = "EDGECASCADE_TEST_PG_URL"
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def pg_test_url() -> URL:
    return make_url(os.environ.get(PG_URL_ENV, DEFAULT_PG_URL))


def postgres_unavailable_reason(url: Optional[URL] = None) -> Optional[str]:
    """None when PostgreSQL answers at `url`, else why not (for a pytest skip reason)."""
    url = url or pg_test_url()
    engine = create_engine(url, connect_args={"connect_timeout": 3})
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
    except SQLAlchemyError as exc:
        cause = getattr(exc, "orig", None) or exc
        return f"PostgreSQL unreachable at {url.render_as_string(hide_password=True)}: {cause}"
    finally:
        engine.dispose()
    return None


@contextmanager
def scratch_postgres_database(url: Optional[URL] = None) -> Iterator[URL]:
    """Create an empty database beside `url`'s, yield its URL, drop it afterwards."""
    url = url or pg_test_url()
    name = f"edgecascade_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.execute(text(f'CREATE DATABASE "{name}"'))
        yield url.set(database=name)
    finally:
        with admin.connect() as connection:
            connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
        admin.dispose()


def fresh_schema(database_url: URL) -> URL:
    """Create a new schema in the scratch database; return a URL whose connections use only it."""
    schema = f"s_{uuid.uuid4().hex[:12]}"
    engine = create_engine(database_url, isolation_level="AUTOCOMMIT")
    with engine.connect() as connection:
        connection.execute(text(f'CREATE SCHEMA "{schema}"'))
    engine.dispose()
    return database_url.update_query_dict({"options": f"-csearch_path={schema}"})


# -- pytest fixtures (import them into a test module; pytest is only needed when they are used) -----------
try:
    import pytest
except ModuleNotFoundError:  # pragma: no cover - production installs have no pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture(scope="module")
    def pg_database() -> Iterator[URL]:
        """A scratch PostgreSQL database for the module; skips with the reason when none is reachable."""
        reason = postgres_unavailable_reason()
        if reason:
            pytest.skip(reason)
        with scratch_postgres_database() as url:
            yield url

    @pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
    def db_url(request: pytest.FixtureRequest, tmp_path: Any) -> str:
        """An empty database URL: a SQLite file, or a fresh schema in the scratch PostgreSQL database."""
        if request.param == "sqlite":
            return str(tmp_path / "results.db")
        url = fresh_schema(request.getfixturevalue("pg_database"))
        return url.render_as_string(hide_password=False)

    @pytest.fixture
    def pg_url_factory(pg_database: URL) -> Any:
        """Call it for another empty PostgreSQL schema's URL (to compare dialects within one test)."""
        return lambda: fresh_schema(pg_database).render_as_string(hide_password=False)
