"""`python -m bench.adapt_bench`: how much of the corrupted-vs-clean gap each adaptation step recovers.

Over the real pipeline: a private broker, the collector, one cloud worker keeping what it answers
(`--keep-inputs`), and a `DeviceAgent` (`meanet`) that sees the first `--traffic` Fashion-MNIST test images
with a corruption of the suite (synthetic corruption of real test data): whatever it offloads the worker
keeps. Then `edgecascade adapt` twice on what was kept — the cloud's BatchNorm statistics alone (`tta`),
and those plus the edge blocks retrained on the adapted cloud's answers (`tta,edge`) — and each new model is
measured on other test images (`--eval-range`, never adapted on), corrupted the same way, and clean.

Gap recovered = (accuracy after − before) / (clean accuracy before − corrupted accuracy before), per part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console
from rich.table import Table

from bench.run import BenchConfig, _rotate, agent_config, wait_for_rows
from bench.stack import cloud_side
from cloud_worker.keep import read_kept
from device_agent import DeviceAgent
from device_agent.config import load_profile
from device_agent.sources import load_idx_dataset
from training.corruptions import Corruption, corrupt

STEPS = ("tta", "tta,edge")


def fill_kept(args: argparse.Namespace, kept: Path, console: Console) -> Dict[str, Any]:
    """Run the corrupted traffic through the pipeline; the worker keeps what it answered."""
    cfg = BenchConfig(models=args.models, results=args.results, http_peer=False, progress=False)
    db = args.results / "bench.db"
    _rotate(db)
    kept.unlink(missing_ok=True)
    bench_id = time.strftime("a%Y%m%d-%H%M%S")
    images, labels = load_idx_dataset("fashion-mnist", "test", limit=args.traffic)
    traffic = corrupt(images, Corruption.parse(args.corruption))
    profile = load_profile(cfg.profile)
    run_id = f"{bench_id}-traffic"
    with cloud_side(cfg, db, bench_id, {**profile.get("cloud", {}), "keep_inputs": kept}, console) as side:
        agent_cfg = dataclasses.replace(
            agent_config(cfg, side, profile, {"name": args.policy, "params": {}}, run_id),
            idle_seconds=0.0,
            capacity_aware=False,
            split=f"test:{args.corruption}",
        )
        with DeviceAgent(agent_cfg) as agent:
            summary = agent.run_dataset(zip(traffic, [int(y) for y in labels]), progress=False)
        wait_for_rows(db, {run_id: len(traffic)}, console)
    return {
        "run_id": run_id,
        "samples": len(traffic),
        "offloaded": summary.offloaded,
        "accuracy": summary.correct / max(summary.labelled, 1),
        "db": str(db),
    }


def adapt(args: argparse.Namespace, kept: Path, steps: str, out: Path) -> Dict[str, Any]:
    command = [
        sys.executable, "-m", "edgecascade", "adapt", "--models", str(args.models), "--kept", str(kept),
        "--out", str(out), "--steps", steps, "--epochs", str(args.epochs), "--holdout", "0.2",
        "--eval-corruption", args.corruption, "--eval-range", args.eval_range, "--no-progress",
    ]  # fmt: skip
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return json.loads((out / "card.json").read_text())["adaptation"]


def recovered(f: Dict[str, Any], part: str) -> Optional[float]:
    before = f[f"corrupted_{part}_accuracy_before"]
    gap = f[f"clean_{part}_accuracy_before"] - before
    return None if gap <= 0 else (f[f"corrupted_{part}_accuracy_after"] - before) / gap


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.adapt_bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--corruption", default="gaussian-noise-2", help="the drift (default %(default)s)")
    parser.add_argument("--traffic", type=int, default=5000, help="corrupted test images streamed (0..N)")
    parser.add_argument("--eval-range", default="5000:10000", help="test images measured on (start:end)")
    parser.add_argument("--policy", default="meanet")
    parser.add_argument("--epochs", type=int, default=2, help="edge fine-tuning epochs")
    parser.add_argument("--results", type=Path, default=Path("results/adapt"))
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args(argv)
    first = int(args.eval_range.split(":")[0])
    if args.traffic > first:
        parser.error(f"--traffic {args.traffic} overlaps --eval-range {args.eval_range}: keep them apart")
    console = Console(stderr=True)
    args.results.mkdir(parents=True, exist_ok=True)
    kept = args.results / "kept.db"
    t0 = time.monotonic()
    traffic = fill_kept(args, kept, console)
    traffic["kept"] = len(read_kept(kept))
    console.print(
        f"traffic: {traffic['samples']} {args.corruption} images, {traffic['kept']} kept by the worker"
    )
    results = {steps: adapt(args, kept, steps, args.results / steps.replace(",", "+")) for steps in STEPS}
    table = Table(title=f"adaptation to {args.corruption} (test {args.eval_range}; synthetic corruption)")
    for column in (
        "steps",
        "part",
        "clean before",
        "corrupted before",
        "corrupted after",
        "clean after",
        "gap recovered",
    ):
        table.add_column(column, justify="right")
    out: Dict[str, Any] = {"traffic": traffic, "corruption": args.corruption, "steps": {}}
    for steps, adaptation in results.items():
        f = adaptation["figures"]
        out["steps"][steps] = {"figures": f, "recovered": {p: recovered(f, p) for p in ("cloud", "edge")}}
        for part in ("cloud", "edge"):
            r = recovered(f, part)
            table.add_row(
                steps, part,
                *(f"{100 * f[f'{k}_{part}_accuracy_{w}']:.2f}" for k, w in
                  (("clean", "before"), ("corrupted", "before"), ("corrupted", "after"), ("clean", "after"))),
                "–" if r is None else f"{100 * r:.0f} %",
            )  # fmt: skip
    Console().print(table)
    out["seconds"] = round(time.monotonic() - t0, 1)
    print(f"{out['seconds']:.0f} s; figures from synthetic corruptions of real test images")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
