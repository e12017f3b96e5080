"""Cloud worker throughput fed over MQTT against bare onnxruntime on the same model and batch size.

    python -m bench.worker_throughput                      # trained cloud model if present, else the tiny one
    python -m bench.worker_throughput --model /path/to/cloud.onnx --batch 32 --batches 20

1. bare: the worker's own `CloudSession` (same session options) runs `--batches` batches of `--batch` random
   images back to back: samples/s.
2. fed: a private Mosquitto, one real `edgecascade cloud` process (`--max-batch` = `--batch`) and this
   process publishing every request at once (QoS 1, one device user); samples/s over the steady part (from
   the end of the first batch's replies to the last reply).
3. `--rounds` times fed then bare again, since other load on the machine drifts; the ratio is the median
   fed rate over the median bare rate.

Target: fed >= 85 % of bare.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

from bench.offload_bench import choose_model, sample_images, spawn_workers, stop_workers
from bench.services import ServiceGroup
from broker.launcher import BrokerProcess
from cloud_worker.model import CloudSession
from cloud_worker.probe import OffloadProbe
from protocol.topics import Topics

TARGET_RATIO = 0.85


def bare_throughput(model: Path, batch: int, batches: int, threads: Optional[int]) -> float:
    """Samples/s of back-to-back batches on the worker's session configuration."""
    session = CloudSession(model, threads=threads)
    images = sample_images(model, batch, seed=1)
    for _ in range(3):
        session.logits(images)
    start = time.perf_counter()
    for _ in range(batches):
        session.logits(images)
    return batch * batches / (time.perf_counter() - start)


def fed_throughput(model: Path, batch: int, batches: int, threads: Optional[int]) -> Dict[str, Any]:
    """Samples/s of one worker process fed over MQTT, plus what the worker reports."""
    total = batch * (batches + 1)
    images = sample_images(model, total, seed=2)
    topics = Topics.namespaced("tput")
    extra = ["--max-batch", str(batch), "--max-wait-ms", "2"]
    if threads:
        extra += ["--threads", str(threads)]
    with BrokerProcess() as broker, tempfile.TemporaryDirectory(prefix="tput-") as tmp:
        services = ServiceGroup(Path(tmp))
        workers = spawn_workers(services, broker, topics, model, 1, extra)
        try:
            with OffloadProbe(broker.credentials("tput-dev"), topics, "tput-dev") as probe:
                futures = [probe.request(images[i], seq=i, expiry_s=None) for i in range(total)]
                answers = [f.result(timeout=600) for f in futures]
        finally:
            stats = stop_workers(services, workers)
            services.close()
    arrivals = sorted(a.received_ns / 1e9 for a in answers)
    steady = arrivals[batch - 1 :]
    rate = (len(steady) - 1) / (steady[-1] - steady[0])
    sizes = [a.reply.extra["batch"] for a in answers]
    return {"samples_per_s": rate, "mean_batch": float(np.mean(sizes)), "requests": total, "worker": stats[0]}


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", help="model dir or cloud .onnx (default: trained, else tiny)")
    parser.add_argument(
        "--batch", type=int, default=32, help="batch size, bare and --max-batch (default %(default)s)"
    )
    parser.add_argument("--batches", type=int, default=20, help="batches measured (default %(default)s)")
    parser.add_argument("--rounds", type=int, default=2, help="fed runs, each between bare runs")
    parser.add_argument("--threads", type=int, default=None, help="onnxruntime intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    model, model_note = choose_model(args.model)
    bare: List[float] = [bare_throughput(model, args.batch, args.batches, args.threads)]
    fed: List[Dict[str, Any]] = []
    for _ in range(args.rounds):  # interleaved: load from elsewhere on the machine drifts
        fed.append(fed_throughput(model, args.batch, args.batches, args.threads))
        bare.append(bare_throughput(model, args.batch, args.batches, args.threads))
    fed_rates = [f["samples_per_s"] for f in fed]
    ratio = float(np.median(fed_rates) / np.median(bare))
    figures = {"model": model_note, "batch": args.batch, "bare_samples_per_s": bare, "fed": fed}
    figures["ratio"] = ratio
    print(f"cloud worker throughput, batch {args.batch}, {model_note}")
    print("  bare onnxruntime  " + "  ".join(f"{b:9.1f}" for b in bare) + "  samples/s")
    print("  fed over MQTT     " + "  ".join(f"{r:9.1f}" for r in fed_rates) + "  samples/s")
    print("  mean batch fed    " + "  ".join(f"{f['mean_batch']:9.1f}" for f in fed))
    # The worker's own account (its final stats line): the whole run, start-up and the tail included.
    print("  worker busy       " + "  ".join(f"{f['worker'].get('busy', 0.0):9.0%}" for f in fed))
    verdict = "MET" if ratio >= TARGET_RATIO else "MISSED"
    print(f"  median ratio {ratio:.1%}; target >= {TARGET_RATIO:.0%}: {verdict}")
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2) + "\n")
    return 0 if ratio >= TARGET_RATIO else 1


if __name__ == "__main__":
    sys.exit(main())
