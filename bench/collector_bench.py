"""Collector throughput: result rows per second committed to SQLite, through a real Mosquitto.

    .venv/bin/python -m bench.collector_bench                      # 200,000 rows, prints a table
    .venv/bin/python -m bench.collector_bench --records 50000 --db postgresql+psycopg://postgres@127.0.0.1/test
    .venv/bin/python -m bench.collector_bench --records 50000 --postgres   # a private PostgreSQL of its own
    .venv/bin/python -m bench.collector_bench --postgres --separate-publisher   # live: devices apart

Three figures:
- db:     RecordWriter alone (validated records → one transaction per batch), no MQTT: the database's ceiling;
- live:   devices publish batched records (QoS 1) while the collector runs: first publish → last commit;
- drain:  the records wait in the collector's persistent session while it is stopped; rows/s from start()
          returning until the last commit (a collector catching up after a restart).
The target on the 2-core development machine is >= 20,000 rows/s for live and drain, into SQLite and (issue
19) into PostgreSQL. `--postgres` starts a private server (results_db.testing.PrivatePostgres: fsync off, as
in the tests) and gives each measurement a fresh schema.

Beside each rate: the CPU each part used per 1,000 rows in the timed window (from /proc): the collector's two
threads (paho's network thread: decode and validate; the writer), the publishing devices, Mosquitto and,
with `--postgres`, the PostgreSQL server; and rows per collector CPU-second. On a shared 2-core host the
rate is what was left of the CPU; the CPU per row is what the collector costs.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import statistics
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

from bench.proc_cpu import cpu_s, threads_cpu_s, tree_cpu_s
from broker.launcher import BrokerProcess
from protocol.codec import decode_records, encode_records
from protocol.mqtt import new_client
from protocol.records import validate_record
from protocol.topics import Topics
from results_db import Collector, CollectorConfig, RecordWriter, open_database
from results_db.collector import Committed
from results_db.synthetic import inference_records, run_record

TARGET_ROWS_S = 20_000
PARTS = ("network", "writer", "publishers", "broker", "postgres")  # CPU columns, see the docstring


@dataclass
class Figure:
    """One measurement: rows/s, and CPU seconds per part in its timed window."""

    rows: int
    seconds: float
    cpu_s: Dict[str, float] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        return self.rows / self.seconds

    def ms_per_1000(self, part: str) -> Optional[float]:
        used = self.cpu_s.get(part)
        return None if used is None else used * 1e6 / self.rows


class CpuWindow:
    """CPU of the collector's threads, Mosquitto and PostgreSQL between `start()` and `stop()`."""

    def __init__(self, broker: BrokerProcess, collector_id: str, postgres_pid: Optional[int]) -> None:
        self.threads = {"network": f"paho-mqtt-client-{collector_id}", "writer": "collector-writer"}
        self.parts: Dict[str, Callable[[], float]] = {"broker": lambda: cpu_s(broker.pid or 0)}
        if postgres_pid is not None:
            self.parts["postgres"] = lambda: tree_cpu_s(postgres_pid)
        self._before: Dict[str, float] = {}

    def _now(self) -> Dict[str, float]:
        by_name = threads_cpu_s(self.threads.values())
        now = {part: by_name.get(name, 0.0) for part, name in self.threads.items()}
        now.update({part: read() for part, read in self.parts.items()})
        now["process"] = time.process_time()
        return now

    def start(self) -> None:
        self._before = self._now()

    def stop(self) -> Dict[str, float]:
        after = self._now()
        return {part: after[part] - self._before[part] for part in after}


class _Committed:
    """A commit observer: the time the collector committed its `rows`-th row (no polling of its stats)."""

    def __init__(self, rows: int) -> None:
        self.rows, self.inserted = rows, 0
        self.at = 0.0
        self.done = threading.Event()

    def __call__(self, committed: Committed) -> None:
        self.inserted += committed.counts.inserted
        if self.inserted >= self.rows and not self.done.is_set():
            self.at = time.perf_counter()
            self.done.set()

    def wait(self, timeout_s: float = 300.0) -> float:
        if not self.done.wait(timeout_s):
            raise RuntimeError(f"only {self.inserted} of {self.rows} rows after {timeout_s}s")
        return self.at


def _payloads(devices: List[str], records: int, per_message: int, tag: str) -> Dict[str, List[bytes]]:
    """Encoded result batches per device: a run record, then the device's share of inference records."""
    share = records // len(devices)
    out = {}
    for dev in devices:
        # Stamped now, as a live fleet's rows are: on PostgreSQL they land in today's partition (0008).
        now = time.time()
        rows = [run_record(f"{tag}-{dev}", dev)] + inference_records(f"{tag}-{dev}", dev, share, ts_start=now)
        out[dev] = [encode_records(rows[i : i + per_message]) for i in range(0, len(rows), per_message)]
    return out


