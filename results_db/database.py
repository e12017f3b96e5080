"""Open the results database: SQLite file by default, PostgreSQL by URL; migrate to head with Alembic."""

from __future__ import annotations

import logging
import os
import sqlite3
from pathlib import Path
from typing import Any, Optional, Union

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import Engine, create_engine, event, inspect
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import (
    ArgumentError,
    DBAPIError,
    InterfaceError,
    NoSuchModuleError,
    OperationalError,
    ProgrammingError,
    SQLAlchemyError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

logger = logging.getLogger(__name__)

ENV_URL = "EDGECASCADE_DB_URL"
DEFAULT_PATH = Path("results/bench.db")
MIGRATIONS = Path(__file__).resolve().parent / "migrations"
SQLITE_BUSY_TIMEOUT_MS = 30_000
BACKENDS = ("sqlite", "postgresql")


class DatabaseUnusable(RuntimeError):
    """A results database that cannot be opened or is not ours; the message says which and why (one line)."""


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
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise DatabaseUnusable(f"not a database URL: {text!r} ({exc})") from None
    if url.drivername in ("postgresql", "postgres"):
        url = url.set(drivername="postgresql+psycopg")
    if url.get_backend_name() not in BACKENDS:
        raise DatabaseUnusable(
            f"unsupported database {url.get_backend_name()!r} in {url.render_as_string(hide_password=True)}: "
            "use a SQLite file path or postgresql://user@host/db"
        )
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
    `$EDGECASCADE_DB_URL` or `results/bench.db`. DatabaseUnusable, with the reason in one line, for a server
    that does not answer, a file that is not a database (or a directory), or another application's database.
    """
    url = resolve_url(url_or_path)
    shown = url.render_as_string(hide_password=True)
    if url.get_backend_name() == "sqlite" and url.database and Path(url.database).is_dir():
        raise DatabaseUnusable(f"{url.database} is a directory, not a SQLite database file")
    try:
        engine = create_db_engine(url, **engine_kwargs)
        try:
            _migrate_to_head(engine, shown)
        except BaseException:  # refused or failed: no pooled connection stays open
            engine.dispose()
            raise
    except (NoSuchModuleError, ArgumentError) as exc:
        raise DatabaseUnusable(f"cannot use {shown}: {exc}") from None
    except SQLAlchemyError as exc:
        cause = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
        raise DatabaseUnusable(f"cannot open the results database {shown}: {cause}") from None
    return engine


def _migrate_to_head(engine: Engine, shown: str) -> None:
    """Refuse another application's database or an unknown revision; migrate ours to head."""
    current = current_revision(engine)
    head = head_revision()
    if current is None:
        with engine.connect() as connection:
            tables = set(inspect(connection).get_table_names()) - {"alembic_version"}
        if tables:  # a database of someone else's: never write our tables into it
            raise DatabaseUnusable(
                f"{shown} holds tables of another application ({', '.join(sorted(tables)[:5])}) and no "
                "edgecascade schema: give an empty or an edgecascade database"
            )
    elif current not in _known_revisions():
        raise DatabaseUnusable(f"{shown} is at schema revision {current!r}, which this version does not know")
    if current != head:
        logger.info("migrating %s to schema %s", shown, head)
        upgrade(engine)


def _known_revisions() -> set:
    return {rev.revision for rev in ScriptDirectory.from_config(alembic_config()).walk_revisions()}


# SQLite's primary result codes of faults that pass: another writer holds the lock, memory, I/O, a full
# disk, a file that cannot be opened right now. Everything else it raises as OperationalError (no such
# table or column, a syntax error) is the schema's fault and stays until someone fixes it.
_SQLITE_PASSING = {
    5,  # SQLITE_BUSY
    6,  # SQLITE_LOCKED
    7,  # SQLITE_NOMEM
    10,  # SQLITE_IOERR
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL
}
_SQLITE_PASSING_WORDS = ("locked", "busy", "unable to open", "disk i/o", "disk is full", "out of memory")


def is_transient(exc: BaseException) -> bool:
    """Database unavailable or locked, connection lost, pool exhausted: a fault that passes (retry it).

    Not transient: SQLite's schema faults ("no such table"), which sqlite3 also raises as OperationalError,
    and its InterfaceError (a value it cannot bind: SQLite has no connection to lose). PostgreSQL raises
    schema faults as ProgrammingError, so each of its OperationalErrors (connection, server shutting down,
    out of resources, lock or statement timeout) is transient."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if isinstance(exc, (OperationalError, InterfaceError)):
        orig = exc.orig
        if isinstance(orig, sqlite3.Error):
            return isinstance(orig, sqlite3.OperationalError) and _sqlite_passing(orig)
        return True
    return isinstance(exc, DBAPIError) and exc.connection_invalidated


def is_schema_fault(exc: BaseException) -> bool:
    """A fault of the database itself that stays until someone fixes it (a missing table or column): no
    row's fault, so no record may be refused over it. SQLite raises it as OperationalError, PostgreSQL as
    ProgrammingError."""
    return isinstance(exc, (OperationalError, ProgrammingError)) and not is_transient(exc)


def _sqlite_passing(error: sqlite3.OperationalError) -> bool:
    code = getattr(error, "sqlite_errorcode", None)  # Python >= 3.11
    if code is not None:
        return (code & 0xFF) in _SQLITE_PASSING  # extended codes carry the primary one in the low byte
    text = str(error).lower()
    return any(word in text for word in _SQLITE_PASSING_WORDS)
