"""`--config /etc/edgecascade/<service>.toml` for the service CLIs: a TOML file is a list of flags.

Every key is the long option of the subcommand it configures (`password_file` or `password-file` means
`--password-file`), at the top or in a [table]: tables only group keys for the reader. Explicit flags after
`--config` win, because argparse keeps the last value; the systemd units pass `--config FILE` first and the
instance id after it.

String values may name the directories systemd creates for a unit, so that no secret or state path is written
into the file itself: `${CREDENTIALS_DIRECTORY}/mqtt-password`, `${STATE_DIRECTORY}`, `${CACHE_DIRECTORY}`.

Wiring (in the dispatcher, before parsing): `argv = expand_config_argv(argv, parser)`. Runs on Python 3.8
(the agent runs on Jetsons): tomllib from 3.11, the `tomli` backport before.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on the Python 3.8 devices
    import tomli as tomllib

# The only variables expanded: those systemd sets from LoadCredential=, StateDirectory=, CacheDirectory= ...
SYSTEMD_DIRECTORIES = (
    "CREDENTIALS_DIRECTORY",
    "STATE_DIRECTORY",
    "CACHE_DIRECTORY",
    "RUNTIME_DIRECTORY",
    "LOGS_DIRECTORY",
    "CONFIGURATION_DIRECTORY",
)
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
CONFIG_FLAG = "--config"


class ConfigError(ValueError):
    """A config file that cannot be read, or a key or value the subcommand does not take."""


def _expand(value: str, where: str) -> str:
    def substitute(match: re.Match) -> str:
        name = match.group(1)
        if name not in SYSTEMD_DIRECTORIES:
            raise ConfigError(f"{where}: ${{{name}}} is not one of {', '.join(SYSTEMD_DIRECTORIES)}")
        found = os.environ.get(name)
        if not found:
            raise ConfigError(
                f"{where}: ${{{name}}} is not set: run under the systemd unit (which sets it) "
                "or write the path out"
            )
        # systemd lists several directories separated by ':' when a unit asks for several; ours ask for one.
        return found.split(":", 1)[0]

    return _VARIABLE.sub(substitute, value)


def _add(out: Dict[str, Any], key: str, value: Any, where: str) -> None:
    name = key.replace("_", "-")
    if name in out:
        raise ConfigError(f"{where}: `{key}` is set twice in this file")
    out[name] = _expand_all(value, where)


def _expand_all(value: Any, where: str) -> Any:
    if isinstance(value, str):
        return _expand(value, where)
    if isinstance(value, list):
        return [_expand_all(v, where) for v in value]
    if isinstance(value, dict):
        return {k: _expand_all(v, where) for k, v in value.items()}
    return value


def load_config(path: Path) -> Dict[str, Any]:
    """Read a service config: option name (dashes) -> value, systemd directories expanded."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise ConfigError(f"cannot read config {path}: {exc.strerror or exc}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    out: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):  # a [table] only groups options for the reader
            for inner, inner_value in value.items():
                _add(out, inner, inner_value, f"{path}: [{key}] {inner}")
        else:
            _add(out, key, value, f"{path}: {key}")
    if "config" in out:
        raise ConfigError(f"{path}: a config file cannot name another config file")
    return out


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def config_to_argv(
    config: Dict[str, Any], parser: argparse.ArgumentParser, source: str = "config"
) -> List[str]:
    """The flags that say what `config` says, checked against the options `parser` defines."""
    options = {
        opt: action for action in parser._actions for opt in action.option_strings if opt.startswith("--")
    }
    boolean_optional = getattr(argparse, "BooleanOptionalAction", None)  # Python >= 3.9
    argv: List[str] = []
    for name, value in config.items():
        flag = f"--{name}"
        action = options.get(flag)
        if action is None or flag in ("--help", CONFIG_FLAG):
            known = ", ".join(sorted(o[2:] for o in options if o not in ("--help", CONFIG_FLAG)))
            raise ConfigError(f"{source}: unknown key `{name}` (this command takes: {known})")
        if boolean_optional is not None and isinstance(action, boolean_optional):
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: `{name}` takes true or false, not {value!r}")
            argv.append(flag if value else f"--no-{name}")
        elif action.nargs == 0:  # store_true / store_false / store_const / count
            if not isinstance(value, bool):
                raise ConfigError(f"{source}: `{name}` takes true or false, not {value!r}")
            if value == action.const or (action.const is None and value):
                argv.append(flag)
        elif isinstance(action, argparse._AppendAction):
            items = (
                value.items() if isinstance(value, dict) else value if isinstance(value, list) else [value]
            )
            for item in items:
                text = f"{item[0]}={_scalar(item[1])}" if isinstance(item, tuple) else _scalar(item)
                argv += [flag, text]
        elif isinstance(value, list):
            if action.nargs in (None, "?"):
                raise ConfigError(f"{source}: `{name}` takes one value, not a list")
            argv += [flag, *(_scalar(v) for v in value)]
        else:
            argv += [flag, _scalar(value)]
    return argv


def _subcommand_parser(
    argv: Sequence[str], parser: argparse.ArgumentParser
) -> Tuple[int, argparse.ArgumentParser]:
    """(index after the subcommand name, its parser); (0, parser) when `parser` has no subcommands."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for i, token in enumerate(argv):
                if token in action.choices:
                    return i + 1, action.choices[token]
            return len(argv), parser
    return 0, parser


def expand_config_argv(argv: Sequence[str], parser: argparse.ArgumentParser) -> List[str]:
    """Replace `--config FILE` (or `--config=FILE`) by the flags FILE holds, in place.

    Flags after it override the file; flags before it are overridden by it.
    """
    start, target = _subcommand_parser(argv, parser)
    out = list(argv[:start])
    rest = list(argv[start:])
    i = 0
    while i < len(rest):
        token = rest[i]
        path: Optional[str] = None
        if token == CONFIG_FLAG:
            if i + 1 >= len(rest):
                raise ConfigError(f"{CONFIG_FLAG} needs a file name")
            path, i = rest[i + 1], i + 2
        elif token.startswith(CONFIG_FLAG + "="):
            path, i = token.split("=", 1)[1], i + 1
        elif token == "--":
            out += rest[i:]
            break
        else:
            out.append(token)
            i += 1
            continue
        out += config_to_argv(load_config(Path(path)), target, source=path)
    return out
