"""deploy/config.py: `--config FILE.toml` as a list of flags, and the shipped examples in deploy/etc/."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import List

import pytest

from deploy.config import ConfigError, config_to_argv, expand_config_argv, load_config

REPO = Path(__file__).resolve().parent.parent
EXAMPLES = REPO / "deploy" / "etc"
SERVICES = ("agent", "cloud", "collect")


def service_parser() -> argparse.ArgumentParser:
    """A main parser shaped like `edgecascade`'s: global -v, then a subcommand with the usual option kinds."""
    parser = argparse.ArgumentParser(prog="edgecascade")
    parser.add_argument("-v", "--verbose", action="count", default=0)
    sub = parser.add_subparsers(dest="command")
    agent = sub.add_parser("agent")
    agent.add_argument("--broker", default="127.0.0.1:1883")
    agent.add_argument("--device-id")
    agent.add_argument("--password-file", type=Path)
    agent.add_argument("--max-inflight", type=int, default=64)
    agent.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"])
    agent.add_argument("--policy-param", action="append", default=[])
    agent.add_argument("--quick", action="store_true")
    agent.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    agent.add_argument("--config", help="TOML file of these options")
    return parser


def write(tmp_path: Path, text: str, name: str = "agent.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flags_from_the_file_and_explicit_flags_after_it_win(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", "/run/credentials/edgecascade-agent@cam01.service")
    path = write(
        tmp_path,
        """
        [broker]
        broker = "mqtt.lan:8883"
        password_file = "${CREDENTIALS_DIRECTORY}/mqtt-password"
        [agent]
        device-id = "from-file"
        max_inflight = 16
        providers = ["TensorrtExecutionProvider", "CPUExecutionProvider"]
        policy_param = { theta = 0.8, beta = 0.25 }
        quick = true
        progress = false
        """,
    )
    parser = service_parser()
    argv = expand_config_argv(["-v", "agent", "--config", str(path), "--device-id", "cam01"], parser)
    args = parser.parse_args(argv)
    assert args.command == "agent" and args.verbose == 1
    assert args.broker == "mqtt.lan:8883"
    assert args.password_file == Path("/run/credentials/edgecascade-agent@cam01.service/mqtt-password")
    assert args.device_id == "cam01"  # the unit's instance, given after --config, wins
    assert args.max_inflight == 16  # argparse's own type conversion still applies
    assert args.providers == ["TensorrtExecutionProvider", "CPUExecutionProvider"]
    assert args.policy_param == ["theta=0.8", "beta=0.25"]
    assert args.quick is True and args.progress is False

    args = parser.parse_args(expand_config_argv(["agent", "--max-inflight", "3", f"--config={path}"], parser))
    assert args.max_inflight == 16  # flags before --config are overridden by the file


def test_unknown_keys_are_refused_with_the_options_that_exist(tmp_path: Path) -> None:
    path = write(tmp_path, 'brokr = "mqtt.lan"\n')
    with pytest.raises(ConfigError, match=r"unknown key `brokr` \(this command takes: broker, device-id"):
        expand_config_argv(["agent", "--config", str(path)], service_parser())


def test_bad_values_are_refused(tmp_path: Path) -> None:
    sub = service_parser()._subparsers._group_actions[0].choices["agent"]  # type: ignore[union-attr]
    with pytest.raises(ConfigError, match="`quick` takes true or false"):
        config_to_argv({"quick": "yes"}, sub)
    with pytest.raises(ConfigError, match="`broker` takes one value, not a list"):
        config_to_argv({"broker": ["a", "b"]}, sub)


def test_systemd_directories_must_be_set_and_nothing_else_expands(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match=r"\$\{STATE_DIRECTORY\} is not set: run under the systemd unit"):
        load_config(write(tmp_path, 'state_dir = "${STATE_DIRECTORY}"\n'))
    with pytest.raises(ConfigError, match=r"\$\{HOME\} is not one of CREDENTIALS_DIRECTORY"):
        load_config(write(tmp_path, 'state_dir = "${HOME}/x"\n'))
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/edgecascade/cam01")
    assert load_config(write(tmp_path, 'state_dir = "${STATE_DIRECTORY}"\n')) == {
        "state-dir": "/var/lib/edgecascade/cam01"
    }


def test_broken_files_say_which_file_and_why(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config .*missing.toml"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="agent.toml is not valid TOML"):
        load_config(write(tmp_path, "broker = \n"))
    with pytest.raises(ConfigError, match="`broker` is set twice"):
        load_config(write(tmp_path, '[a]\nbroker = "x"\n[b]\nbroker = "y"\n'))
    with pytest.raises(ConfigError, match="cannot name another config file"):
        load_config(write(tmp_path, 'config = "other.toml"\n'))
    with pytest.raises(ConfigError, match="--config needs a file name"):
        expand_config_argv(["agent", "--config"], service_parser())


def unit_command(service: str, tmp_path: Path) -> List[str]:
    """The unit's ExecStart= as argv after `edgecascade`, systemd's specifiers filled in for this test."""
    unit = REPO / "deploy" / f"edgecascade-{service}{'' if service == 'collect' else '@'}.service"
    text = unit.read_text().replace("\\\n", " ")
    line = next(x for x in text.splitlines() if x.startswith("ExecStart="))
    for spec, value in (
        ("%i", "cam01"),
        ("%d", str(tmp_path / "credentials")),
        ("%S", str(tmp_path / "state")),
    ):
        line = line.replace(spec, value)
    argv = shlex.split(line.split("=", 1)[1])
    assert argv[0] == "/opt/edgecascade/venv/bin/edgecascade" and argv[1] == service
    assert argv[2:4] == ["--config", f"/etc/edgecascade/{service}.toml"]
    argv[3] = str(EXAMPLES / f"{service}.toml")  # the shipped example stands in for the installed copy
    return argv[1:]


@pytest.mark.parametrize("service", SERVICES)
def test_shipped_example_is_valid_and_keeps_secrets_out(service: str, tmp_path: Path) -> None:
    config = load_config(EXAMPLES / f"{service}.toml")
    assert config["broker"] == "mqtt.example.net:1883"
    settings = [
        line for line in (EXAMPLES / f"{service}.toml").read_text().splitlines() if not line.startswith("#")
    ]
    # No secret in the file: the password comes from the unit's credential, the database URL too.
    assert not [line for line in settings if "://" in line or "password" in line], settings
    assert "--password-file" in unit_command(service, tmp_path)


@pytest.mark.parametrize("service", SERVICES)
def test_units_command_line_parses_with_the_real_cli(service: str, tmp_path: Path) -> None:
    """The unit's ExecStart= with the shipped config, expanded by deploy.config, parses with `edgecascade`."""
    from edgecascade.cli import build_parser

    parser = build_parser()
    argv = unit_command(service, tmp_path)
    args = parser.parse_args(expand_config_argv(argv, parser))
    assert args.broker == "mqtt.example.net:1883"
    assert Path(args.password_file) == tmp_path / "credentials/mqtt-password"
    if service == "agent":
        assert (args.device_id, Path(args.state_dir)) == ("cam01", tmp_path / "state/edgecascade/cam01")
        assert args.source == "dataset:fashion-mnist:test" and args.no_progress is True
    if service == "cloud":
        assert args.worker_id == "cam01" and args.providers == ["CPUExecutionProvider"]
