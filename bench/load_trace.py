"""A recorded trace of the real edge cascade's decisions and timings, for the load mode (bench/load_mode.py).

    .venv/bin/python -m bench.load_trace --models models/fashion-mnist --samples 1000 \\
        --out bench/traces/fashion-mnist-meanet.json

Each of the first N Fashion-MNIST test images goes through what an agent runs for it: the agent's own
`EdgeCascade` (onnxruntime) and policy (`device_agent.samples.edge_view`, then `policy.decide`), timed as the
agent times it. The trace keeps, per sample: its dataset index and label, where it ended (main, extension or
offload), the edge's prediction and confidences, and edge_ms. The load mode replays it instead of computing,
so that thousands of simulated devices cost the driver no inference; offloads carry the real image.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

DEFAULT_TRACE = Path(__file__).resolve().parent / "traces" / "fashion-mnist-meanet.json"


def record_trace(model_dir: Path, samples: int, policy_name: str = "meanet") -> Dict[str, Any]:
    from device_agent.card import load_card
    from device_agent.cascade import EdgeCascade
    from device_agent.policies import Action, make_policy
    from device_agent.samples import edge_view
    from device_agent.sources import load_idx_dataset

    card = load_card(model_dir)
    policy = make_policy({"name": policy_name, "params": {}}, card)
    cascade = EdgeCascade(model_dir, ["CPUExecutionProvider"], None, 1)
    images, labels = load_idx_dataset("fashion-mnist", "test", limit=samples)
    entries: List[Dict[str, Any]] = []
    for i in range(len(images)):
        start = time.perf_counter()
        view, _ = edge_view(cascade, policy.edge, images[i], i)
        decision = policy.decide(view)
        edge_ms = (time.perf_counter() - start) * 1000.0
        offload = decision.action is Action.OFFLOAD
        entries.append(
            {
                "i": i,
                "label": int(labels[i]),
                "exit": "offload" if offload else view.exit_stage or "main",
                "prediction": int(view.prediction) if view.prediction is not None else 0,
                "p_main": view.p_main,
                "p_ext": view.p_ext,
                "edge_ms": round(edge_ms, 4),
            }
        )
    return {
        "model_dir": str(model_dir),
        "policy": policy_name,
        "dataset": "fashion-mnist:test",
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "recorded_unix": time.time(),
        "samples": entries,
    }


def load_trace(path: Path = DEFAULT_TRACE) -> Dict[str, Any]:
    """A trace written by `record_trace`; ValueError if the file is not one."""
    try:
        trace = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the trace {path}: {exc}") from None
    if not isinstance(trace, dict) or not trace.get("samples"):
        raise ValueError(f"{path} is not a load-mode trace (no samples)")
    return trace


def summary(trace: Dict[str, Any]) -> Dict[str, float]:
    entries = trace["samples"]
    offloads = sum(e["exit"] == "offload" for e in entries)
    ms = sorted(e["edge_ms"] for e in entries)
    return {
        "samples": len(entries),
        "offload_fraction": offloads / len(entries),
        "edge_ms_p50": ms[len(ms) // 2],
        "edge_accuracy_of_kept": sum(e["prediction"] == e["label"] for e in entries if e["exit"] != "offload")
        / max(1, len(entries) - offloads),
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--samples", type=int, default=1000, help="first N test images")
    parser.add_argument("--policy", default="meanet")
    parser.add_argument("--out", type=Path, default=DEFAULT_TRACE)
    args = parser.parse_args(argv)
    trace = record_trace(args.models, args.samples, args.policy)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(trace, separators=(",", ":")) + "\n")
    print(json.dumps({"out": str(args.out), **summary(trace)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
