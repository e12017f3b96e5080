"""Offload overhead on loopback: round trip minus cloud model compute, at a paced open-loop rate.

    python -m bench.offload_bench                  # 500 offloads/s for 10 s; targets p50 <= 1 ms, p99 <= 5 ms
    python -m bench.offload_bench --model /path/to/cloud.onnx --rate 200 --seconds 20
    python -m bench.offload_bench --floor          # same traffic, answered by a do-nothing responder
    python -m bench.offload_bench --streams 2 --threads 1   # two batches at once, one core each

A private Mosquitto (the project's config), one or more real `edgecascade cloud` worker processes, and this
process as the requester (one device user, QoS 1, ResponseTopic + CorrelationData). The sender is paced
open-loop: request i leaves at t0 + i/rate whatever the replies do, and its lag behind that schedule is
reported, so a stalled sender cannot hide latency (coordinated omission).

Per request: round trip = reply callback - publish call (same clock); compute = the batch's onnxruntime time
(the reply's cloud_ms x batch size: the request waited for its whole batch); overhead = round trip - compute.
Overhead includes the worker's queueing (`queue_ms` in the reply, from the moment the worker's network
thread read the offload: waiting behind a computing batch, or to fill this one); `transport` excludes it as
well, leaving MQTT, the broker, both clients and the worker's hand-offs between its threads. Each worker's
`busy` (the share of its streams' time spent on batches, from its final stats line) says how close to its
capacity the rate runs it: queueing grows steeply as it nears 100 %. `--floor` replaces the worker by a
responder that answers each offload with one precomputed reply from inside paho's callback: the cost of
MQTT, the broker and Python clients alone on this machine, which no worker can go below.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from bench.services import ServiceGroup
from broker.launcher import BrokerProcess
from cloud_worker.model import CloudSession
from cloud_worker.probe import Answer, OffloadProbe
from protocol.topics import Topics
from results_db.stats import percentiles

REPO = Path(__file__).resolve().parent.parent
REAL_MODEL_DIR = REPO / "models" / "fashion-mnist"
TARGET_P50_MS, TARGET_P99_MS = 1.0, 5.0


def choose_model(explicit: Optional[str]) -> Tuple[Path, str]:
    """(model dir or file, description): --model, else the trained cloud model, else the tiny test model."""
    if explicit:
        return Path(explicit), f"given: {explicit}"
    if (REAL_MODEL_DIR / "cloud.onnx").exists():
        return REAL_MODEL_DIR, f"trained cloud model {REAL_MODEL_DIR / 'cloud.onnx'}"
    sys.path.insert(0, str(REPO / "tests"))  # the tiny deterministic models live with the tests
    from tinymodels import write_tiny_model_dir

    path = write_tiny_model_dir(Path(tempfile.mkdtemp(prefix="edgecascade-tiny-")))
    return (
        path,
        "tiny test model (tests/tinymodels.py: 784-32-10 MLP); models/fashion-mnist/cloud.onnx absent",
    )


def spawn_workers(
    services: ServiceGroup,
    broker: BrokerProcess,
    topics: Topics,
    model: Path,
    count: int,
    extra_args: Sequence[str] = (),
) -> List[str]:
    """`count` real `edgecascade cloud` processes (ServiceGroup: ready once each has said READY=1)."""
    names = [f"bench-w{k}" for k in range(count)]
    for name in names:
        namespace = ["--namespace", topics.root.split("/")[0]]
        services.start_cloud(name, broker.credentials("cloud"), model, name, [*namespace, *extra_args])
    return names


def stop_workers(services: ServiceGroup, names: List[str]) -> List[Dict[str, Any]]:
    """SIGTERM each worker and read the stats line it prints on the way out (its log)."""
    stats = []
    for name in names:
        services.stop(name)
        lines = [
            ln for ln in (services.workdir / f"{name}.log").read_text().splitlines() if ln.startswith("{")
        ]
        stats.append(json.loads(lines[-1]) if lines else {})
    return stats


def spawn_floor(services: ServiceGroup, broker: BrokerProcess, topics: Topics) -> List[str]:
    """The do-nothing responder (bench/floor_responder.py; see the module docstring)."""
    cloud = broker.credentials("cloud")
    args = [cloud.host, str(cloud.port), cloud.password, topics.cloud_subscription()]
    services.start("floor", args, module="bench.floor_responder")
    return ["floor"]


def sample_images(model: Path, n: int, seed: int = 0) -> np.ndarray:
    shape = CloudSession(model).input_shape
    return np.random.default_rng(seed).integers(0, 256, size=(n, *shape), dtype=np.uint8)


def run_paced(probe: OffloadProbe, images: np.ndarray, rate: float) -> Tuple[List[Future], List[float]]:
    """Send every image at its scheduled instant; returns the futures and each send's lag (ms).

    The probe runs unthreaded: this one thread waits for the next send time inside paho's select, handles
    replies as they come, and writes each request itself (see OffloadProbe.start)."""
    futures: List[Future] = []
    lags_ms: List[float] = []
    period = 1.0 / rate
    t0 = time.perf_counter() + 0.05
    for i, image in enumerate(images):
        due = t0 + i * period
        while True:
            delay = due - time.perf_counter()
            if delay <= 0:
                break
            probe.pump(delay)
        lags_ms.append((time.perf_counter() - due) * 1000.0)
        futures.append(probe.request(image, seq=i))
    deadline = time.monotonic() + 60
    while not all(f.done() for f in futures[-50:]) and time.monotonic() < deadline:
        probe.pump(0.01)
    end = time.monotonic() + 5
    while not all(f.done() for f in futures) and time.monotonic() < end:
        probe.pump(0.01)
    return futures, lags_ms


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir or cloud .onnx (default: trained, else tiny)")
    parser.add_argument("--rate", type=float, default=500.0, help="offloads per second (default %(default)s)")
    parser.add_argument("--seconds", type=float, default=10.0, help="measured duration (default %(default)s)")
    parser.add_argument("--warmup-s", type=float, default=1.0, help="discarded lead-in (default %(default)s)")
    parser.add_argument("--workers", type=int, default=1, help="worker processes (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=2.0)
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads per worker")
    parser.add_argument("--streams", type=int, default=None, help="batches each worker computes at once")
    parser.add_argument("--floor", action="store_true", help="a do-nothing responder instead of the worker")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    model, model_note = choose_model(args.model)
    if args.floor:
        model_note = "FLOOR: do-nothing responder, no model"
    warmup = int(args.rate * args.warmup_s)
    total = warmup + int(args.rate * args.seconds)
    images = sample_images(model, total)
    topics = Topics.namespaced("bench")
    extra = ["--max-batch", str(args.max_batch), "--max-wait-ms", str(args.max_wait_ms)]
    if args.threads:
        extra += ["--threads", str(args.threads)]
    if args.streams:
        extra += ["--streams", str(args.streams)]
    with BrokerProcess() as broker, tempfile.TemporaryDirectory(prefix="offload-bench-") as tmp:
        services = ServiceGroup(Path(tmp))
        workers = (
            spawn_floor(services, broker, topics)
            if args.floor
            else spawn_workers(services, broker, topics, model, args.workers, extra)
        )
        try:
            probe = OffloadProbe(broker.credentials("bench-dev"), topics, "bench-dev").start(threaded=False)
            try:
                gc.disable()  # the instrument must not pause mid-measurement to scan its own results
                futures, lags = run_paced(probe, images, args.rate)
                gc.enable()
                answers: List[Answer] = [f.result(timeout=1) for f in futures]
            finally:
                probe.close()
        finally:
            worker_stats = stop_workers(services, workers) if not args.floor else [{"floor": True}]
            services.close()

    measured = answers[warmup:]
    rtt = [a.round_trip_ms for a in measured]
    compute = [a.reply.cloud_ms * a.reply.extra["batch"] for a in measured]
    queue = [a.reply.extra["queue_ms"] for a in measured]
    overhead = [r - c for r, c in zip(rtt, compute)]
    transport = [o - q for o, q in zip(overhead, queue)]
    batches = [a.reply.extra["batch"] for a in measured]
    figures = {
        "model": model_note,
        "rate_per_s": args.rate,
        "requests": len(measured),
        "workers": args.workers,
        "max_batch": args.max_batch,
        "max_wait_ms": args.max_wait_ms,
        "threads": args.threads,
        "streams": args.streams,
        "round_trip_ms": percentiles(rtt),
        "compute_ms": percentiles(compute),
        "overhead_ms": percentiles(overhead),
        "transport_ms": percentiles(transport),
        "worker_queue_ms": percentiles(queue),
        "sender_lag_ms": percentiles(lags[warmup:]),
        "mean_batch": float(np.mean(batches)),
        "worker_stats": worker_stats,
    }
    p50, p99 = figures["overhead_ms"]["p50"], figures["overhead_ms"]["p99"]
    ok = p50 <= TARGET_P50_MS and p99 <= TARGET_P99_MS
    print(f"offload overhead on loopback, {args.rate:.0f} offloads/s for {args.seconds:.0f} s, {model_note}")
    print(f"  {'ms':<22}{'p50':>8}{'p90':>8}{'p99':>8}{'max':>8}")
    for key in (
        "round_trip_ms",
        "compute_ms",
        "overhead_ms",
        "transport_ms",
        "worker_queue_ms",
        "sender_lag_ms",
    ):
        p = figures[key]
        print(f"  {key:<22}{p['p50']:8.3f}{p['p90']:8.3f}{p['p99']:8.3f}{p['max']:8.3f}")
    print(f"  mean batch {figures['mean_batch']:.2f}; workers: {worker_stats}")
    busy = [w["busy"] for w in worker_stats if "busy" in w]
    if busy:
        print("  workers busy " + ", ".join(f"{b:.0%}" for b in busy) + " of their streams' time")
    print(
        f"  target overhead p50 <= {TARGET_P50_MS} ms, p99 <= {TARGET_P99_MS} ms: "
        f"{'MET' if ok else 'MISSED'} (p50 {p50:.3f}, p99 {p99:.3f})"
    )
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
