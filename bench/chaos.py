"""Chaos matrix: one agent streams a dataset while a part of the system is killed and restarted; every
sample is then accounted for in the results database.

    python -m bench.chaos                          # every scenario, 1,500 samples at 150/s each
    python -m bench.chaos --scenarios agent-kill,broker-kill --samples 3000 --rate 200
    python -m bench.chaos --json results/chaos.json

Each scenario gets its own broker, collector, two cloud workers and results database, and runs the real
`edgecascade agent` CLI (policy meanet, so that samples exit at the edge and in the cloud) with one run id.
Every dataset item is accounted for in the database (`bench.accounting`): missing is lost, twice is a
duplicate. The agent's run must also end (its `run_end` record says how many samples the run has).

Scenarios (the event fires `--at` seconds after the agent is ready):
  none            nothing happens (the control)
  collector-kill  the collector is SIGKILLed and restarted
  worker-kill     cloud worker 0 is SIGKILLed (its in-flight offloads fall back) and restarted
  broker-restart  the broker is stopped with SIGTERM and restarted
  broker-kill     the broker is SIGKILLed (it forgets what it acknowledged since its last save) and restarted
  agent-resume    the agent is stopped with SIGTERM and started again with the same run id
  agent-kill      the agent is SIGKILLed and started again with the same run id
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sqlite3
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Counter, List, Optional

from rich.console import Console
from rich.table import Table

from bench.accounting import Identity, compare, identities
from bench.services import ServiceGroup, cloud_site
from broker.launcher import BrokerProcess

logger = logging.getLogger(__name__)

SCENARIOS = (
    "none",
    "collector-kill",
    "worker-kill",
    "broker-restart",
    "broker-kill",
    "agent-resume",
    "agent-kill",
)
DEVICE = "chaos-cam"


@dataclass
class ChaosResult:
    scenario: str
    samples: int
    rows: int = 0
    lost: int = 0
    duplicates: int = 0
    fallbacks: int = 0
    rejected: int = 0
    run_end_samples: Optional[int] = None
    agent_exits: List[int] = field(default_factory=list)
    seconds: float = 0.0
    event: str = ""

    @property
    def ok(self) -> bool:
        return self.lost == 0 and self.duplicates == 0 and self.run_end_samples == self.samples


def run_scenario(
    scenario: str, *, samples: int, rate: float, at_s: float, models: Path, workdir: Path, console: Console
) -> ChaosResult:
    result = ChaosResult(scenario, samples)
    db = workdir / "results.db"
    run_id = f"chaos-{scenario}"
    with cloud_site(workdir, db, models, workers=2) as (broker, services):
        agent_args = [
            "agent",
            *services.login(broker.credentials(DEVICE), user_flag="--device-id"),
            "--models", str(models),
            "--policy", "meanet",
            "--source", f"dataset:fashion-mnist:test:{samples}",
            "--rate", str(rate),
            "--state-dir", str(workdir / "state"),
            "--run-id", run_id,
            "--idle-seconds", "0",
            "--close-timeout", "120",  # after a broker SIGKILL, batches wait for the receipt timeout (30 s)
            "--no-progress",
        ]  # fmt: skip
        started = time.monotonic()
        services.start("agent", agent_args)
        time.sleep(at_s)  # the event's time is the scenario's parameter, not a wait for a condition
        result.event = _strike(scenario, services, broker, agent_args, result, models, db)
        console.print(f"[yellow]{scenario}[/]: {result.event}")
        result.agent_exits.append(services.wait("agent", timeout_s=600))
        result.seconds = time.monotonic() - started
        _account(db, run_id, identities(models, samples), result)
    return result


def _strike(
    scenario: str,
    services: ServiceGroup,
    broker: BrokerProcess,
    agent_args: List[str],
    result: ChaosResult,
    models: Path,
    db: Path,
) -> str:
    if scenario == "none":
        return "nothing"
    if scenario == "collector-kill":
        services.kill("collector")
        services.start_collector(broker.credentials("collector"), db)
        return "collector SIGKILLed and restarted"
    if scenario == "worker-kill":
        services.kill("cloud-0")
        services.start_cloud("cloud-0", broker.credentials("cloud"), models, "w0", ["--threads", "1"])
        return "cloud worker 0 SIGKILLed and restarted"
    if scenario in ("broker-restart", "broker-kill"):
        if scenario == "broker-kill":
            broker.kill()
        else:
            broker.stop()
        broker.start()
        return (
            "broker " + ("SIGKILLed" if scenario == "broker-kill" else "stopped (SIGTERM)") + " and restarted"
        )
    if scenario in ("agent-resume", "agent-kill"):
        how = signal.SIGKILL if scenario == "agent-kill" else signal.SIGTERM
        result.agent_exits.append(services.signal("agent", how))
        services.start("agent", agent_args)
        return f"agent {how.name} and started again with the same run id"
    raise ValueError(f"unknown scenario {scenario!r}; known: {', '.join(SCENARIOS)}")


def _account(db: Path, run_id: str, expected: Counter[Identity], result: ChaosResult) -> None:
    """Wait (bounded) for the run's rows and its end, then compare them with the dataset."""
    deadline = time.monotonic() + 120
    while True:
        with sqlite3.connect(db, timeout=10) as conn:
            rows = conn.execute(
                "SELECT label, p_main, exit_stage FROM inferences WHERE run_id = ?", (run_id,)
            ).fetchall()
            ended = conn.execute("SELECT samples FROM runs WHERE run_id = ?", (run_id,)).fetchone()
            rejected = conn.execute("SELECT COUNT(*) FROM rejected_records").fetchone()[0]
        if (len(rows) >= result.samples and ended and ended[0] is not None) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    result.rows = len(rows)
    result.lost, result.duplicates = compare(expected, [(label, p) for label, p, _ in rows])
    result.fallbacks = sum(1 for *_, stage in rows if stage == "fallback")
    result.rejected = int(rejected)
    result.run_end_samples = None if not ended else ended[0]


