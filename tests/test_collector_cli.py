"""`edgecascade collect` settings: flags over --config TOML over systemd credentials over defaults."""

from __future__ import annotations

import argparse

import pytest

from deploy.config import expand_config_argv
from edgecascade.cli import build_parser, main
from results_db.cli import settings


def parse(*argv: str) -> argparse.Namespace:
    """As `edgecascade` parses: --config expanded into flags first (deploy.config, the one loader)."""
    parser = build_parser()
    return parser.parse_args(expand_config_argv(["collect", *argv], parser))


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path) -> None:
    conf = tmp_path / "collect.toml"
    conf.write_text('[collect]\nbroker = "broker.lan:8883"\nbatch_size = 2000\ndb = "/var/lib/x.db"\n')
    merged = settings(parse("--config", str(conf), "--batch-size", "3000"))
    assert merged["broker"] == "broker.lan:8883"  # from the file
    assert merged["batch_size"] == 3000  # the flag wins
    assert merged["db"] == "/var/lib/x.db"
    assert merged["user"] == "collector" and merged["flush_ms"] == 200.0  # defaults


def test_systemd_credentials_supply_password_and_database(tmp_path, monkeypatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "db-url").write_text("postgresql+psycopg://edge@db.lan/edge\n")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    assert settings(parse())["db"] == "postgresql+psycopg://edge@db.lan/edge"
    assert settings(parse("--db", "local.db"))["db"] == "local.db"


def test_bad_settings_are_refused_before_connecting(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert main(["collect", "--db", str(tmp_path / "x.db")]) == 2
    assert "no broker password" in capsys.readouterr().err
    conf = tmp_path / "bad.toml"
    conf.write_text('brokr = "typo:1883"\n')
    assert main(["collect", "--config", str(conf)]) == 2
    assert "unknown key `brokr`" in capsys.readouterr().err  # refused by the shared --config loader
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    assert main(["collect", "--password-file", str(pw), "--broker", "no-port"]) == 2
    assert "host:port" in capsys.readouterr().err
    assert not (tmp_path / "x.db").exists()


def test_help_has_an_example(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["collect", "--help"])
    assert "edgecascade collect --broker" in capsys.readouterr().out


def _db_cases(tmp_path):
    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"this is not a SQLite file at all" * 100)
    other = tmp_path / "other-app.db"
    import sqlite3

    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE invoices (id INTEGER PRIMARY KEY, total REAL)")
    return [
        (
            "postgresql://postgres@127.0.0.1:1/nothing",
            "cannot open the results database postgresql+psycopg://",
        ),
        ("mysql://user@db.lan/results", "unsupported database 'mysql'"),
        ("nosuchdb://x/y", "unsupported database 'nosuchdb'"),
        (str(corrupt), "file is not a database"),
        (str(tmp_path), "is a directory, not a SQLite database file"),
        (str(other), "holds tables of another application (invoices)"),
    ]


def test_an_unusable_database_gets_one_clear_line_and_exit_2(tmp_path, capsys) -> None:
    """Before: raw tracebacks for each of these (and the other application's database got our tables)."""
    pw = tmp_path / "pw"
    pw.write_text("secret\n")
    for url, message in _db_cases(tmp_path):
        assert main(["collect", "--password-file", str(pw), "--broker", "127.0.0.1:1", "--db", url]) == 2, url
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    import sqlite3

    with sqlite3.connect(tmp_path / "other-app.db") as raw:  # left as it was
        assert [r[0] for r in raw.execute("SELECT name FROM sqlite_master WHERE type = 'table'")] == [
            "invoices"
        ]


def test_report_refuses_an_unusable_database_the_same_way(tmp_path, capsys) -> None:
    for url, message in _db_cases(tmp_path)[1:]:
        assert main(["report", "--db", url, "--out", str(tmp_path / "r")]) == 2, url
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
