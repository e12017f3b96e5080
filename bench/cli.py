"""CLI for `edgecascade bench` (placeholder until the subcommand is built)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Run the end-to-end energy-metered benchmark",
        description="Run the end-to-end energy-metered benchmark",
        epilog="example:\n  edgecascade bench --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("edgecascade bench is not built yet", file=sys.stderr)
    return 3
