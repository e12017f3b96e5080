"""`edgecascade <subcommand>`: dispatch to each package's own CLI module.

Each package's `cli.py` declares its subcommand — `HELP` (one line), `DESCRIPTION`, `EPILOG` (examples),
`add_arguments(parser)` and `run(args) -> exit status` — and this module makes the parser from them (one
place for the formatting and the wiring). Heavy imports (torch, SQLAlchemy) happen inside `run`, so
`edgecascade --help` stays fast and works on a device with only the `device` extra.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

from edgecascade import __version__

# subcommand -> module that registers it (order = order in --help)
SUBCOMMANDS = [
    ("agent", "device_agent.cli"),
    ("camera", "device_agent.camera_cli"),
    ("cloud", "cloud_worker.cli"),
    ("collect", "results_db.cli"),
    ("db", "results_db.db_cli"),
    ("train", "training.cli"),
    ("adapt", "training.adapt_cli"),
    ("bench", "bench.cli"),
    ("report", "results_db.report_cli"),
    ("broker", "broker.cli"),
    ("video", "video.cli"),
    ("fault", "vibration.cli"),
    ("models", "edgecascade.rollout.cli"),
    ("cells", "cells.cli"),
    ("sites", "cells.sites_cli"),
]

EPILOG = """examples:
  edgecascade broker --port 1884                 # a private Mosquitto with generated credentials
  edgecascade cloud --broker 127.0.0.1:1883 --user cloud --password-file cloud.pw
  edgecascade agent --device-id cam-01 --policy meanet --source dataset:fashion-mnist:test
  edgecascade collect --db results/bench.db
  edgecascade report --db results/bench.db --out results/report
"""


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the examples' line breaks and shows defaults."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgecascade",
        description="Edge-cloud cascaded inference over MQTT, metered in joules.",
        epilog=EPILOG,
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, module in SUBCOMMANDS:
        command = importlib.import_module(module)
        sub = subparsers.add_parser(
            name,
            help=command.HELP,
            description=command.DESCRIPTION,
            epilog=getattr(command, "EPILOG", None),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.add_arguments(sub)
        # Expanded into flags before parsing (deploy.config): here only so that --help shows it.
        sub.add_argument(
            "--config", metavar="FILE.toml", help="read flags from a TOML file (keys = long options)"
        )
        sub.set_defaults(func=command.run)
    return parser


def configure_logging(verbosity: int) -> None:
    level = logging.WARNING - 10 * min(verbosity, 2)
    logging.basicConfig(
        level=level, stream=sys.stderr, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    # `--config FILE` (what the systemd units pass) expands into the flags the file holds; flags after it win.
    from deploy.config import ConfigError, expand_config_argv

    try:
        argv = expand_config_argv(sys.argv[1:] if argv is None else argv, parser)
    except ConfigError as exc:
        print(f"edgecascade: {exc}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    configure_logging(args.verbose)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
