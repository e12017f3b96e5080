"""CLI for `edgecascade cells`: plan broker cells behind HAProxy, show where devices land, run them."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

HELP = "Broker cells behind HAProxy: plan the config, start it locally"
DESCRIPTION = (
    "Scale out past one Mosquitto: N cells (a Mosquitto, its cloud workers and its collector each) behind "
    "HAProxy, which routes every device to one cell by a hash of its MQTT client id, the same cell on every "
    "reconnect. `plan` writes plain config files into a directory; `up` starts all of it on this host."
)
EPILOG = """examples:
  # 3 cells, one cloud worker each, 30 devices (dev-000..dev-029), results into one SQLite file
  edgecascade cells plan --cells 3 --devices 30 --out build/cells
  edgecascade cells up build/cells            # brokers, HAProxy on 127.0.0.1:11883, workers, collectors
  # a device connects to HAProxy with its own password, never to a cell directly
  edgecascade agent --broker 127.0.0.1:11883 --device-id dev-007 \\
      --password-file build/cells/devices/dev-007.pw --source dataset:fashion-mnist:test:1000
  edgecascade cells route build/cells dev-007  # which cell it lands in
  # PostgreSQL for the results, 2 workers per cell, HAProxy on all interfaces
  edgecascade cells plan --cells 3 --workers-per-cell 2 --host 0.0.0.0 --cell-host 127.0.0.1 \\
      --db postgresql+psycopg://edgecascade@db/edgecascade --out /etc/edgecascade/cells
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="cells_command", metavar="ACTION", required=True)
    plan = sub.add_parser(
        "plan",
        help="write the config of N cells and HAProxy into a directory",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    plan.add_argument("--out", type=Path, required=True, help="directory to write (must not hold a plan)")
    plan.add_argument("--cells", type=int, default=3, help="number of cells (default %(default)s)")
    plan.add_argument(
        "--workers-per-cell", type=int, default=1, help="cloud workers in each cell (default %(default)s)"
    )
    plan.add_argument("--host", default="127.0.0.1", help="HAProxy's listen address (default %(default)s)")
    plan.add_argument(
        "--port",
        type=int,
        default=11883,
        help="HAProxy's port; cell i listens on port+1+i (default %(default)s)",
    )
    plan.add_argument("--cell-host", help="address the cells' brokers listen on (default: --host)")
    plan.add_argument(
        "--devices", type=int, default=0, help="create this many device accounts dev-000... (default 0)"
    )
    plan.add_argument(
        "--device", action="append", default=[], metavar="ID", help="a device account by name (repeatable)"
    )
    plan.add_argument(
        "--db", default="results/cells.db", help="results database, path or URL (default %(default)s)"
    )
    plan.add_argument("--models", default="models/fashion-mnist", help="the cloud workers' model directory")
    plan.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests, staging)")
    up = sub.add_parser("up", help="start a planned setup on this host until Ctrl-C")
    up.add_argument("dir", type=Path, help="the plan's directory (`cells plan --out`)")
    up.add_argument("--no-services", action="store_true", help="brokers and HAProxy only")
    route = sub.add_parser("route", help="the cell each device id is routed to")
    route.add_argument("dir", type=Path, help="the plan's directory")
    route.add_argument("device", nargs="*", help="device ids (default: every planned device)")


def run(args: argparse.Namespace) -> int:
    from cells.plan import CellsPlan, PlanError, default_devices, write_plan
    from protocol.ids import InvalidId

    try:
        if args.cells_command == "plan":
            devices = [*default_devices(args.devices), *args.device]
            plan = write_plan(
                args.out,
                cells=args.cells,
                host=args.host,
                port=args.port,
                workers_per_cell=args.workers_per_cell,
                db=args.db,
                models=args.models,
                namespace=args.namespace,
                devices=devices,
                cell_host=args.cell_host,
            )
            _print_plan(plan)
            return 0
        plan = CellsPlan.load(args.dir)
    except (PlanError, InvalidId, RuntimeError) as exc:
        print(f"edgecascade cells: {exc}", file=sys.stderr)
        return 2
    if args.cells_command == "route":
        for device in args.device or plan.devices():
            print(f"{device}\t{plan.cells[plan.cell_of(device)].name}")
        return 0
    return _up(plan, services=not args.no_services)


def _print_plan(plan: object) -> None:
    from cells.plan import CellsPlan

    assert isinstance(plan, CellsPlan)
    counts = [0] * len(plan.cells)
    for device in plan.devices():
        counts[plan.cell_of(device)] += 1
    print(f"wrote {plan.directory}: HAProxy on {plan.host}:{plan.port}")
    for cell, n in zip(plan.cells, counts):
        print(
            f"  {cell.name}: Mosquitto on {cell.host}:{cell.port}, {plan.workers_per_cell} cloud worker(s), "
            f"a collector, {n} device(s)"
        )
    print(f"results: {plan.db}; passwords (0600): */cloud.pw, */collector.pw, devices/*.pw")
    print(f"start it: edgecascade cells up {plan.directory}")


def _up(plan: object, services: bool) -> int:
    from cells.plan import CellsPlan
    from cells.stack import CellStack

    assert isinstance(plan, CellsPlan)
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stack = CellStack(plan, services=services).start()
    except RuntimeError as exc:
        print(f"edgecascade cells up: {exc}", file=sys.stderr)
        return 1
    try:
        info = {
            "haproxy": f"{plan.host}:{plan.port}",
            "cells": [f"{c.host}:{c.port}" for c in plan.cells],
            "db": plan.db,
            "logs": str(stack.logs),
        }
        print(json.dumps(info), flush=True)
        print("up; Ctrl-C stops everything", file=sys.stderr)
        stop.wait()
    finally:
        stack.close()
    return 0
