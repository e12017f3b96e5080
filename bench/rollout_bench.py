"""Model rollout to a fleet: the fleet simulation (`bench.fleet_sim.run_fleet`: agents as processes, their own
accounts, a collector and cloud workers) with every agent following a device group while it streams, and the
operator (`edgecascade.rollout`) rolling versions out to it:

1. v2 to the canary group; promoted to the fleet once the canary's agreement with the cloud holds;
2. v3, correctly signed but with a file changed after signing (tampered), to both groups: every agent must
   refuse it and keep serving v2; then both groups rolled back to v2 by hand;
3. v4, a bad model (the main block's classes rotated by one), to the canary: its agreement with the cloud
   falls, the canary watch rolls it back to v2 by itself.

The versions are synthetic, derived from the committed models (no second trained model exists offline): v2
is the committed model recalibrated (entropy_tau x 0.9, more offloads), v4 rotates its main block's class
order. Rotating classes keeps each sample's top confidence, so the fleet simulation's accounting of rows by
(label, p_main) holds across every version. Printed: samples lost and duplicated, rows without a model
version, rows per version, tampered refusals, and how long the canary verdicts, the fleet swap and the
automatic rollback took.

    python -m bench.rollout_bench --agents 50 --canary 10 --samples 800 --rate 4
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from rich.console import Console

from bench.fleet_sim import FleetResult, run_fleet
from device_agent.card import CARD_FILE, sha256_file
from edgecascade.rollout.bundles import Bundle, build_bundle
from edgecascade.rollout.canary import ROLLBACK, watch
from edgecascade.rollout.keys import keygen, load_private_key
from edgecascade.rollout.operator import Operator
from protocol.topics import Topics

logger = logging.getLogger(__name__)

CANARY, FLEET = "canary", "fleet"


@dataclass
class RolloutFigures:
    agents: int
    canary: int
    samples_per_agent: int
    rows: int = 0
    lost: int = 0
    duplicates: int = 0
    agent_failures: int = 0
    rows_without_version: int = 0
    rows_by_version: Dict[str, int] = field(default_factory=dict)
    canary_v2: str = ""  # the canary's verdict on v2
    canary_v2_s: Optional[float] = None  # publish to verdict
    fleet_on_v2_s: Optional[float] = None  # promote to every agent serving v2
    tampered_refused: int = 0  # agents whose status counts a refusal of v3
    tampered_refused_s: Optional[float] = None
    served_tampered: int = 0  # agents that served v3 (must be 0)
    canary_v4: str = ""
    rollback_verdict_s: Optional[float] = None  # v4 published to verdict
    rollback_done_s: Optional[float] = None  # v4 published to every canary agent serving v2 again
    refusals_in_logs: Dict[str, int] = field(default_factory=dict)  # by reason, from the agents' summaries
    events: List[str] = field(default_factory=list)

    def checks(self) -> Dict[str, bool]:
        return {
            "0 samples lost": self.lost == 0 and self.duplicates == 0 and self.agent_failures == 0,
            "every row tagged with its model version": self.rows > 0 and self.rows_without_version == 0,
            "tampered model refused by every agent": self.tampered_refused == self.agents
            and self.served_tampered == 0,
            "rollback done": self.canary_v4 == ROLLBACK and self.rollback_done_s is not None,
        }


def make_versions(models: Path, workdir: Path) -> Dict[str, Path]:
    """v2 and v3 (recalibrated) and v4 (classes rotated) in `workdir` from the committed `models`."""
    v2, v3, v4 = workdir / "v2", workdir / "v3", workdir / "v4"
    for target in (v2, v3, v4):
        shutil.rmtree(target, ignore_errors=True)
        target.mkdir(parents=True)
        for name in (CARD_FILE, "MODEL_CARD.md", "main.onnx", "extension.onnx"):
            shutil.copy2(models / name, target / name)
    for target, factor in ((v2, 0.9), (v3, 0.8)):  # v3's card its own: its chunks are no other's
        card = json.loads((target / CARD_FILE).read_text())
        card["thresholds"]["entropy_tau"] = round(card["thresholds"]["entropy_tau"] * factor, 6)
        (target / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    _rotate_classes(v4 / "main.onnx")
    card = json.loads((v4 / CARD_FILE).read_text())
    card["blocks"]["main"]["sha256"] = sha256_file(v4 / "main.onnx")
    (v4 / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n")
    return {"v2": v2, "v3": v3, "v4": v4}


def _rotate_classes(path: Path) -> None:
    """The Gemm that makes `logits`: its weight rows and bias rotated by one class (a deliberately bad model
    whose confidences are the original's, its answers one class off)."""
    import numpy as np
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(path))
    (gemm,) = [n for n in model.graph.node if "logits" in n.output and n.op_type == "Gemm"]
    trans_b = any(a.name == "transB" and a.i == 1 for a in gemm.attribute)
    inits = {i.name: i for i in model.graph.initializer}
    for name, axis in ((gemm.input[1], 0 if trans_b else 1), (gemm.input[2], 0)):
        array = np.roll(numpy_helper.to_array(inits[name]), 1, axis=axis)
        inits[name].CopyFrom(numpy_helper.from_array(array, name))
    onnx.save(model, str(path))


