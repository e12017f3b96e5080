"""CLI for `edgecascade cloud`: one cloud worker of the shared group, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import socket
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict

from edgecascade.metrics import add_metrics_arguments

logger = logging.getLogger(__name__)

EPILOG = """examples:
  edgecascade cloud --broker 127.0.0.1:1883 --user cloud --password-file /etc/edgecascade/cloud.pw \\
      --models models/fashion-mnist --worker-id w1

  # REACT's cloud detector for video frames
  edgecascade cloud --broker 127.0.0.1:1883 --user cloud --password-file cloud.pw \\
      --task detect --models models/video-fmnist
  edgecascade cloud --broker broker.lan:8883 --tls-ca ca.crt --user cloud --password-file cloud.pw \\
      --max-batch 64 --max-wait-ms 5 --providers CUDAExecutionProvider CPUExecutionProvider
  # Prometheus metrics (replies, refusals by reason, service time, queue wait) on :9102/metrics
  edgecascade cloud ... --worker-id w1 --metrics-port 9102
  # keep what it answers (the newest 20,000, at most a day old) for `edgecascade adapt`
  edgecascade cloud ... --keep-inputs /var/lib/edgecascade/kept.db

Start as many as you like (distinct --worker-id): the broker shares the offloads among them.
QoS 0 offloads are refused; each device gets a fair share of --max-queue; an offload waits at most
--max-expiry-s (also one without MessageExpiryInterval). A login the broker refuses for good (bad
password, not authorized, banned, client id refused) exits with status 2 and says why; other connection
failures are retried with backoff. Each worker publishes its load (queue, service time, capacity,
busy) retained on <root>/@cloud/<worker-id>/load every --load-interval-s, cleared when it stops or dies;
its final stats line (JSON) carries busy_s, wall_s and busy = busy_s / (wall_s x streams).
"""


HELP = "Run a cloud worker (shared subscription, micro-batching)"
DESCRIPTION = "Run a cloud worker: answer offloaded samples with the cloud model, micro-batched."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument("--broker", default="127.0.0.1:1883", help="host:port (default %(default)s)")
    parser.add_argument("--user", default="cloud", help="broker username (default %(default)s)")
    parser.add_argument(
        "--password-file", type=Path, required=True, help="file whose first line is the password"
    )
    parser.add_argument("--tls-ca", help="CA certificate: connect over TLS and verify the broker with it")
    parser.add_argument(
        "--models", type=Path, default=Path("models/fashion-mnist"), help="model dir or a .onnx file"
    )
    parser.add_argument(
        "--task",
        choices=["classify", "detect"],
        default="classify",
        help="classify: the cascade's offloads; detect: REACT's video frames (--models models/video-fmnist)",
    )
    parser.add_argument("--worker-id", default=None, help="unique name in replies (default host-pid)")
    parser.add_argument("--namespace", default=None, help="topic namespace (tests, staging)")
    parser.add_argument("--max-batch", type=int, default=32, help="largest micro-batch (default %(default)s)")
    parser.add_argument(
        "--max-wait-ms", type=float, default=2.0, help="longest wait to fill a batch (default %(default)s)"
    )
    parser.add_argument(
        "--receive-maximum", type=int, default=0, help="unacked offloads in flight to us (0: 4 batches)"
    )
    parser.add_argument(
        "--max-queue",
        type=int,
        default=0,
        help="offloads queued here at most, shared fairly among devices (0: 64 MiB of them, at most 4096)",
    )
    parser.add_argument(
        "--max-expiry-s", type=float, default=30.0, help="longest an offload may wait (default %(default)s)"
    )
    parser.add_argument(
        "--load-interval-s",
        type=float,
        default=0.5,
        help="publish this worker's load (queue, service time, capacity, busy) retained on "
        "<root>/@cloud/<worker-id>/load every N s, for devices to plan offloads on (0: never; "
        "default %(default)s)",
    )
    parser.add_argument("--providers", nargs="+", default=["CPUExecutionProvider"], help="onnxruntime EPs")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="onnxruntime intra-op threads (default: all cores; 1 with --streams)",
    )
    parser.add_argument(
        "--streams",
        type=int,
        default=1,
        help="batches computed at once, each on its own thread (default %(default)s; on a small shared box "
        "2 with --threads 1 waits less than 1 with 2 threads: bench/offload_bench.py)",
    )
    parser.add_argument("--meters", nargs="*", default=[], help="metering backends, first that works")
    parser.add_argument("--idle-seconds", type=float, default=0.0, help="idle baseline before serving")
    parser.add_argument("--stats-interval", type=float, default=60.0, help="log stats every N s (0: never)")
    keep = parser.add_argument_group("keeping answered inputs for `edgecascade adapt` (opt-in)")
    keep.add_argument(
        "--keep-inputs", type=Path, metavar="FILE.db", help="keep each answered offload in this SQLite file"
    )
    keep.add_argument(
        "--keep-max", type=int, default=20_000, help="kept inputs at most (default %(default)s)"
    )
    keep.add_argument(
        "--keep-max-age-h",
        type=float,
        default=24.0,
        help="drop kept inputs older than this (default %(default)s h)",
    )
    add_metrics_arguments(parser, "this worker")


def run(args: argparse.Namespace) -> int:
    from cloud_worker.model import ModelError
    from cloud_worker.worker import CloudWorker, WorkerConfig
    from edgecascade.metrics import check_metrics_port
    from protocol.mqtt import BrokerAddress, read_secret
    from protocol.topics import Topics

    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    try:
        check_metrics_port(args.metrics_port)
        password = read_secret(args.password_file)
        broker = BrokerAddress.parse(args.broker, args.user, password, args.tls_ca)
        topics = Topics.namespaced(args.namespace) if args.namespace else Topics()
        config = WorkerConfig(
            broker=broker,
            topics=topics,
            model_path=args.models,
            task=args.task,
            worker_id=worker_id,
            max_batch=args.max_batch,
            max_wait_ms=args.max_wait_ms,
            providers=args.providers,
            meters=args.meters,
            idle_seconds=args.idle_seconds,
            threads=args.threads,
            streams=args.streams,
            receive_maximum=args.receive_maximum,
            max_queue=args.max_queue,
            max_expiry_s=args.max_expiry_s,
            load_interval_s=args.load_interval_s,
        )
    except ValueError as exc:
        print(f"edgecascade cloud: {exc}", file=sys.stderr)
        return 2
    try:
        worker = CloudWorker(config)
        keeper = _keeper(args)
    except (ModelError, ValueError, OSError, sqlite3.Error) as exc:
        print(f"cannot start the cloud worker: {exc}", file=sys.stderr)
        return 2
    if keeper is not None:
        worker.observers.append(keeper.observe)
    stop = threading.Event()

    def _on_signal(signum: int, frame: Any) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    try:
        server = _serve_metrics(worker, args)
    except OSError as exc:  # the port is taken, or the address is not this host's
        print(
            f"edgecascade cloud: metrics on {args.metrics_host}:{args.metrics_port}: {exc}", file=sys.stderr
        )
        return 2
    try:
        return _serve(worker, worker_id, args, stop, keeper)
    finally:
        if server is not None:
            server.close()
        if keeper is not None:
            keeper.close()


def _keeper(args: argparse.Namespace) -> Any:
    """The store of answered inputs (`--keep-inputs`), or None."""
    if args.keep_inputs is None:
        return None
    from cloud_worker.keep import InputKeeper

    return InputKeeper(args.keep_inputs, args.keep_max, args.keep_max_age_h * 3600.0)


def _serve_metrics(worker: Any, args: argparse.Namespace) -> Any:
    """The worker's metrics endpoint (`--metrics-port`), or None."""
    if args.metrics_port is None:
        return None
    from cloud_worker.metrics import WorkerMetrics
    from edgecascade.metrics import serve_metrics

    return serve_metrics(WorkerMetrics(worker).registry, args.metrics_host, args.metrics_port)


