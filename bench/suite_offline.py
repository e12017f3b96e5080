"""`python -m bench.suite_offline`: the corruption suite's policy figures offline, from onnxruntime outputs.

The same blocks and the device's rule (`device_agent.cascade.EdgeCascade`, its card's gate and thresholds) on
the first `--samples` test images, clean and under each corruption of `training.corruptions` (synthetic
corruptions of real test data); no broker, no agent: the decisions a policy makes, not how the system carries
them (`edgecascade bench --corruptions` runs that, slower). Outputs are cached per model (build/suite-*.npz),
so comparing policies or models costs seconds after the first run. Prints, per corruption: edge-only,
cloud-only, meanet and hi-threshold accuracy with their offload share, and where each cascade falls below
edge-only or more than 0.5 pp below max(edge-only, cloud-only) (issue 16's targets). The `+watch` columns
add the device's `CloudWatch` and drift monitor as a device in service meets them: 300 clean test images
(after the scored ones) fill the monitor's window and the watch's before the onset, then the corrupted
images; only those are scored.
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from cloud_worker.model import CloudSession
from device_agent.card import sha256_file
from device_agent.cascade import EdgeCascade
from device_agent.drift import DriftMonitor, DriftReference
from device_agent.rule import normalised_entropy, softmax
from device_agent.safety import CloudWatch
from device_agent.sources import load_idx_dataset
from training.corruptions import corrupt, suite

CLEAN = "clean"
MARGIN = 0.005  # the 0.5 pp
WARM_UP = 300  # clean test images after the scored ones: a device runs clean before the onset


def outputs(model_dir: Path, images: np.ndarray, batch: int = 500) -> Dict[str, np.ndarray]:
    """Main probabilities, the edge answers (gated and ungated), the cloud's logits, for every image."""
    cascade = EdgeCascade(model_dir)
    cloud = CloudSession(cascade.card.block_path("cloud"))
    parts: Dict[str, List[np.ndarray]] = {k: [] for k in ("main", "edge", "edge_full", "ext_ran", "cloud")}
    for start in range(0, len(images), batch):
        x = images[start : start + batch]
        parts["main"].append(cascade.run_main(x).probs)
        for key, gated in (("edge", True), ("edge_full", False)):
            decisions = cascade.decide(x, gated=gated)
            parts[key].append(np.stack([d.probs for d in decisions]))
            if gated:
                parts["ext_ran"].append(np.array([d.exit_stage == "extension" for d in decisions]))
        parts["cloud"].append(cloud.logits(x))
    return {k: np.concatenate(v) for k, v in parts.items()}


def policies(
    o: Dict[str, np.ndarray], labels: np.ndarray, tau: float, theta: float, warm: Dict[str, np.ndarray]
) -> Dict[str, Any]:
    """Each policy's accuracy and offload share on `o`'s samples; the `+watch` ones run the device's
    `CloudWatch` over `warm` (clean samples before the onset, outputs and the drift verdicts) and then `o`."""
    cloud_pred = o["cloud"].argmax(1)
    edge_pred = o["edge"].argmax(1)
    meanet_off = normalised_entropy(o["edge"]) > tau
    hi_off = o["main"].max(1) < theta

    def acc(pred: np.ndarray) -> float:
        return float((pred == labels).mean())

    both = {k: np.concatenate([warm[k], o[k]]) for k in ("main", "edge", "cloud", "drifting")}
    all_labels = np.concatenate([warm["labels"], labels])
    cloud_conf = softmax(both["cloud"]).max(1)
    watched = {
        f"{name}+watch": _watched(
            offload,
            both[probs].argmax(1),
            both[probs].max(1),
            both["cloud"].argmax(1),
            cloud_conf,
            all_labels,
            both["drifting"],
            len(warm["labels"]),
        )
        for name, offload, probs in (
            ("meanet", normalised_entropy(both["edge"]) > tau, "edge"),
            ("hi-threshold", both["main"].max(1) < theta, "main"),
        )
    }
    return {
        **watched,
        "edge-only": {"accuracy": acc(o["edge_full"].argmax(1)), "offloaded": 0.0},
        "cloud-only": {"accuracy": acc(cloud_pred), "offloaded": 1.0},
        "meanet": {
            "accuracy": acc(np.where(meanet_off, cloud_pred, edge_pred)),
            "offloaded": float(meanet_off.mean()),
            "extension_ran": float(o["ext_ran"].mean()),
        },
        "hi-threshold": {
            "accuracy": acc(np.where(hi_off, cloud_pred, o["main"].argmax(1))),
            "offloaded": float(hi_off.mean()),
        },
    }


def _watched(
    offload: np.ndarray,
    edge_pred: np.ndarray,
    edge_conf: np.ndarray,
    cloud_pred: np.ndarray,
    cloud_conf: np.ndarray,
    labels: np.ndarray,
    drifting: np.ndarray,
    scored_from: int,
) -> Dict[str, Any]:
    """The policy's decisions in order with the device's `CloudWatch` (each answer back before the next
    sample: no latency), as the agent applies it: an edge exit escalated while drifting, an offload admitted
    or kept at the edge. Scored from sample `scored_from` on (the ones before it warm the watch up)."""
    watch = CloudWatch()
    final = edge_pred.copy()
    sent = np.zeros(len(labels), dtype=bool)
    for i in range(len(labels)):
        go = bool(offload[i]) or watch.escalates(bool(drifting[i]))
        if go and watch.admit():
            sent[i] = True
            final[i] = cloud_pred[i]
            watch.answered(float(edge_conf[i]), float(cloud_conf[i]))
    scored = slice(scored_from, None)
    return {
        "accuracy": float((final[scored] == labels[scored]).mean()),
        "offloaded": float(sent[scored].mean()),
        **watch.report(),
    }