def tampered(bundle: Bundle) -> Bundle:
    """The same signed manifest, one digit of its card.json changed after signing (files are addressed by
    content: the card is v3's alone, so no other version's chunks are touched)."""
    data = bytearray(bundle.data[CARD_FILE])
    at = data.index(b"entropy_tau") + len(b'entropy_tau": 0.')
    data[at] = ord("9") if data[at] != ord("9") else ord("1")
    return Bundle(bundle.signed, {**bundle.data, CARD_FILE: bytes(data)})


class Scenario:
    """The operator's side of the run (`run_fleet(during=...)`)."""

    def __init__(self, figures: RolloutFigures, bundles: Dict[str, Bundle], console: Console, args: Any):
        self.figures = figures
        self.bundles = bundles
        self.console = console
        self.args = args

    def __call__(self, broker: Any, devices: List[str], result: FleetResult) -> None:
        try:
            with Operator(broker.credentials("operator"), Topics(), timeout_s=60.0) as op:
                self._run(op, devices)
        except Exception as exc:  # the figures say what was not reached; the run itself goes on
            logger.exception("the rollout scenario failed")
            self.figures.events.append(f"scenario failed: {exc}")

    def _say(self, line: str) -> None:
        self.figures.events.append(line)
        self.console.print(line)

    def _serving(self, op: Operator, devices: List[str], version: str) -> int:
        with op.lock:
            return sum(
                1
                for d in devices
                if (s := op.statuses.get(d)) is not None and s.model and s.model.current.version == version
            )

    def _wait(self, op: Operator, what: str, condition: Any, timeout_s: float = 300.0) -> Optional[float]:
        started, seen = time.monotonic(), -1
        while not condition():
            if time.monotonic() - started > timeout_s:
                self._say(f"timed out after {timeout_s:.0f} s waiting for {what}")
                return None
            seen = op.wait_status_change(seen, 1.0)
        return time.monotonic() - started

    def _run(self, op: Operator, devices: List[str]) -> None:
        f, args = self.figures, self.args
        canary, fleet = devices[: f.canary], devices[f.canary :]
        op.watch_status()

        def online() -> int:
            with op.lock:
                return sum(
                    1 for d in devices if (s := op.statuses.get(d)) and s.state == "online" and s.model
                )

        self._wait(op, "every agent online", lambda: online() == len(devices), 600)
        self._say(f"{online()} agents online; v1 = the committed model")
        # Some offloads compared under v1 first: the baseline the canary verdicts compare with.
        time.sleep(args.baseline_s)
        verdict_args = dict(threshold=args.threshold, min_compared=args.min_compared, timeout_s=300.0)
        v2 = self.bundles["v2"]
        op.publish_files(v2)
        t0 = time.monotonic()
        op.publish(v2.signed, CANARY)
        verdict = watch(op, CANARY, "v2", **verdict_args)
        f.canary_v2, f.canary_v2_s = verdict.decision, time.monotonic() - t0
        self._say(f"canary on v2: {verdict.decision} after {f.canary_v2_s:.1f} s ({verdict.reason})")
        op.publish(v2.signed, FLEET)
        f.fleet_on_v2_s = self._wait(
            op, "the fleet on v2", lambda: self._serving(op, devices, "v2") == len(devices)
        )
        self._say(f"all {len(devices)} agents serve v2, {_s(f.fleet_on_v2_s)} after the promotion")

        v3 = self.bundles["v3"]
        op.publish_files(tampered(v3))
        t0 = time.monotonic()
        for group in (CANARY, FLEET):
            op.publish(v3.signed, group)

        def refused() -> int:
            with op.lock:
                return sum(
                    1 for d in devices if (s := op.statuses.get(d)) and s.model and s.model.refused >= 1
                )

        f.tampered_refused_s = self._wait(
            op, "every agent refusing v3", lambda: refused() == len(devices), 120
        )
        f.tampered_refused, f.served_tampered = refused(), self._serving(op, devices, "v3")
        self._say(
            f"tampered v3 refused by {f.tampered_refused} agents within {_s(f.tampered_refused_s)}; "
            f"{f.served_tampered} serve it"
        )
        for group in (CANARY, FLEET):
            was, now = op.rollback(group)
            self._say(f"{group} rolled back by hand from {was} to {now}")

        v4 = self.bundles["v4"]
        op.publish_files(v4)
        t0 = time.monotonic()
        op.publish(v4.signed, CANARY)
        verdict = watch(op, CANARY, "v4", **verdict_args)
        f.canary_v4, f.rollback_verdict_s = verdict.decision, time.monotonic() - t0
        self._say(f"canary on v4: {verdict.decision} after {f.rollback_verdict_s:.1f} s ({verdict.reason})")
        if verdict.decision == ROLLBACK:
            op.rollback(CANARY)
            back = self._wait(
                op, "the canary back on v2", lambda: self._serving(op, canary, "v2") == len(canary)
            )
            f.rollback_done_s = None if back is None else time.monotonic() - t0
            self._say(f"canary back on v2 {_s(f.rollback_done_s)} after v4 was published")
        self._say(f"fleet agents on v2 at the end: {self._serving(op, fleet, 'v2')} of {len(fleet)}")


