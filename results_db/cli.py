"""CLI for `edgecascade collect` (placeholder until the subcommand is built)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Collect result records from MQTT into SQL",
        description="Collect result records from MQTT into SQL",
        epilog="example:\n  edgecascade collect --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("edgecascade collect is not built yet", file=sys.stderr)
    return 3
