"""The fleet simulation (`bench.fleet_sim`, the real agent CLI in one process each) across broker cells behind
HAProxy (`edgecascade cells`), with one cell SIGKILLed mid-run and restarted.

    python -m bench.cells_bench                                  # 3 cells, 12 agents x 600 samples at 20/s
    python -m bench.cells_bench --agents 6 --samples 400 --kill-after 3 --down-s 8
    python -m bench.cells_bench --cells 3 --workers-per-cell 2 --json results/cells.json
    python -m bench.cells_bench --agents 6 --samples 200 --postgres    # the cells' collectors into PostgreSQL

Prints the fleet's row accounting (every dataset item of every device: lost, duplicates), the exit stages per
cell (the killed cell's devices fall back at the edge while it is down, the others' do not), and each
device's cell stability from HAProxy's own log (the cells its connections were routed to: one each).
Exit status 1 when an item is lost or stored twice, or a device was routed to two cells.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, Union

from rich.console import Console
from rich.table import Table

from bench.fleet_sim import FleetResult, add_db_options, results_db_url, run_fleet, summary_table
from bench.results_sql import query
from bench.services import ServiceGroup
from broker.launcher import find_free_port
from cells.haproxy import routes_in_log
from cells.plan import CellsPlan, write_plan
from cells.stack import CellStack
from protocol.mqtt import BrokerAddress

logger = logging.getLogger(__name__)


class CellFront:
    """What the fleet simulation takes for its broker: accounts and logins through HAProxy, and `kill`/
    `stop`/`start` acting on one cell (the chaos target)."""

    def __init__(self, stack: CellStack, target: int) -> None:
        self.stack, self.target = stack, target
        self.name = stack.plan.cells[target].name

    def add_users(self, devices: Iterable[str]) -> None:
        self.stack.add_users(devices)

    def credentials(self, device_id: str) -> BrokerAddress:
        return self.stack.credentials(device_id)

    def kill(self) -> None:
        self.stack.kill_cell(self.target)

    def stop(self) -> None:
        self.stack.brokers[self.target].stop()

    def start(self) -> None:
        self.stack.start_cell(self.target)


@contextlib.contextmanager
def cells_site(
    workdir: Path,
    db: Union[Path, str],
    models: Path,
    workers: int,
    *,
    cells: int,
    target: int = 0,
    cloud_cpus: Optional[float] = None,
    stacks: Optional[List[CellStack]] = None,
) -> Iterator[Tuple[CellFront, ServiceGroup]]:
    """`bench.services.cloud_site`'s counterpart: `cells` cells (`workers` cloud workers in all, spread
    evenly) behind HAProxy, every cell's collector into `db`. `stacks` (a list) is handed the stack."""
    if cloud_cpus:
        raise ValueError("--cloud-cpus is not supported across cells")
    if workers % cells:
        raise ValueError(f"{workers} workers do not spread evenly over {cells} cells")
    plan = write_plan(
        workdir / "cells",
        cells=cells,
        port=find_free_port(count=cells + 1),
        workers_per_cell=workers // cells,
        db=str(db),
        models=str(models),
    )
    with CellStack(plan, logs=workdir / "logs") as stack:
        if stacks is not None:
            stacks.append(stack)
        assert stack.services is not None
        yield CellFront(stack, target), stack.services


@dataclass
class CellsResult:
    cells: int
    fleet: FleetResult
    devices_in_one_cell: int = 0
    devices_routed: int = 0
    connections: int = 0
    most_connections: int = 0  # of one device (reconnects after the kill included)
    per_cell: List[Dict[str, Any]] = field(default_factory=list)

    killed_mid_run: Optional[bool] = (
        None  # every device of the killed cell connected, then again (None: no kill)
    )

    @property
    def kill_hit_devices(self) -> bool:
        return self.killed_mid_run is not False

    @property
    def ok(self) -> bool:
        fleet = self.fleet
        routed = self.devices_in_one_cell == fleet.agents
        return fleet.lost == 0 and fleet.duplicates == 0 and routed and self.kill_hit_devices


def _stability(plan: CellsPlan, devices: List[str], out: CellsResult) -> None:
    routes = routes_in_log(plan.haproxy_cfg.with_name("haproxy.log"))
    out.devices_routed = sum(1 for d in devices if routes.get(d))
    out.devices_in_one_cell = sum(
        1 for d in devices if {cell for cell, _ in routes.get(d, [])} == {plan.cells[plan.cell_of(d)].name}
    )
    out.connections = sum(len(routes.get(d, [])) for d in devices)
    out.most_connections = max((len(routes.get(d, [])) for d in devices), default=0)


def _per_cell(
    plan: CellsPlan, db: Union[Path, str], fleet_id: str, killed: Optional[int], out: CellsResult
) -> None:
    rows = query(
        db,
        "SELECT device_id, exit_stage, COUNT(*) FROM inferences WHERE run_id LIKE ? "
        "GROUP BY device_id, exit_stage",
        (f"{fleet_id}-%",),
    )
    routes = routes_in_log(plan.haproxy_cfg.with_name("haproxy.log"))
    for cell in plan.cells:
        stages: Dict[str, int] = {}
        devices = set()
        for device, stage, n in rows:
            if plan.cell_of(device) == cell.index:
                devices.add(device)
                stages[stage] = stages.get(stage, 0) + n
        connections = sum(len(routes.get(d, [])) for d in devices)
        out.per_cell.append(
            {
                "cell": cell.name,
                "killed": cell.index == killed,
                "devices": len(devices),
                "connections": connections,  # more than devices: reconnects (after the kill)
                "stages": stages,
            }
        )


