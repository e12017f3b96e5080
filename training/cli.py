"""CLI for `edgecascade train` (placeholder until the subcommand is built)."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Train the MEANet cascade and export ONNX + model card",
        description="Train the MEANet cascade and export ONNX + model card",
        epilog="example:\n  edgecascade train --help",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print("edgecascade train is not built yet", file=sys.stderr)
    return 3
