"""Scratch databases for tests and benchmarks: a private PostgreSQL server, one schema per test.

The test session starts its own PostgreSQL (`PrivatePostgres`: initdb into a temporary directory, a free
port on 127.0.0.1, trust authentication, fsync off) with the server binaries `make setup` installs, so no
test depends on a server that happens to be running. `$EDGECASCADE_TEST_PG_URL` points the tests at
another server instead. A scratch database is created there and dropped (WITH (FORCE)) afterwards; each
test gets a fresh schema in it, selected through libpq's `options=-csearch_path=...`, so that Alembic, the
views and the queries all run unqualified, as in production.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, List, Optional

from sqlalchemy import create_engine, text
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import SQLAlchemyError

PG_URL_ENV = "EDGECASCADE_TEST_PG_URL"


class PostgresUnavailable(RuntimeError):
    """No PostgreSQL server could be started (or reached): the message says why."""


class PrivatePostgres:
    """A PostgreSQL server of our own in a temporary directory, for one test session or benchmark."""

    def __init__(self) -> None:
        self.bindir = _pg_bindir()
        self.port = _free_port()
        self.root = Path(tempfile.mkdtemp(prefix="edgecascade-pg-"))
        self.data = self.root / "data"
        # initdb and postgres refuse to run as root: then the Debian package's `postgres` account runs them
        self._as: List[str] = []
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable(
                    "running as root and no `postgres` account to run the server"
                ) from None
            os.chown(self.root, user.pw_uid, user.pw_gid)
            self._as = ["runuser", "-u", "postgres", "--"]

    @property
    def url(self) -> URL:
        return make_url(f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/postgres")

    def _run(self, *args: str) -> None:
        result = subprocess.run([*self._as, *args], capture_output=True, text=True, timeout=120, check=False)
        if result.returncode != 0:
            raise PostgresUnavailable(
                f"{Path(args[0]).name} failed: {(result.stderr or result.stdout).strip()[-800:]}"
            )

    def start(self) -> PrivatePostgres:
        self._run(
            str(self.bindir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "--no-sync",
            "-E", "UTF8", "--locale", "C",
        )  # fmt: skip
        options = (
            f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200"
        )
        log = str(self.root / "log")
        self._run(
            str(self.bindir / "pg_ctl"),
            "-D",
            str(self.data),
            "-o",
            options,
            "-l",
            log,
            "-w",
            "-t",
            "60",
            "start",
        )
        return self

    @property
    def pid(self) -> int:
        """The postmaster's process id (its backends are its children), while it runs."""
        return int((self.data / "postmaster.pid").read_text().split()[0])

    def stop(self) -> None:
        if (self.data / "postmaster.pid").exists():
            self._run(str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.root, ignore_errors=True)


@contextmanager
def private_postgres_url() -> Iterator[str]:
    """A `PrivatePostgres` for a benchmark's results (`--postgres`): its URL, the server stopped after."""
    server = PrivatePostgres().start()
    try:
        yield server.url.render_as_string(hide_password=False)
    finally:
        server.stop()


def _pg_bindir() -> Path:
    found = shutil.which("pg_config")
    if found:
        out = subprocess.run([found, "--bindir"], capture_output=True, text=True, check=False).stdout.strip()
        if out and (Path(out) / "initdb").exists():
            return Path(out)
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=lambda p: int(p.split("/")[4]))
    if not candidates:
        raise PostgresUnavailable("no PostgreSQL server binaries (initdb): `make setup` installs postgresql")
    return Path(candidates[-1]).parent


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


_SESSION_SERVER: Optional[PrivatePostgres] = None


def pg_test_url() -> URL:
    """`$EDGECASCADE_TEST_PG_URL`, else this process's private server (started on first use)."""
    global _SESSION_SERVER
    if os.environ.get(PG_URL_ENV):
        return make_url(os.environ[PG_URL_ENV])
    if _SESSION_SERVER is None:
        _SESSION_SERVER = PrivatePostgres().start()
    return _SESSION_SERVER.url


def stop_session_server() -> None:
    global _SESSION_SERVER
    if _SESSION_SERVER is not None:
        _SESSION_SERVER.stop()
        _SESSION_SERVER = None


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

    @pytest.fixture(scope="session")
    def pg_server() -> Iterator[URL]:
        """The session's PostgreSQL (private unless $EDGECASCADE_TEST_PG_URL): a missing server is a
        failure, never a skip (the suite must not turn green with half of it not run)."""
        try:
            url = pg_test_url()
        except PostgresUnavailable as exc:
            pytest.fail(f"PostgreSQL for the tests: {exc}")
        reason = postgres_unavailable_reason(url)
        if reason:
            pytest.fail(reason)
        yield url
        stop_session_server()

    @pytest.fixture(scope="module")
    def pg_database(pg_server: URL) -> Iterator[URL]:
        """A scratch PostgreSQL database for the module."""
        with scratch_postgres_database(pg_server) as url:
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
