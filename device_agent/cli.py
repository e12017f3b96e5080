"""CLI for `edgecascade agent` (placeholder until the subcommand is built)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Run the device agent (edge cascade + offload over MQTT)",
        description="Run the device agent (edge cascade + offload over MQTT)",
        epilog="example:\n  edgecascade agent --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("edgecascade agent is not built yet", file=sys.stderr)
    return 3