def drift_verdicts(
    reference: Optional[DriftReference], main: np.ndarray, images: np.ndarray, start: Optional[DriftMonitor]
) -> Tuple[np.ndarray, Optional[DriftMonitor]]:
    """The device's drift verdict after each sample (False before the first test, and without a reference);
    `start`: a monitor already fed the samples before these (a copy is fed, `start` is left as it was)."""
    if reference is None:
        return np.zeros(len(main), dtype=bool), None
    monitor = copy.deepcopy(start) if start is not None else DriftMonitor(reference)
    verdict, out = False, np.zeros(len(main), dtype=bool)
    for i in range(len(main)):
        check = monitor.observe(main[i], i, images[i])
        if check is not None:
            verdict = check.drift
        out[i] = verdict
    return out, monitor


def evaluate(
    model_dir: Path, samples: int, cache_dir: Path, kinds: Optional[List[str]] = None
) -> Dict[str, Any]:
    images, labels = load_idx_dataset("fashion-mnist", "test", limit=samples + WARM_UP)
    labels = np.asarray(labels)
    warm_images, images = images[samples:], images[:samples]
    card = EdgeCascade(model_dir).card
    reference = DriftReference.from_card(card.raw)
    key = sha256_file(model_dir / "card.json")[:12]
    warm = cached(cache_dir / f"suite-{key}-{samples}-warm-up.npz", model_dir, warm_images)
    warm["drifting"], monitor = drift_verdicts(reference, warm["main"], warm_images, None)
    warm["labels"] = labels[samples:]
    rows: Dict[str, Any] = {}
    for corruption in [None, *suite(kinds)]:
        name = CLEAN if corruption is None else corruption.name
        data = images if corruption is None else corrupt(images, corruption)
        o = cached(cache_dir / f"suite-{key}-{samples}-{name}.npz", model_dir, data)
        o["drifting"], _ = drift_verdicts(reference, o["main"], data, monitor)
        rows[name] = policies(o, labels[:samples], card.entropy_tau, card.hi_theta, warm)
    return {"model": str(model_dir), "card_sha256": key, "samples": samples, "rows": rows}


def cached(path: Path, model_dir: Path, images: np.ndarray) -> Dict[str, np.ndarray]:
    """`outputs` of these images, from `path` where an earlier run left them."""
    if path.exists():
        return dict(np.load(path))
    o = outputs(model_dir, images)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **o)  # type: ignore[arg-type]  # numpy stubs take the first keyword for allow_pickle
    return o


def misses(row: Dict[str, Any], policy: str) -> List[str]:
    best = max(row["edge-only"]["accuracy"], row["cloud-only"]["accuracy"])
    a = row[policy]["accuracy"]
    out = []
    if a < row["edge-only"]["accuracy"]:
        out.append("< edge-only")
    if a < best - MARGIN:
        out.append("< max - 0.5 pp")
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.suite_offline", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--models", type=Path, nargs="+", default=[Path("models/fashion-mnist")])
    parser.add_argument("--samples", type=int, default=1000, help="test images per corruption (default 1000)")
    parser.add_argument("--kinds", help="corruption kinds, comma-separated (default: all)")
    parser.add_argument("--cache", type=Path, default=Path("build"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    results = []
    for model_dir in args.models:
        t0 = time.monotonic()
        r = evaluate(model_dir, args.samples, args.cache, args.kinds.split(",") if args.kinds else None)
        r["seconds"] = round(time.monotonic() - t0, 1)
        results.append(r)
        print(
            f"\n{model_dir} (card {r['card_sha256']}), {args.samples} test images each, {r['seconds']:.0f} s"
        )
        heads = ("meanet", "hi-threshold", "meanet+watch", "hi+watch")
        print(
            f"{'corruption':<22} {'edge-only':>9} {'cloud':>9} "
            + " ".join(f"{h:>15}" for h in heads)
            + "  misses"
        )
        missed = {"meanet": 0, "hi-threshold": 0, "meanet+watch": 0, "hi-threshold+watch": 0}
        for name, row in r["rows"].items():
            notes = []
            for p in missed:
                m = misses(row, p)
                missed[p] += bool(m)
                notes += [f"{p} {x}" for x in m]
            cells = [f"{100 * row[p]['accuracy']:>9.1f}" for p in ("edge-only", "cloud-only")]
            cells += [
                f"{100 * row[p]['accuracy']:>7.1f} ({100 * row[p]['offloaded']:>3.0f} %)"
                for p in ("meanet", "hi-threshold", "meanet+watch", "hi-threshold+watch")
            ]
            print(f"{name:<22} {' '.join(cells)}  " + "; ".join(notes))
        cloud_worse = [
            n for n, row in r["rows"].items() if row["cloud-only"]["accuracy"] < row["edge-only"]["accuracy"]
        ]
        print(
            f"cloud below edge-only on {len(cloud_worse)}: {', '.join(cloud_worse) or 'none'}; corruptions a "
            "cascade misses a target on: " + ", ".join(f"{p} {n}" for p, n in missed.items())
        )
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
