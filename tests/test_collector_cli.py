"""`edgecascade collect` settings: flags over --config TOML over systemd credentials over defaults."""

from __future__ import annotations

import argparse

import pytest

from edgecascade.cli import build_parser, main
from results_db.cli import settings


def parse(*argv: str) -> argparse.Namespace:
    return build_parser().parse_args(["collect", *argv])


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