def _connected(log: Path, device: str) -> int:
    """Index of `device`'s first successful connection in HAProxy's log, -1 while it has none."""
    states = [state for _, state in routes_in_log(log).get(device, [])]
    return states.index("--") if "--" in states else -1


def _kill_mid_run(
    args: argparse.Namespace, front: CellFront, devices: List[str], result: FleetResult
) -> None:
    """The chaos (fleet_sim's `during` scenario): once every device of the target cell is connected (agents
    take seconds to start on a busy host, so a time from launch may miss them), wait `--kill-after`, SIGKILL
    the cell, start it again `--down-s` later."""
    plan = front.stack.plan
    log = plan.haproxy_cfg.with_name("haproxy.log")
    mine = [d for d in devices if plan.cell_of(d) == front.target]
    deadline = time.monotonic() + 300
    while not all(_connected(log, d) >= 0 for d in mine) and time.monotonic() < deadline:
        time.sleep(0.2)
    time.sleep(args.kill_after)
    front.kill()
    killed_at = time.monotonic()
    time.sleep(args.down_s)
    front.start()
    result.events.append(
        f"{front.name} SIGKILLed {args.kill_after:g} s after its {len(mine)} devices were connected, "
        f"restarted {time.monotonic() - killed_at:.1f} s later"
    )
    console = Console(stderr=True)
    console.print(f"[yellow]{result.events[-1]}[/]")


def _killed_mid_run(plan: CellsPlan, devices: List[str], target: int) -> bool:
    """Each device of the killed cell had a connection before the kill and another after it."""
    log = plan.haproxy_cfg.with_name("haproxy.log")
    mine = [d for d in devices if plan.cell_of(d) == target]
    routes = routes_in_log(log)
    return bool(mine) and all(0 <= _connected(log, d) < len(routes.get(d, [])) - 1 for d in mine)


def run_cells(args: argparse.Namespace, console: Console) -> CellsResult:
    stacks: List[CellStack] = []
    site = functools.partial(cells_site, cells=args.cells, target=args.kill_cell, stacks=stacks)
    chaos = functools.partial(_kill_mid_run, args) if args.kill else None
    db_url = results_db_url(args)
    fleet = run_fleet(
        agents=args.agents,
        workers=args.cells * args.workers_per_cell,
        samples=args.samples,
        policy=args.policy,
        models=args.models,
        results=args.results,
        rate=args.rate,
        console=console,
        site=site,
        during=chaos,
        db_url=db_url,
    )
    out = CellsResult(args.cells, fleet)
    plan = stacks[0].plan
    devices = [f"sim-{i:03d}" for i in range(args.agents)]
    _stability(plan, devices, out)
    fleet_id = plan.directory.parent.name  # the fleet's work directory, results/fleet/<fleet id>/cells
    db = db_url or args.results / "fleet.db"
    _per_cell(plan, db, fleet_id, args.kill_cell if args.kill else None, out)
    if args.kill:
        out.killed_mid_run = _killed_mid_run(plan, devices, args.kill_cell)
    return out


def cells_table(out: CellsResult) -> Table:
    table = Table(title=f"{out.cells} cells behind HAProxy: exit stages per cell, routing from HAProxy's log")
    for col in ("cell", "chaos", "devices", "connections", "rows", "cloud", "fallback", "shed", "edge exits"):
        table.add_column(col, justify="right")
    for cell in out.per_cell:
        stages = cell["stages"]
        edge = sum(n for s, n in stages.items() if s not in ("cloud", "fallback", "shed"))
        table.add_row(
            cell["cell"],
            "SIGKILLed" if cell["killed"] else "—",
            str(cell["devices"]),
            str(cell["connections"]),
            f"{sum(stages.values()):,}",
            f"{stages.get('cloud', 0):,}",
            f"{stages.get('fallback', 0):,}",
            f"{stages.get('shed', 0):,}",
            f"{edge:,}",
        )
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.cells_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--cells", type=int, default=3)
    parser.add_argument("--workers-per-cell", type=int, default=1)
    parser.add_argument(
        "--agents", type=int, default=12, help="device processes in all (default %(default)s)"
    )
    parser.add_argument("--samples", type=int, default=600, help="samples per agent (default %(default)s)")
    parser.add_argument("--rate", type=float, default=20.0, help="samples/s per agent (default %(default)s)")
    parser.add_argument("--policy", default="meanet")
    parser.add_argument("--kill-cell", type=int, default=0, help="which cell to SIGKILL (default 0)")
    parser.add_argument(
        "--kill-after",
        type=float,
        default=5.0,
        help="s after every device of that cell is connected (default %(default)s)",
    )
    parser.add_argument("--no-kill", dest="kill", action="store_false", help="no chaos: a plain run")
    parser.add_argument(
        "--down-s", type=float, default=10.0, help="how long it stays down (default %(default)s)"
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--results", type=Path, default=Path("results/cells"))
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    add_db_options(parser)
    args = parser.parse_args(argv)
    if not 0 <= args.kill_cell < args.cells:
        parser.error(f"--kill-cell must be in 0..{args.cells - 1}")
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    out = run_cells(args, console)
    wide = Console(width=200)
    wide.print(summary_table([out.fleet]))
    wide.print(cells_table(out))
    print(
        f"rows {out.fleet.rows:,} of {out.fleet.expected:,}: lost {out.fleet.lost}, duplicates "
        f"{out.fleet.duplicates}; devices in one cell: {out.devices_in_one_cell} of {out.fleet.agents} "
        f"({out.connections} connections, at most {out.most_connections} for one device)"
    )
    if not out.kill_hit_devices:
        print("the kill missed the run (a device of the killed cell did not connect before it and after it)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(out), indent=2, default=str) + "\n")
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