def table(results: List[ChaosResult]) -> Table:
    out = Table(title="chaos matrix: every sample accounted for in the results database")
    for column in (
        "scenario",
        "samples",
        "rows",
        "lost",
        "dupes",
        "fallbacks",
        "rejected",
        "run_end",
        "agent exits",
        "s",
        "",
    ):
        out.add_column(column, justify="right")
    for r in results:
        out.add_row(
            r.scenario,
            f"{r.samples:,}",
            f"{r.rows:,}",
            str(r.lost),
            str(r.duplicates),
            str(r.fallbacks),
            str(r.rejected),
            str(r.run_end_samples),
            ",".join(str(c) for c in r.agent_exits),
            f"{r.seconds:.0f}",
            "[green]ok[/]" if r.ok else "[red]FAIL[/]",
        )
    return out


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--scenarios", default="all", help="comma-separated names, or all")
    parser.add_argument("--samples", type=int, default=1500)
    parser.add_argument("--rate", type=float, default=150.0, help="samples/s the agent is fed (a camera)")
    parser.add_argument("--at", type=float, default=4.0, help="seconds after the agent is ready to strike")
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--workdir", type=Path, default=Path("results/chaos"))
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    names = list(SCENARIOS) if args.scenarios == "all" else args.scenarios.split(",")
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s) {', '.join(unknown)}; known: {', '.join(SCENARIOS)}")
    console = Console(stderr=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results = [
        run_scenario(
            name,
            samples=args.samples,
            rate=args.rate,
            at_s=args.at,
            models=args.models,
            workdir=args.workdir / stamp / name,
            console=console,
        )
        for name in names
    ]
    Console(width=200).print(table(results))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps([{**asdict(r), "ok": r.ok} for r in results], indent=2))
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
