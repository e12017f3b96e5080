"""CLI for `edgecascade report`: summary table, PNG figures, Markdown and HTML, or Datasette (--serve)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict

EPILOG = """examples:
  edgecascade report --db results/bench.db --out results/report
  edgecascade report --db results/bench.db --run 20240501-meanet-x86 --out results/report-meanet
  edgecascade report --db postgresql+psycopg://edge@db.lan/edge --query energy-per-correct
  edgecascade report --db results/bench.db --query runs-of-model --param model_sha256=3f2a
  edgecascade report --list-queries
  edgecascade report --db results/bench.db --serve              # http://127.0.0.1:8001/bench in a browser
  edgecascade report --db results/bench.db --serve --immutable --port 8080

The table goes to stdout; the figures (accuracy_energy.png, exit_mix.png, latency_cdf.png), report.md and
report.html (the same report as one self-contained page) go to --out. --query prints one of the named
queries' results instead (see --list-queries for their SQL). --serve opens a SQLite results file in Datasette,
read-only, with the named queries as canned queries and the views described, until Ctrl-C.
"""


HELP = "Summarise a results database: terminal table, PNG plots, Markdown and HTML; or serve it in Datasette"
DESCRIPTION = (
    "Summarise a results database: a table on the terminal, PNG plots, a Markdown report and the same as one "
    "HTML page; or (--serve) browse it in Datasette, read-only."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument(
        "--db", help="SQLAlchemy URL or SQLite path (default $EDGECASCADE_DB_URL, else results/bench.db)"
    )
    parser.add_argument("--run", dest="run_id", help="report on this run only (the Pareto plot shows all)")
    parser.add_argument(
        "--out", type=Path, default=Path("results/report"), help="folder for PNGs and report.md"
    )
    parser.add_argument("--query", help="print the result of a named query instead of the report")
    parser.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="query parameter")
    parser.add_argument("--list-queries", action="store_true", help="list the named queries with their SQL")
    parser.add_argument(
        "--serve",
        action="store_true",
        help="serve the SQLite file in Datasette (read-only) instead of a report",
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="--serve: address to listen on (default 127.0.0.1)"
    )
    parser.add_argument("--port", type=int, default=8001, help="--serve: port (default 8001)")
    parser.add_argument(
        "--immutable",
        action="store_true",
        help="--serve: the file is finished, nothing writes it (no locking, row counts cached)",
    )


def _params(pairs: list) -> Dict[str, str]:
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise ValueError(f"--param wants NAME=VALUE, got {pair!r}")
        out[key] = value
    return out


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table
    from sqlalchemy.exc import SQLAlchemyError

    from results_db.database import DatabaseUnusable, open_database, resolve_url
    from results_db.queries import QUERIES, run_query
    from results_db.report import build_report

    # A pipe or a file gets the whole table rather than 80 columns of ellipses.
    console = Console(file=sys.stdout, width=None if sys.stdout.isatty() else 240)
    if args.list_queries:
        for query in QUERIES.values():
            console.print(f"[bold]{query.name}[/bold]: {query.question}")
            console.print(query.sql.strip(), markup=False, highlight=False)
            console.print()
        return 0
    try:
        url = resolve_url(args.db)
    except DatabaseUnusable as exc:
        print(f"edgecascade report: {exc}", file=sys.stderr)
        return 2
    if url.get_backend_name() == "sqlite" and not Path(url.database or "").exists():
        print(
            f"no database at {url.database}: run a benchmark or `edgecascade collect` first", file=sys.stderr
        )
        return 2
    if args.serve:
        if url.get_backend_name() != "sqlite" or not url.database or url.database == ":memory:":
            print(
                "edgecascade report: --serve takes a SQLite file (Datasette reads SQLite only)",
                file=sys.stderr,
            )
            return 2
        from results_db.browse import serve

        serve(Path(url.database), host=args.host, port=args.port, immutable=args.immutable)
        return 0
    try:
        engine = open_database(url)
        if args.query:
            if args.query not in QUERIES:
                print(f"unknown query {args.query!r}; known: {', '.join(QUERIES)}", file=sys.stderr)
                return 2
            columns, rows = run_query(engine, args.query, **_params(args.param))
            table = Table(title=QUERIES[args.query].question, header_style="bold")
            for column in columns:
                table.add_column(column)
            for row in rows:
                table.add_row(
                    *(
                        "–"
                        if row[c] is None
                        else f"{row[c]:.6g}"
                        if isinstance(row[c], float)
                        else str(row[c])
                        for c in columns
                    )
                )
            console.print(table)
            return 0
        result = build_report(engine, args.out, args.run_id, console=console)
    except (LookupError, ValueError, DatabaseUnusable) as exc:
        print(f"edgecascade report: {exc}", file=sys.stderr)
        return 2
    except SQLAlchemyError as exc:
        print(f"database error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {', '.join(str(p) for p in result.files.values())}", file=sys.stderr)
    return 0
