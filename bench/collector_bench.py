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
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

from broker.launcher import BrokerProcess
from protocol.codec import decode_records, encode_records
from protocol.mqtt import new_client
from protocol.records import validate_record
from protocol.topics import Topics
from results_db import Collector, CollectorConfig, RecordWriter, open_database
from results_db.synthetic import inference_records, run_record

TARGET_ROWS_S = 20_000


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
    addresses: Dict[str, Any], topics: Topics, payloads: Dict[str, List[bytes]], ready: Any, go: Any
) -> None:
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


def _publish_elsewhere(broker: BrokerProcess, topics: Topics, payloads: Dict[str, List[bytes]]) -> float:
    """The devices in a process of their own (as a fleet's are: not sharing the collector's GIL), connected
    before the clock starts; returns the start time once they begin to publish, after they finished."""
    context = multiprocessing.get_context("spawn")
    ready, go = context.Event(), context.Event()
    addresses = {dev: broker.credentials(dev) for dev in payloads}
    child = context.Process(target=_publish, args=(addresses, topics, payloads, ready, go), daemon=True)
    child.start()
    if not ready.wait(60):
        child.kill()
        raise RuntimeError("the publishing process did not connect within 60 s")
    start = time.perf_counter()
    go.set()
    child.join(300)
    if child.exitcode != 0:
        raise RuntimeError(f"the publishing process failed (exit {child.exitcode})")
    return start


def _wait_rows(collector: Collector, rows: int, timeout_s: float = 300.0) -> float:
    deadline = time.monotonic() + timeout_s
    while collector.stats["inserted"] < rows:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {collector.stats['inserted']} of {rows} rows after {timeout_s}s")
        time.sleep(0.002)
    return time.perf_counter()


def bench_db(db_url: str, records: int, batch: int) -> float:
    """Rows/s of decode + validate + RecordWriter.write alone (the collector's work minus MQTT)."""
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    payloads = _payloads(["dev-db"], records, batch, f"db-{uuid.uuid4().hex[:6]}")["dev-db"]
    start = time.perf_counter()
    for payload in payloads:
        rows = [validate_record(r) for r in decode_records(payload)]
        writer.write(rows)
    elapsed = time.perf_counter() - start
    engine.dispose()
    return records / elapsed


def bench_live(broker: BrokerProcess, db_url: str, args: argparse.Namespace, batch_size: int) -> float:
    topics = Topics.namespaced(f"bench{uuid.uuid4().hex[:6]}")
    devices = [f"bench-dev-{i}" for i in range(args.devices)]
    payloads = _payloads(devices, args.records, args.per_message, f"live-{uuid.uuid4().hex[:6]}")
    rows = args.records // args.devices * args.devices
    config = CollectorConfig(
        broker.credentials("collector"), topics, db_url, batch_size=batch_size, flush_ms=args.flush_ms,
        client_id=f"bench-live-{uuid.uuid4().hex[:6]}",
    )  # fmt: skip
    with Collector(config) as collector:
        if args.separate_publisher:
            start = _publish_elsewhere(broker, topics, payloads)
        else:
            start = time.perf_counter()
            _publish_all(broker, topics, payloads)
        end = _wait_rows(collector, rows)
    return rows / (end - start)


def bench_drain(broker: BrokerProcess, db_url: str, args: argparse.Namespace, batch_size: int) -> float:
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
    collector = Collector(config).start()
    start = time.perf_counter()
    try:
        end = _wait_rows(collector, rows)
    finally:
        collector.stop()
    return rows / (end - start)


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
    if args.postgres:
        from results_db.testing import PrivatePostgres, fresh_schema

        server = PrivatePostgres().start()
        try:
            base = server.url
            args.db = None
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
    with BrokerProcess(workdir / "broker") as broker:
        broker.add_users([f"bench-dev-{i}" for i in range(args.devices)])
        for batch_size in args.batch_sizes:
            figures = {
                "db": [bench_db(db_url(), args.records, batch_size) for _ in range(args.repeat)],
                "live": [bench_live(broker, db_url(), args, batch_size) for _ in range(args.repeat)],
                "drain": [bench_drain(broker, db_url(), args, batch_size) for _ in range(args.repeat)],
            }
            for kind, values in figures.items():
                results.append((kind, batch_size, statistics.median(values)))
    backend = "SQLite file (WAL, synchronous=NORMAL)" if not args.db else args.db.split("://")[0]
    if args.schema is not None:
        backend = "private PostgreSQL (fsync off)"
    print(f"collector throughput: {args.records} rows, {args.per_message} records/message, "
          f"{args.devices} devices, {backend}")  # fmt: skip
    print(f"{'measurement':<12}{'batch':>8}{'rows/s':>12}  target {TARGET_ROWS_S}")
    ok = True
    for kind, batch_size, rate in results:
        meets = rate >= TARGET_ROWS_S
        ok &= meets or kind == "db" or bool(args.db)  # set for SQLite and the private PostgreSQL
        print(f"{kind:<12}{batch_size:>8}{rate:>12,.0f}  {'ok' if meets else 'BELOW'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