def _s(seconds: Optional[float]) -> str:
    return "never" if seconds is None else f"{seconds:.1f} s"


def run(args: argparse.Namespace, console: Console) -> RolloutFigures:
    results = args.results / time.strftime("rollout-%Y%m%d-%H%M%S")
    keys = results / "keys"
    _, public = keygen(keys)
    key = load_private_key(keys / "model-signing.key")
    versions = make_versions(args.models, results / "versions")
    bundles = {
        "v2": build_bundle(versions["v2"], "v2", key, notes="recalibrated: entropy_tau x 0.9 (synthetic)"),
        "v3": build_bundle(versions["v3"], "v3", key, notes="to be tampered with after signing"),
        "v4": build_bundle(versions["v4"], "v4", key, notes="bad: main block's classes rotated (synthetic)"),
    }
    figures = RolloutFigures(args.agents, args.canary, args.samples)

    def agent_args(device: str) -> List[str]:
        group = CANARY if int(device.rsplit("-", 1)[1]) < args.canary else FLEET
        return ["--model-group", group, "--trusted-key", str(public)]

    fleet = run_fleet(
        agents=args.agents,
        workers=args.workers,
        samples=args.samples,
        models=args.models,
        results=results,
        rate=args.rate,
        console=console,
        extra_agent_args=agent_args,
        during=Scenario(figures, bundles, console, args),
    )
    figures.rows, figures.lost, figures.duplicates = fleet.rows, fleet.lost, fleet.duplicates
    figures.agent_failures = fleet.agent_failures
    with sqlite3.connect(results / "fleet.db") as db:
        figures.rows_by_version = dict(
            db.execute(
                "SELECT COALESCE(model_version, '(none)'), COUNT(*) FROM inferences GROUP BY 1"
            ).fetchall()
        )
    figures.rows_without_version = figures.rows_by_version.get("(none)", 0)
    figures.refusals_in_logs = _refusals(results)
    return figures


def _refusals(results: Path) -> Dict[str, int]:
    """The agents' own count of refusals by reason (the `rollout` of the summary each prints at exit)."""
    total: Dict[str, int] = {}
    for log in (results / "fleet").glob("*/logs/sim-*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if line.startswith("{") and '"rollout"' in line:
                for reason, n in json.loads(line).get("rollout", {}).get("refusals", {}).items():
                    total[reason] = total.get(reason, 0) + int(n)
    return total


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.rollout_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--canary", type=int, default=10, help="agents in the canary group (default 10)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=800, help="samples per agent (default 800)")
    parser.add_argument("--rate", type=float, default=4.0, help="samples/s per agent (default 4)")
    parser.add_argument("--min-compared", type=int, default=150, help="canary verdict after N (default 150)")
    parser.add_argument("--threshold", type=float, default=0.15, help="allowed agreement fall (default 0.15)")
    parser.add_argument("--baseline-s", type=float, default=10.0, help="v1 offloads compared first (s)")
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    if not 0 < args.canary < args.agents:
        parser.error("--canary must be between 1 and --agents - 1")
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    figures = run(args, console)
    out = asdict(figures)
    out["checks"] = figures.checks()
    print(json.dumps(out))
    for name, ok in figures.checks().items():
        print(f"{'met' if ok else 'NOT MET'}: {name}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0 if all(figures.checks().values()) else 1


if __name__ == "__main__":
    sys.exit(main())
