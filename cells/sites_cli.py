"""CLI for `edgecascade sites`: plan site brokers bridged to the cells, start them locally."""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

HELP = "Edge sites: a Mosquitto per site gateway, bridged to its cloud cell"
DESCRIPTION = (
    "A site broker on each edge gateway, bridged (Mosquitto's own bridge: MQTT 5, QoS 1, persistent sessions "
    "both ends, so each side queues while the uplink is cut) to the cells of a `cells plan`; the site's "
    "devices talk to their site broker only and keep answering at the edge while the uplink is down."
)
EPILOG = """examples:
  edgecascade cells plan --cells 3 --out build/cells
  edgecascade sites plan --cells-dir build/cells --sites 2 --devices-per-site 5 --out build/sites
  edgecascade cells up build/cells &            # the cells first (the bridges log in to them)
  edgecascade sites up build/sites              # site-0 on 127.0.0.1:12883, site-1 on :12884
  edgecascade agent --broker 127.0.0.1:12883 --device-id site-0-dev-000 \\
      --password-file build/sites/site-0/devices/site-0-dev-000.pw --source dataset:fashion-mnist:test:1000
Plan the sites before `cells up` (each bridge's account is written into its cell's account file).
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="sites_command", metavar="ACTION", required=True)
    plan = sub.add_parser(
        "plan", help="write each site broker's config and bridge", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    plan.add_argument("--cells-dir", type=Path, required=True, help="the cells' plan (`cells plan --out`)")
    plan.add_argument("--out", type=Path, required=True, help="directory to write (must not hold a plan)")
    plan.add_argument("--sites", type=int, default=1, help="number of sites site-0... (default %(default)s)")
    plan.add_argument(
        "--site", action="append", default=[], metavar="NAME", help="a site by name (repeatable)"
    )
    plan.add_argument(
        "--devices-per-site", type=int, default=5, help="device accounts per site (default %(default)s)"
    )
    plan.add_argument("--host", default="127.0.0.1", help="the site brokers' address (default %(default)s)")
    plan.add_argument(
        "--port", type=int, default=12883, help="site i listens on port+i (default %(default)s)"
    )
    plan.add_argument(
        "--remote", metavar="HOST:PORT", help="where the bridges connect (default: the cells' HAProxy)"
    )
    up = sub.add_parser("up", help="start the planned site brokers until Ctrl-C (the cells must be up)")
    up.add_argument("dir", type=Path, help="the sites' plan directory")


def run(args: argparse.Namespace) -> int:
    from cells.plan import CellsPlan, PlanError
    from cells.sites import GATEWAY_USER, SitesPlan, write_sites
    from protocol.ids import InvalidId

    try:
        if args.sites_command == "plan":
            names = list(args.site) or [f"site-{i}" for i in range(args.sites)]
            remote = None
            if args.remote:
                host, _, port = args.remote.rpartition(":")
                if not host or not port.isdigit():
                    raise PlanError(f"--remote {args.remote!r}: expected HOST:PORT")
                remote = (host, int(port))
            plan = write_sites(
                args.out,
                CellsPlan.load(args.cells_dir),
                sites=names,
                devices_per_site=args.devices_per_site,
                host=args.host,
                port=args.port,
                remote=remote,
            )
            print(f"wrote {plan.directory}: bridges to {plan.remote[0]}:{plan.remote[1]}")
            for site in plan.sites:
                print(
                    f"  {site.name}: Mosquitto on {site.host}:{site.port}, {len(site.devices())} device(s), "
                    f"bridged as {site.bridge_account} (lands in cell-{site.cell})"
                )
                print(
                    f"    its fault gateway: edgecascade fault gateway --broker {site.host}:{site.port} "
                    f"--user {GATEWAY_USER} --password-file {site.gateway_password_file(GATEWAY_USER)} "
                    f"--forward-device {site.forward_device} "
                    f"--forward-password-file {site.gateway_password_file(site.forward_device)}"
                    + (f" --namespace {plan.namespace}" if plan.namespace else "")
                )
            print(
                f"start them (after `edgecascade cells up {args.cells_dir}`): edgecascade sites up {args.out}"
            )
            return 0
        sites = SitesPlan.load(args.dir)
    except (PlanError, InvalidId, RuntimeError) as exc:
        print(f"edgecascade sites: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    brokers = []
    try:
        for site in sites.sites:
            brokers.append(site.broker().start())
        print(json.dumps({s.name: f"{s.host}:{s.port}" for s in sites.sites}), flush=True)
        print("up; Ctrl-C stops the site brokers", file=sys.stderr)
        stop.wait()
    except RuntimeError as exc:
        print(f"edgecascade sites up: {exc}", file=sys.stderr)
        return 1
    finally:
        for broker in brokers:
            broker.stop()
    return 0