def _serve(worker: Any, worker_id: str, args: argparse.Namespace, stop: threading.Event, keeper: Any) -> int:
    from cloud_worker.worker import LoginRefused

    def stats() -> Dict[str, Any]:
        kept = {} if keeper is None else {"kept_inputs": keeper.kept, "keep_failed": keeper.failed}
        return {**worker.stats, **kept}

    try:
        worker.start()
    except LoginRefused as exc:
        print(f"edgecascade cloud: {exc}", file=sys.stderr)
        return 2
    except TimeoutError as exc:
        print(str(exc), file=sys.stderr)
        return 1
    print(f"worker {worker_id} ready", flush=True)  # a line supervisors and tests can wait for
    next_stats = time.monotonic() + args.stats_interval
    while not stop.wait(1.0):
        if not worker.running:
            if worker.fatal is not None:
                print(f"edgecascade cloud: {worker.fatal}", file=sys.stderr)
                return 2
            print(
                "cloud worker thread died (see the log); exiting for the supervisor to restart",
                file=sys.stderr,
            )
            return 1
        if args.stats_interval > 0 and time.monotonic() >= next_stats:
            logger.info("stats %s", json.dumps(stats()))
            next_stats += args.stats_interval
    worker.stop()
    print(json.dumps({"worker_id": worker_id, **stats()}), flush=True)
    return 0
