"""Load mode: thousands of SIMULATED devices against one real Mosquitto, real cloud workers and the collector
into PostgreSQL; the edge compute is replayed from a recorded trace of the real cascade (bench/load_trace.py).

    .venv/bin/python -m bench.load_mode --devices 250 500 1000 2000 4000 --seconds 30 --rate-hz 0.5
    .venv/bin/python -m bench.load_mode --devices 100 --seconds 10 --json results/load.jsonl
    .venv/bin/python -m bench.load_mode --devices 1000 2000 --cells 3 --workers 1   # through HAProxy

For each device count: a fresh broker (one account per device), the collector (`edgecascade collect`) into a
fresh schema of a private PostgreSQL, `--workers` cloud workers (`edgecascade cloud`, models/fashion-mnist),
and the simulated devices (bench/load_devices.py, one process, one thread). Measured: connections held, the
broker's memory per connection (RSS after connecting minus before, over connections) and CPU, offloads/s,
replies/s, result records/s, the collector's rows/s and how long after the run it caught up, the offload
round trip p50/p99, fallbacks, and the row accounting (every record published is one row: lost, duplicates).
The driver's own lag (how late it ran each sample) says when the limit is the driver, not the broker.

The knee is the first device count where the median round trip is twice that of the smallest count, or the
p99 passes half the deadline, or 1 % of offloads fall back, or a row is lost, or a device did not connect
(`knee`). Exit 1 on a lost or duplicated row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import random
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional

from sqlalchemy import create_engine, text

from bench.load_devices import LoadDriver, SimDevice
from bench.load_trace import DEFAULT_TRACE, load_trace
from bench.proc_cpu import cpu_s
from bench.services import ServiceGroup
from broker.launcher import BrokerProcess, find_free_port
from protocol.mqtt import BrokerAddress
from protocol.topics import Topics
from results_db.stats import nearest_rank

logger = logging.getLogger(__name__)
MODELS = Path(__file__).resolve().parent.parent / "models" / "fashion-mnist"


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def _rows(db_url: str) -> Dict[str, int]:
    engine = create_engine(db_url)
    try:
        with engine.connect() as connection:
            row = connection.execute(
                text("SELECT COUNT(*), COUNT(DISTINCT (device_id, seq)) FROM inferences")
            ).one()
    finally:
        engine.dispose()
    return {"rows": int(row[0]), "distinct": int(row[1])}


def _wait_rows(db_url: str, expected: int, timeout_s: float) -> Dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        found = _rows(db_url)
        if found["rows"] >= expected or time.monotonic() > deadline:
            return {**found, "at_mono": time.monotonic()}
        time.sleep(0.25)  # polling a database count: there is no event to wait on


@dataclass
class Site:
    """Where the devices log in: one broker, or cells behind HAProxy; the broker processes to measure."""

    broker_pids: List[int]
    credentials: Callable[[str], BrokerAddress]
    kind: str


@contextlib.contextmanager
def one_broker(workdir: Path, names: List[str], db_url: str, args: argparse.Namespace) -> Iterator[Site]:
    """One Mosquitto, the collector and `args.workers` cloud workers, as production starts them."""
    broker = BrokerProcess(workdir / "broker")
    broker.add_users(names)  # written into the account file before start: one file, not 4,000 commands
    broker.start()
    services = ServiceGroup(workdir / "logs")
    try:
        services.start(
            "collector", ["collect", *services.login(broker.credentials("collector")), "--db", db_url]
        )
        for w in range(args.workers):
            services.start_cloud(
                f"cloud-{w}", broker.credentials("cloud"), args.models, f"w{w}", ["--threads", "1"]
            )
        assert broker.pid is not None
        yield Site([broker.pid], broker.credentials, "one Mosquitto")
    finally:
        services.close()
        broker.close()


@contextlib.contextmanager
def cells(workdir: Path, names: List[str], db_url: str, args: argparse.Namespace) -> Iterator[Site]:
    """`args.cells` cells behind HAProxy (cells/: `edgecascade cells plan` + `up`), each with its collector
    and `args.workers` workers, every collector into the same PostgreSQL schema."""
    from cells.plan import write_plan
    from cells.stack import CellStack

    port = find_free_port()
    plan = write_plan(
        workdir / "cells", cells=args.cells, port=port, workers_per_cell=args.workers, db=db_url,
        models=str(args.models), devices=names,
    )  # fmt: skip
    with CellStack(plan) as stack:
        pids = [b.pid for b in stack.brokers if b.pid is not None]
        yield Site(pids, stack.credentials, f"{args.cells} cells behind HAProxy")


def run_point(
    devices: int, args: argparse.Namespace, pg_url: Any, trace: Dict[str, Any], images: Any
) -> dict:
    from results_db.database import open_database
    from results_db.testing import fresh_schema

    workdir = Path(tempfile.mkdtemp(prefix=f"load-{devices}-"))
    db_url = fresh_schema(pg_url).render_as_string(hide_password=False)
    open_database(db_url).dispose()  # migrated before the collectors start
    tag = uuid.uuid4().hex[:6]
    names = [f"load-{tag}-{i:05d}" for i in range(devices)]
    setup = cells if args.cells else one_broker
    with setup(workdir, names, db_url, args) as site:
        rss_before = sum(map(_rss_kib, site.broker_pids))
        cpu_before = sum(map(cpu_s, site.broker_pids))
        driver = LoadDriver(
            trace, images, Topics(), rate_hz=args.rate_hz, deadline_s=args.deadline_s, flush_s=args.flush_s
        )
        try:
            rng = random.Random(devices)
            sims = [
                SimDevice(n, site.credentials(n), f"run-{n}", rng.randrange(len(trace["samples"])))
                for n in names
            ]
            connect_s = driver.connect(sims, per_second=args.connect_rate)
            rss_connected = sum(map(_rss_kib, site.broker_pids))
            held = driver.stats.connected
            start_mono = time.monotonic()
            run_s = driver.run(args.seconds)
            rss_peak = sum(map(_rss_kib, site.broker_pids))
            acked = driver.finish()
            end_mono = time.monotonic()
            held_at_end, disconnects = driver.stats.connected, driver.stats.disconnects  # before close()
            broker_cpu = (sum(map(cpu_s, site.broker_pids)) - cpu_before) / (end_mono - start_mono)
            stats = driver.stats
            found = _wait_rows(db_url, stats.records_published, args.drain_timeout_s)
        finally:
            driver.close()
    rtt = stats.rtt_ms
    return {
        "site": site.kind,
        "devices": devices,
        "rate_hz": args.rate_hz,
        "workers": args.workers,
        "seconds": round(run_s, 2),
        "connected": held,
        "held_at_end": held_at_end,
        "connect_s": round(connect_s, 2),
        "connect_failures": stats.connect_failures,
        "disconnects": disconnects,
        "broker_rss_mib": round(rss_connected / 1024, 1),
        "broker_kib_per_connection": round((rss_connected - rss_before) / max(1, held), 2),
        "broker_rss_peak_mib": round(rss_peak / 1024, 1),
        "broker_cpu": round(broker_cpu, 3),  # cores, all brokers together
        "samples_per_s": round(stats.samples / run_s, 1),
        "offloads_per_s": round(stats.offloads / run_s, 1),
        "replies_per_s": round(stats.replies / run_s, 1),
        "results_per_s": round(stats.records_acked / run_s, 1),
        "collector_rows_per_s": round(found["rows"] / (found["at_mono"] - start_mono), 1),
        "collector_behind_s": round(max(0.0, found["at_mono"] - end_mono), 2),
        "rtt_p50_ms": round(nearest_rank(rtt, 50), 2) if rtt else None,
        "rtt_p99_ms": round(nearest_rank(rtt, 99), 2) if rtt else None,
        "fallbacks": stats.fallbacks,
        "fallback_fraction": round(stats.fallbacks / max(1, stats.offloads), 4),
        "refusals": stats.refusals,
        "driver_lag_p99_ms": round(nearest_rank(stats.lag_ms, 99), 1) if stats.lag_ms else None,
        "records_published": stats.records_published,
        "all_acked": acked,
        "rows": found["rows"],
        "lost": stats.records_published - found["distinct"],
        "duplicates": found["rows"] - found["distinct"],
        "host_load_1m": round(os.getloadavg()[0], 1),  # a shared host: how busy it was at the end
    }


def knee(points: List[dict], deadline_s: float = 2.0) -> Optional[int]:
    """The first device count where latency or loss starts: the median round trip twice the smallest
    count's (p50, not p99: on a shared host one stall moves a p99), the p99 past half the deadline, more
    than 1 % of offloads fallen back, a row lost, or a device not connected."""
    base = next((p["rtt_p50_ms"] for p in points if p["rtt_p50_ms"]), None)
    for p in points:
        p50, p99 = p["rtt_p50_ms"], p["rtt_p99_ms"]
        slow = base is not None and p50 is not None and p50 > 2 * base
        late = p99 is not None and p99 > 500.0 * deadline_s
        if slow or late or p["fallback_fraction"] > 0.01 or p["lost"] > 0 or p["connected"] < p["devices"]:
            return int(p["devices"])
    return None


COLUMNS = [
    ("devices", "devices"), ("connected", "held"), ("broker_kib_per_connection", "KiB/conn"),
    ("broker_cpu", "broker cpu"), ("offloads_per_s", "offl/s"), ("replies_per_s", "repl/s"),
    ("results_per_s", "results/s"), ("collector_rows_per_s", "rows/s"), ("rtt_p50_ms", "rtt p50"),
    ("rtt_p99_ms", "rtt p99"), ("fallback_fraction", "fallback"), ("driver_lag_p99_ms", "lag p99"),
    ("lost", "lost"), ("duplicates", "dup"),
]  # fmt: skip


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--devices", type=int, nargs="+", default=[250, 500, 1000, 2000, 4000])
    parser.add_argument("--seconds", type=float, default=30.0, help="sampling time per device count")
    parser.add_argument("--rate-hz", type=float, default=0.5, help="samples per second per device")
    parser.add_argument(
        "--workers", type=int, default=2, help="cloud workers (shared subscription; per cell with --cells)"
    )
    parser.add_argument("--cells", type=int, default=0, help="N cells behind HAProxy instead of one broker")
    parser.add_argument("--deadline-s", type=float, default=2.0, help="offload deadline: then fallback")
    parser.add_argument(
        "--flush-s", type=float, default=2.0, help="a device sends its results every this often (or 50)"
    )
    parser.add_argument("--connect-rate", type=float, default=400.0, help="new connections per second")
    parser.add_argument("--drain-timeout-s", type=float, default=60.0)
    parser.add_argument("--trace", type=Path, default=DEFAULT_TRACE)
    parser.add_argument("--models", type=Path, default=MODELS)
    parser.add_argument("--json", type=Path, help="append one JSON line per device count")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from device_agent.sources import load_idx_dataset
    from results_db.testing import PrivatePostgres

    trace = load_trace(args.trace)
    images, _ = load_idx_dataset("fashion-mnist", "test", limit=1 + max(e["i"] for e in trace["samples"]))
    server = PrivatePostgres().start()
    points = []
    try:
        for devices in args.devices:
            point = run_point(devices, args, server.url, trace, images)
            points.append(point)
            print(json.dumps(point), file=sys.stderr)
            if args.json:
                with args.json.open("a") as out:
                    out.write(json.dumps(point) + "\n")
    finally:
        server.stop()
    where = f"{args.cells} cells behind HAProxy" if args.cells else "one Mosquitto"
    print(f"load mode (SIMULATED devices replaying {args.trace.name}), {args.rate_hz} Hz each, "
          f"{args.workers} workers{' per cell' if args.cells else ''}, {args.seconds:.0f} s per point, "
          f"{where}, PostgreSQL")  # fmt: skip
    print("  ".join(f"{title:>10}" for _, title in COLUMNS))
    for p in points:
        print("  ".join(f"{'-' if p[k] is None else p[k]:>10}" for k, _ in COLUMNS))
    found = knee(points, args.deadline_s)
    print(f"knee: {found if found is not None else 'not reached'} devices")
    return 1 if any(p["lost"] or p["duplicates"] for p in points) else 0


if __name__ == "__main__":
    sys.exit(main())
