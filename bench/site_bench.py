"""A bridged edge site through a cut uplink: devices on a site broker (`edgecascade sites`), bridged to the
cells (`edgecascade cells`, real cloud workers and collectors) through a relay that the benchmark cuts
(bench.link's proxy in proxy-only mode: `down` closes the bridge's connection and refuses new ones).

    python -m bench.site_bench                         # 3 devices x 1,200 samples at 10/s, the bridge cut
                                                       # for 60 s from 30 s in
    python -m bench.site_bench --devices 2 --rate 10 --samples 300 --cut-at 8 --cut-s 10   # short

Prints the row accounting of every device's dataset items (lost, duplicates), what the site answered while
its uplink was down (every sample at the edge: fallback or shed, labelled; none from the cloud), and how
long after the uplink came back the devices' outboxes were empty. Exit 1 on a lost or duplicated item, or a
cloud answer during the cut (which would mean it was not cut).
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from bench.accounting import compare, identities
from bench.link import EmulatedLink
from bench.run import paced, wait_for_rows
from broker.launcher import find_free_port
from cells.haproxy import routes_in_log
from cells.plan import write_plan
from cells.sites import write_sites
from cells.stack import CellStack
from device_agent import AgentConfig, DeviceAgent
from device_agent.sources import load_idx_dataset

logger = logging.getLogger(__name__)
EDGE_STAGES = ("main", "extension", "fallback", "shed")


@dataclass
class SiteRun:
    devices: int
    samples_per_device: int
    rate_hz: float
    cut_at_s: float
    cut_s: float
    rows: int = 0
    lost: int = 0
    duplicates: int = 0
    in_cut: Dict[str, int] = field(default_factory=dict)  # exit stage -> rows decided while cut
    offloads_in_cut: int = 0  # samples the policy sent to the cloud while cut: fallback or shed, at the edge
    drain_s: Optional[float] = None  # uplink back -> every device's outbox empty
    bridge_connections: int = 0  # the bridge's successful logins at HAProxy (2: the first and after the cut)
    cut_measured_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.in_cut.get("cloud", 0) == 0


def run_site(args: argparse.Namespace, console: Console) -> SiteRun:
    run = time.strftime("site%Y%m%d-%H%M%S")
    work = args.results / run
    db = args.results / "site.db"
    out = SiteRun(args.devices, args.samples, args.rate, args.cut_at, args.cut_s)
    cells = write_plan(
        work / "cells",
        cells=args.cells,
        port=find_free_port(count=args.cells + 1),
        db=str(db),
        models=str(args.models),
    )
    images, labels = load_idx_dataset("fashion-mnist", "test", args.samples)
    with CellStack(cells, logs=work / "logs") as stack, EmulatedLink(
        "lan", {"mqtt": (cells.host, cells.port)}, mode="proxy-only"
    ) as link:
        sites = write_sites(
            work / "sites",
            cells,
            sites=["site-0"],
            devices_per_site=args.devices,
            port=find_free_port(),
            remote=link.address("mqtt"),
            cell_brokers=stack.brokers,
        )
        site = sites.sites[0]
        site_broker = site.broker().start()
        log = cells.haproxy_cfg.with_name("haproxy.log")
        try:
            _wait(lambda: _bridge_logins(log, site.bridge_account) >= 1, 60, "the bridge's first login")
            agents = [
                DeviceAgent(
                    AgentConfig(
                        device_id=device,
                        broker=site.device_address(device),
                        topics=cells.topics,
                        model_dir=args.models,
                        state_dir=work / "state" / device,
                        run_id=f"{run}-{device}",
                        meters=["estimate"],
                        idle_seconds=0.0,
                        close_timeout_s=180.0,
                    )
                ).start()
                for device in site.devices()
            ]
            console.print(
                f"[bold]{run}[/]: {args.devices} devices x {args.samples} samples at {args.rate:g}/s on "
                f"{site.name}, bridged to cell-{site.cell}; uplink cut {args.cut_s:g} s from {args.cut_at:g}"
                " s"
            )
            threading.Timer(args.cut_at, lambda: link.outage(args.cut_s, wait=False)).start()
            drained: Dict[str, float] = {}

            def watch() -> None:  # the first moment after the cut that nothing waits in any outbox
                while not drained:
                    outages = link.outages
                    back = bool(outages) and outages[-1].ended_at is not None
                    if back and all(a.outbox.usage()[0] == 0 for a in agents):
                        drained["at"] = time.time()
                    time.sleep(0.1)

            threading.Thread(target=watch, daemon=True).start()
            data = list(zip(images, (int(y) for y in labels)))
            runners = [
                threading.Thread(target=agent.run_dataset, args=(paced(data, args.rate),)) for agent in agents
            ]
            for runner in runners:
                runner.start()
            for runner in runners:
                runner.join()
            for agent in agents:
                agent.close()
            _wait(lambda: bool(drained), args.cut_s + 180, "the outboxes to drain")
            wait_for_rows(db, {f"{run}-{d}": args.samples for d in site.devices()}, console)
            outage = link.outages[0]
            out.cut_measured_s = outage.duration_s or 0.0
            out.drain_s = drained["at"] - (outage.ended_at or drained["at"])
            out.bridge_connections = _bridge_logins(log, site.bridge_account)
            _account(db, run, site.devices(), args, out, outage.started_at, outage.ended_at or time.time())
        finally:
            site_broker.stop()
    return out


def _bridge_logins(log: Path, account: str) -> int:
    return sum(1 for _, state in routes_in_log(log).get(account, []) if state == "--")


def _wait(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.1)


def _account(
    db: Path, run: str, devices: List[str], args: argparse.Namespace, out: SiteRun, cut: float, back: float
) -> None:
    expected = identities(args.models, args.samples)
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT run_id, label, p_main, exit_stage, ts_unix FROM inferences WHERE run_id LIKE ?",
            (f"{run}-%",),
        ).fetchall()
    out.rows = len(rows)
    for device in devices:
        lost, dupes = compare(expected, [(lab, p) for r, lab, p, _, _ in rows if r == f"{run}-{device}"])
        out.lost += lost
        out.duplicates += dupes
    # Decided while cut: from the cut to a deadline (2 s) before its end, so no offload could still have
    # been answered by the cloud after the uplink came back.
    for *_, stage, ts in rows:
        if cut <= ts <= back - 2.0:
            out.in_cut[stage] = out.in_cut.get(stage, 0) + 1
    out.offloads_in_cut = sum(out.in_cut.get(s, 0) for s in ("cloud", "fallback", "shed"))


def site_table(out: SiteRun) -> Table:
    table = Table(title="bridged site through a cut uplink")
    for col in (
        "devices", "samples", "rows", "lost", "dupes", "cut s", "rows in cut", "offloads in cut",
        "... at the edge", "cloud in cut", "bridge logins", "drained s after",
    ):  # fmt: skip
        table.add_column(col, justify="right")
    in_cut = sum(out.in_cut.values())
    edge = out.in_cut.get("fallback", 0) + out.in_cut.get("shed", 0)
    table.add_row(
        str(out.devices),
        f"{out.devices * out.samples_per_device:,}",
        f"{out.rows:,}",
        str(out.lost),
        str(out.duplicates),
        f"{out.cut_measured_s:.1f}",
        f"{in_cut:,}",
        f"{out.offloads_in_cut:,}",
        f"{edge:,}",
        str(out.in_cut.get("cloud", 0)),
        str(out.bridge_connections),
        "—" if out.drain_s is None else f"{out.drain_s:.1f}",
    )
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.site_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--devices", type=int, default=3, help="devices at the site (default %(default)s)")
    parser.add_argument("--samples", type=int, default=1200, help="samples per device (default %(default)s)")
    parser.add_argument("--rate", type=float, default=10.0, help="samples/s per device (default %(default)s)")
    parser.add_argument("--cut-at", type=float, default=30.0, help="s into the run (default %(default)s)")
    parser.add_argument("--cut-s", type=float, default=60.0, help="how long the uplink is cut (default 60)")
    parser.add_argument("--cells", type=int, default=1, help="cells behind HAProxy (default %(default)s)")
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--results", type=Path, default=Path("results/site"))
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if args.cut_at + args.cut_s >= args.samples / args.rate:
        parser.error("the cut must end before the run does: raise --samples or lower --cut-at/--cut-s")
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    args.results.mkdir(parents=True, exist_ok=True)
    out = run_site(args, console)
    Console(width=200).print(site_table(out))
    print(
        f"rows {out.rows:,}: lost {out.lost}, duplicates {out.duplicates}; while cut "
        f"({out.cut_measured_s:.1f} s): {dict(sorted(out.in_cut.items()))}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(asdict(out), indent=2) + "\n")
    return 0 if out.ok else 1


if __name__ == "__main__":
    sys.exit(main())
