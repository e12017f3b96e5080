"""CLI for `edgecascade cloud` (placeholder until the subcommand is built)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Run a cloud worker (shared subscription, micro-batching)",
        description="Run a cloud worker (shared subscription, micro-batching)",
        epilog="example:\n  edgecascade cloud --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("edgecascade cloud is not built yet", file=sys.stderr)
    return 3
