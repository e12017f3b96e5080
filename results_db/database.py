"""Open the results database: SQLite file by default, PostgreSQL by URL; migrate to head with Alembic."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional, Union

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import URL, make_url

logger = logging.getLogger(__name__)

ENV_URL = "EDGECASCADE_DB_URL"
DEFAULT_PATH = Path("results/bench.db")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000


def resolve_url(url_or_path: Union[str, Path, URL, None] = None) -> URL:
    """A SQLAlchemy URL from an argument, `$EDGECASCADE_DB_URL`, or the default `results/bench.db`.

    Anything without `://` is a SQLite file path. `postgresql://` means psycopg 3 (`postgresql+psycopg://`).
    """
    if isinstance(url_or_path, URL):
        return url_or_path
    raw = url_or_path if url_or_path is not None else os.environ.get(ENV_URL) or DEFAULT_PATH
    text = str(raw)
    if "://" not in text:
        return URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    url = make_url(text)
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    return url


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # WAL lets the report read while the collector writes; NORMAL is durable across application crashes and
    # only risks the last transactions on power loss, which the broker re-delivers (we ack after commit).
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.execute("PRAGMA foreign_keys = ON")
    cursor.close()


def create_db_engine(url_or_path: Union[str, Path, URL, None] = None, **kwargs: Any) -> Engine:
    """An engine with the project's settings, without touching the schema (see `open_database`)."""
    url = resolve_url(url_or_path)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            Path(url.database).parent.mkdir(parents=True, exist_ok=True)
        kwargs.setdefault("connect_args", {}).setdefault("timeout", SQLITE_BUSY_TIMEOUT_MS / 1000)
        engine = create_engine(url, **kwargs)
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    kwargs.setdefault("pool_pre_ping", True)
    return create_engine(url, **kwargs)


def alembic_config() -> Config:
    """Alembic configuration pointing at the packaged migrations (no alembic.ini needed)."""
    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS))
    return cfg


def upgrade(engine: Engine, revision: str = "head") -> None:
    """Migrate the database behind `engine` to `revision`, in one transaction where the database allows."""
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.upgrade(cfg, revision)


def current_revision(engine: Engine) -> Optional[str]:
    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


def head_revision() -> Optional[str]:
    return ScriptDirectory.from_config(alembic_config()).get_current_head()


def open_database(url_or_path: Union[str, Path, URL, None] = None, **engine_kwargs: Any) -> Engine:
    """Engine for the results database, created or migrated to the newest schema.

    `url_or_path`: a SQLAlchemy URL (`postgresql+psycopg://user@host/db`), a SQLite file path, or None for
    `$EDGECASCADE_DB_URL` or `results/bench.db`.
    """
    engine = create_db_engine(url_or_path, **engine_kwargs)
    head = head_revision()
    if current_revision(engine) != head:
        logger.info("migrating %s to schema %s", engine.url.render_as_string(hide_password=True), head)
        upgrade(engine)
    return engine
