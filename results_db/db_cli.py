"""CLI for `edgecascade db`: maintenance of the results database (today: `retention`)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

HELP = "Maintain the results database (retention of old inference rows)"
DESCRIPTION = (
    "Maintain the results database. `retention` drops the daily partitions of `inferences` older than a "
    "given age (PostgreSQL, migration 0008), whole: no row-by-row DELETE, the space is freed at once. On "
    "SQLite, which has no partitions, it deletes those rows. Other tables (runs, energy windows) are kept."
)
EPILOG = """examples:
  edgecascade db retention --older-than 30d --db postgresql+psycopg://edge@db.lan/edge
  edgecascade db retention --older-than 12h --dry-run       # what would go ($EDGECASCADE_DB_URL)
  edgecascade db retention --older-than 90d --db results/bench.db

Ages: a number with s, m, h or d (seconds, minutes, hours, days). A day partition is dropped only when all
of it is older than the cutoff. The result goes to stdout as JSON; exit status 2 for a bad age or database.
"""

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}


def parse_age(text: str) -> float:
    """'30d' -> seconds; ValueError saying what an age looks like otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match is None:
        raise ValueError(f"age must be a number with s, m, h or d (e.g. 30d, 12h), got {text!r}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    actions = parser.add_subparsers(dest="db_action", metavar="ACTION", required=True)
    retention = actions.add_parser(
        "retention",
        help="drop inference rows older than an age (whole daily partitions on PostgreSQL)",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retention.add_argument("--older-than", required=True, metavar="AGE", help="e.g. 30d, 12h")
    retention.add_argument(
        "--db", help="SQLAlchemy URL or SQLite path (default $EDGECASCADE_DB_URL, results/bench.db)"
    )
    retention.add_argument("--dry-run", action="store_true", help="say what would go, change nothing")


def run(args: argparse.Namespace) -> int:
    from results_db.database import DatabaseUnusable, open_database
    from results_db.partitions import drop_older_than

    try:
        age_s = parse_age(args.older_than)
    except ValueError as exc:
        print(f"edgecascade db retention: {exc}", file=sys.stderr)
        return 2
    try:
        engine = open_database(args.db)
    except DatabaseUnusable as exc:
        print(f"edgecascade db retention: {exc}", file=sys.stderr)
        return 2
    cutoff = time.time() - age_s
    try:
        result = drop_older_than(engine, cutoff, dry_run=args.dry_run)
    finally:
        engine.dispose()
    summary = {
        "cutoff_unix": round(cutoff, 3),
        "partitioned": result.partitioned,
        "dropped_partitions": result.dropped,
        "rows": result.rows_deleted,
        "dry_run": bool(args.dry_run),
    }
    print(json.dumps(summary))
    return 0