def _publish_all(
    broker: BrokerProcess, topics: Topics, payloads: Dict[str, List[bytes]], go: Any = None
) -> None:
    """One MQTT client per device, publishing concurrently with QoS 1 (once `go` is set, when given: every
    client connected first); returns when all are PUBACKed."""
    addresses = {
        dev: broker.credentials(dev) for dev in payloads
    }  # client id = device id: the broker binds it
    _publish(addresses, topics, payloads, None, go)


def _publish(
    addresses: Dict[str, Any],
    topics: Topics,
    payloads: Dict[str, List[bytes]],
    ready: Any,
    go: Any,
    cpu_used: Any = None,
) -> None:
    """`cpu_used` (a shared double): set to the CPU seconds this process used from `go` to the last PUBACK."""
    clients = {}
    for dev, address in addresses.items():
        client = new_client(address, dev)
        client.connect(address.host, address.port)
        client.loop_start()
        clients[dev] = client
    if ready is not None:
        ready.set()
    if go is not None:
        go.wait(60)
    began = os.times()

    def one(dev: str) -> None:
        client = clients[dev]
        infos = [client.publish(topics.results(dev), p, qos=1) for p in payloads[dev]]
        for info in infos:
            info.wait_for_publish(60)
        client.disconnect()
        client.loop_stop()

    threads = [threading.Thread(target=one, args=(dev,)) for dev in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if cpu_used is not None:
        ended = os.times()
        cpu_used.value = (ended.user + ended.system) - (began.user + began.system)


def _publish_elsewhere(
    broker: BrokerProcess, topics: Topics, payloads: Dict[str, List[bytes]], window: CpuWindow
) -> Tuple[float, float]:
    """The devices in a process of their own (as a fleet's are: not sharing the collector's GIL), connected
    before the clock starts; (the start time once they begin to publish, their CPU seconds), after they
    finished. `window` is started with the clock."""
    context = multiprocessing.get_context("spawn")
    ready, go, used = context.Event(), context.Event(), context.Value("d", 0.0)
    addresses = {dev: broker.credentials(dev) for dev in payloads}
    child = context.Process(target=_publish, args=(addresses, topics, payloads, ready, go, used), daemon=True)
    child.start()
    if not ready.wait(60):
        child.kill()
        raise RuntimeError("the publishing process did not connect within 60 s")
    window.start()
    start = time.perf_counter()
    go.set()
    child.join(300)
    if child.exitcode != 0:
        raise RuntimeError(f"the publishing process failed (exit {child.exitcode})")
    return start, used.value


def bench_db(db_url: str, records: int, batch: int, postgres_pid: Optional[int] = None) -> Figure:
    """Decode + validate + RecordWriter.write alone (the collector's work minus MQTT), in this thread."""
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    payloads = _payloads(["dev-db"], records, batch, f"db-{uuid.uuid4().hex[:6]}")["dev-db"]
    postgres = (lambda: tree_cpu_s(postgres_pid)) if postgres_pid is not None else (lambda: 0.0)
    pg_before, before = postgres(), time.process_time()
    start = time.perf_counter()
    for payload in payloads:
        rows = [validate_record(r) for r in decode_records(payload)]
        writer.write(rows)
    elapsed = time.perf_counter() - start
    cpu = {"writer": time.process_time() - before}
    if postgres_pid is not None:
        cpu["postgres"] = postgres() - pg_before
    engine.dispose()
    return Figure(records, elapsed, cpu)


def bench_live(broker: BrokerProcess, db_url: str, args: argparse.Namespace, batch_size: int) -> Figure:
    topics = Topics.namespaced(f"bench{uuid.uuid4().hex[:6]}")
    devices = [f"bench-dev-{i}" for i in range(args.devices)]
    payloads = _payloads(devices, args.records, args.per_message, f"live-{uuid.uuid4().hex[:6]}")
    rows = args.records // args.devices * args.devices
    config = CollectorConfig(
        broker.credentials("collector"), topics, db_url, batch_size=batch_size, flush_ms=args.flush_ms,
        client_id=f"bench-live-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    collector, committed = Collector(config), _Committed(rows)
    collector.observers.append(committed)
    window = CpuWindow(broker, config.client_id, args.postgres_pid)
    with collector:
        if args.separate_publisher:
            start, publishers = _publish_elsewhere(broker, topics, payloads, window)
        else:
            window.start()
            start = time.perf_counter()
            _publish_all(broker, topics, payloads)
        end = committed.wait()
        cpu = window.stop()
    if not args.separate_publisher:  # the publishers ran in this process: all but the collector's threads
        publishers = cpu["process"] - cpu["network"] - cpu["writer"]
    cpu["publishers"] = publishers
    return Figure(rows, end - start, cpu)


def bench_drain(broker: BrokerProcess, db_url: str, args: argparse.Namespace, batch_size: int) -> Figure:
    topics = Topics.namespaced(f"bench{uuid.uuid4().hex[:6]}")
    devices = [f"bench-dev-{i}" for i in range(args.devices)]
    payloads = _payloads(devices, args.records, args.per_message, f"drain-{uuid.uuid4().hex[:6]}")
    rows = args.records // args.devices * args.devices
    config = CollectorConfig(
        broker.credentials("collector"), topics, db_url, batch_size=batch_size, flush_ms=args.flush_ms,
        client_id=f"bench-drain-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    Collector(config).start().stop()  # creates the persistent session, then goes away
    _publish_all(broker, topics, payloads)  # queued by the broker for the absent collector
    collector, committed = Collector(config), _Committed(rows)
    collector.observers.append(committed)
    window = CpuWindow(broker, config.client_id, args.postgres_pid)
    # From before start(): the broker delivers the backlog as soon as the collector subscribes.
    window.start()
    start = time.perf_counter()
    collector.start()
    try:
        end = committed.wait()
        cpu = window.stop()
    finally:
        collector.stop()
    cpu["publishers"] = 0.0
    return Figure(rows, end - start, cpu)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--records", type=int, default=200_000, help="result rows per measurement")
    parser.add_argument(
        "--per-message", type=int, default=500, help="records per MQTT message (device batch)"
    )
    parser.add_argument("--devices", type=int, default=4, help="publishing devices")
    parser.add_argument(
        "--batch-sizes", type=int, nargs="+", default=[500, 5000], help="collector batch sizes"
    )
    parser.add_argument("--flush-ms", type=float, default=200.0)
    parser.add_argument("--repeat", type=int, default=1, help="repetitions (the median is printed)")
    parser.add_argument(
        "--separate-publisher",
        action="store_true",
        help="live: the devices publish from a process of their own (not sharing the collector's GIL)",
    )
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--db", help="database URL (default: a fresh SQLite file per measurement)")
    where.add_argument(
        "--postgres", action="store_true", help="a private PostgreSQL server, a fresh schema per measurement"
    )
    args = parser.parse_args(argv)
    args.postgres_pid = None
    if args.postgres:
        from results_db.testing import PrivatePostgres, fresh_schema

        server = PrivatePostgres().start()
        try:
            base = server.url
            args.db = None
            args.postgres_pid = server.pid
            args.schema = lambda: fresh_schema(base).render_as_string(hide_password=False)
            return _run(args)
        finally:
            server.stop()
    args.schema = None
    return _run(args)


def _run(args: argparse.Namespace) -> int:

    workdir = Path(tempfile.mkdtemp(prefix="collector-bench-"))
    counter = iter(range(1_000_000))

    def db_url() -> str:
        if args.schema is not None:
            return str(args.schema())
        return args.db or str(workdir / f"bench-{next(counter)}.db")

    results = []
    load_before = os.getloadavg()
    with BrokerProcess(workdir / "broker") as broker:
        broker.add_users([f"bench-dev-{i}" for i in range(args.devices)])
        for batch_size in args.batch_sizes:
            figures = {
                "db": [
                    bench_db(db_url(), args.records, batch_size, args.postgres_pid)
                    for _ in range(args.repeat)
                ],
                "live": [bench_live(broker, db_url(), args, batch_size) for _ in range(args.repeat)],
                "drain": [bench_drain(broker, db_url(), args, batch_size) for _ in range(args.repeat)],
            }
            for kind, values in figures.items():
                results.append((kind, batch_size, values))
    backend = "SQLite file (WAL, synchronous=NORMAL)" if not args.db else args.db.split("://")[0]
    if args.schema is not None:
        backend = "private PostgreSQL (fsync off)"
    where = "a process of their own" if args.separate_publisher else "the collector's process"
    print(f"collector throughput: {args.records} rows, {args.per_message} records/message, "
          f"{args.devices} devices publishing from {where}, {backend}; medians of {args.repeat}")  # fmt: skip
    print(f"load average before {load_before[0]:.1f}, after {os.getloadavg()[0]:.1f} (1 min)")
    print(f"{'measurement':<12}{'batch':>7}{'rows/s':>9}  {'target':<7}"
          + "".join(f"{part:>11}" for part in PARTS) + f"{'rows/collector-CPU-s':>22}")  # fmt: skip
    legend = "CPU ms per 1,000 rows (network, writer: the collector's two threads)"
    print(f"{'':<37}{legend:^55}")
    ok = True
    for kind, batch_size, values in results:
        rate = statistics.median(f.rate for f in values)
        meets = rate >= TARGET_ROWS_S
        ok &= meets or kind == "db" or bool(args.db)  # set for SQLite and the private PostgreSQL
        cells = []
        for part in PARTS:
            used = [f.ms_per_1000(part) for f in values]
            known = [u for u in used if u is not None]
            cells.append(f"{statistics.median(known):>11.1f}" if known else f"{'-':>11}")
        own = [f.rows / c for f in values if (c := f.cpu_s.get("network", 0.0) + f.cpu_s["writer"]) > 0]
        per_cpu = f"{statistics.median(own):>22,.0f}" if own else f"{'-':>22}"
        verdict = "ok" if meets else "BELOW"
        print(f"{kind:<12}{batch_size:>7}{rate:>9,.0f}  {verdict:<7}{''.join(cells)}{per_cpu}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
