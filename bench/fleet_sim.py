"""Fleet simulation: many device agents (separate processes, own credentials) against one broker and a
few cloud workers in the shared subscription, with optional chaos: a worker killed, the broker killed and
restarted.

    python -m bench.fleet_sim --agents 50 --workers 2 --samples 100
    python -m bench.fleet_sim --agents 50 --workers 2 --kill-worker-at 15 --kill-broker-at 25
    python -m bench.fleet_sim --agents 50 --workers 2 --samples 1000 --cloud-cpus 0.05 --start-after 40
    python -m bench.fleet_sim --agents 20 --compare-workers     # throughput with 1 worker, then 2

Every agent is the real `edgecascade agent` CLI; every result goes through the collector into the results
database (`results/fleet.db`; `--postgres`: a private PostgreSQL server; `--db URL`), where every device's
dataset items are accounted for (`bench.accounting`): an item without its row is lost, one with two is a
duplicate.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import logging
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ContextManager, Counter, Dict, List, Optional, Sequence, Tuple, Union

from rich.console import Console
from rich.table import Table

from bench.accounting import Identity, compare, identities
from bench.fleet_loads import LoadWatch, all_running, late_starters, run_spans, streaming
from bench.results_sql import query
from bench.run import wait_for_rows
from bench.services import ServiceGroup, cloud_site
from broker.launcher import BrokerProcess
from protocol.topics import Topics
from results_db.stats import nearest_rank

logger = logging.getLogger(__name__)

# The devices' niceness: here they share the host's cores with the broker, the workers and the collector,
# which in a fleet run on machines of their own. At 0, 50 agents flat out starve the broker (offloads then
# wait ~1 s in it while the workers idle); at 19 the cloud side gets the CPU it asks for first.
DEVICE_NICE = 19


@dataclass
class FleetResult:
    agents: int
    workers: int
    samples_per_agent: int
    seconds: float = 0.0
    rows: int = 0
    lost: int = 0  # dataset items without a row (bench.accounting)
    duplicates: int = 0  # dataset items with more than one
    fallbacks: int = 0  # offloads that waited out their deadline
    shed: int = 0  # offloads the capacity rule kept at the edge (labelled)
    cloud_answers: int = 0
    accuracy: float = 0.0
    edge_only_accuracy: float = 0.0  # the same samples, the edge cascade answering all
    workers_busy: List[float] = field(default_factory=list)  # each worker's compute time / the run
    streaming_s: float = 0.0  # from the fleet's first sample to its last
    workers_busy_streaming: List[float] = field(default_factory=list)  # ... each worker's busy share then
    all_running_s: float = 0.0  # how long every agent was running at once
    workers_busy_all_running: List[float] = field(default_factory=list)  # ... each worker's busy share then
    agent_failures: int = 0
    resent: int = 0  # offloads sent a second time (unanswered at half the deadline, no live worker vouched)
    resends_spared: int = 0  # ... held back: a live worker had it (device_agent.offloads)
    events: List[str] = field(default_factory=list)
    per_device: List[Dict[str, Any]] = field(default_factory=list)

    @property
    def expected(self) -> int:
        return self.agents * self.samples_per_agent

    @property
    def throughput(self) -> float:
        return self.expected / self.seconds if self.seconds else 0.0

    @property
    def deadline_waits(self) -> float:
        """Offloads that waited out their deadline, as a fraction of the offloads sent."""
        sent = self.cloud_answers + self.fallbacks
        return self.fallbacks / sent if sent else 0.0

    @property
    def cloud_rate(self) -> float:
        """Samples answered by the cloud per second: what the workers add."""
        return self.cloud_answers / self.seconds if self.seconds else 0.0


def _latencies(db: Union[Path, str], fleet_id: str) -> List[Dict[str, Any]]:
    """Offload round trip (network + cloud) p50/p99 per device, nearest rank, from the database."""
    rows = query(
        db,
        "SELECT device_id, network_ms + cloud_ms FROM inferences "
        "WHERE run_id LIKE ? AND exit_stage = 'cloud' ORDER BY device_id",
        (f"{fleet_id}-%",),
    )
    by_device: Dict[str, List[float]] = {}
    for device, ms in rows:
        by_device.setdefault(device, []).append(ms)
    return [
        {
            "device_id": device,
            "offloads": len(values),
            "p50_ms": nearest_rank(values, 50),
            "p99_ms": nearest_rank(values, 99),
        }
        for device, values in sorted(by_device.items())
    ]


def run_fleet(
    *,
    agents: int,
    workers: int,
    samples: int,
    policy: str = "meanet",
    models: Path,
    results: Path,
    kill_worker_at: Optional[float] = None,
    kill_broker_at: Optional[float] = None,
    hard_broker_kill: bool = False,
    rate: Optional[float] = None,
    cloud_cpus: Optional[float] = None,
    device_nice: int = DEVICE_NICE,
    db_url: Optional[str] = None,
    start_after_s: Optional[float] = None,
    console: Console,
    site: Callable[..., ContextManager[Tuple[Any, ServiceGroup]]] = cloud_site,
    broker_down_s: float = 1.0,
    extra_agent_args: Callable[[str], Sequence[str]] = lambda device: (),
    during: Optional[Callable[[Any, List[str], FleetResult], None]] = None,
) -> FleetResult:
    """`site(workdir, db, models, workers, cloud_cpus=...)`: the cloud side, `cloud_site` (one broker) unless
    told otherwise (`bench.cells_bench`: cells behind HAProxy, its `broker` the front that kills one cell).
    `extra_agent_args(device)`: more flags for that device's agent; `during(broker, devices, result)`: a
    scenario on a thread of its own while the agents stream (`bench.rollout_bench`: a model rollout), joined
    before the rows are accounted for. `db_url`: the results database (default `results`/fleet.db)."""
    fleet_id = time.strftime("fleet%Y%m%d-%H%M%S") + f"-a{agents}w{workers}"
    result = FleetResult(agents, workers, samples)
    results.mkdir(parents=True, exist_ok=True)
    db: Union[Path, str] = db_url or results / "fleet.db"
    devices = [f"sim-{i:03d}" for i in range(agents)]
    workdir = results / "fleet" / fleet_id
    if cloud_cpus:
        result.events.append(f"each worker's compute held to {cloud_cpus:g} CPU")
    with site(workdir, db, models, workers, cloud_cpus=cloud_cpus) as (broker, services):
        broker.add_users(devices)  # each agent its own password; the ACL fences it to its own topics
        watch = LoadWatch(broker.credentials("sim-loadwatch"), Topics())
        console.print(
            f"[bold]{fleet_id}[/]: {agents} agents x {samples} samples ({policy}), {workers} worker(s)"
        )
        started = time.monotonic()
        start_at = None if start_after_s is None else time.time() + start_after_s
        if start_at is not None:
            result.events.append(f"all start {start_after_s:g} s after launch")
        nice = ["nice", "-n", str(device_nice)] if device_nice else []
        for device in devices:
            agent_args = [
                "agent",
                *services.login(broker.credentials(device), user_flag="--device-id"),
                "--models", str(models),
                "--policy", policy,
                "--source", f"dataset:fashion-mnist:test:{samples}",
                "--state-dir", str(workdir / "state" / device),
                "--run-id", f"{fleet_id}-{device}",
                "--idle-seconds", "0",
                # after a broker crash, batches wait up to the receipt timeout (30 s) to be resent
                "--close-timeout", "180",
                "--no-progress",
                *(["--rate", str(rate)] if rate else []),
                *(["--start-at", f"{start_at:.3f}"] if start_at is not None else []),
                *extra_agent_args(device),
            ]  # fmt: skip
            services.start(device, agent_args, wait_ready=False, prefix=nice)
        chaos = threading.Thread(
            target=_chaos,
            args=(
                services,
                broker,
                started,
                kill_worker_at,
                kill_broker_at,
                result,
                console,
                hard_broker_kill,
                broker_down_s,
            ),
            daemon=True,
        )
        chaos.start()
        scenario = None
        if during is not None:
            scenario = threading.Thread(target=during, args=(broker, devices, result), daemon=True)
            scenario.start()
        for device in devices:
            result.agent_failures += services.wait(device, timeout_s=900) != 0
        result.seconds = time.monotonic() - started
        chaos.join(1)
        if scenario is not None:
            scenario.join(60)
        expected = identities(models, samples, with_confidence=policy != "cloud-only")
        wait_for_rows(db, {f"{fleet_id}-{d}": samples for d in devices}, console)
        _account(db, fleet_id, devices, expected, result)
        spans = run_spans(db, [f"{fleet_id}-{d}" for d in devices])
        window, span = all_running(spans, len(devices)), streaming(spans)
        watch.close()
        if span is not None:
            result.streaming_s = span[1] - span[0]
            if start_at is not None:
                late = late_starters(spans, start_at + 1.0)
                if late:
                    result.events.append(f"{late} agent(s) not ready to start together: raise --start-after")
            result.workers_busy_streaming = list(watch.busy_between(*span).values())
        if window is not None:
            result.all_running_s = window[1] - window[0]
            result.workers_busy_all_running = list(watch.busy_between(*window).values())
        services.stop("collector")
    result.workers_busy = [_busy(workdir / "logs" / f"cloud-{w}.log", result.seconds) for w in range(workers)]
    for device in devices:
        stats = _offload_stats(workdir / "logs" / f"{device}.log")
        result.resent += stats.get("resent", 0)
        result.resends_spared += stats.get("resends_spared", 0)
    result.edge_only_accuracy = _edge_only_accuracy(models, samples)
    result.per_device = _latencies(db, fleet_id)
    return result


def _busy(log: Path, run_s: float) -> float:
    """A worker's compute seconds over the fleet run's length, from the stats line it prints when it stops."""
    busy = 0.0
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{") and '"busy_s"' in line:
            busy = float(json.loads(line)["busy_s"])
    return busy / run_s if run_s else 0.0


def _offload_stats(log: Path) -> Dict[str, int]:
    """An agent's offload counters, from the JSON summary it prints last ({} if it printed none)."""
    for line in reversed(log.read_text(errors="replace").splitlines()):
        if line.startswith("{") and '"offload_stats"' in line:
            return dict(json.loads(line)["offload_stats"])
    return {}


def _edge_only_accuracy(models: Path, samples: int) -> float:
    from device_agent.cascade import EdgeCascade
    from device_agent.sources import load_idx_dataset

    images, labels = load_idx_dataset("fashion-mnist", "test", samples)
    cascade = EdgeCascade(models)
    right = sum(cascade.decide(image[None])[0].prediction == int(y) for image, y in zip(images, labels))
    return right / len(labels)


def _chaos(
    services: ServiceGroup,
    broker: BrokerProcess,
    started: float,
    kill_worker_at: Optional[float],
    kill_broker_at: Optional[float],
    result: FleetResult,
    console: Console,
    hard_broker_kill: bool = False,
    broker_down_s: float = 1.0,
) -> None:
    plan = sorted([(t, what) for t, what in ((kill_worker_at, "worker"), (kill_broker_at, "broker")) if t])
    for at, what in plan:
        time.sleep(max(0.0, started + at - time.monotonic()))
        if what == "worker":
            proc = services.procs.get("cloud-0")
            if proc is not None:
                proc.kill()  # SIGKILL: no goodbye; its in-flight requests are lost with it
                result.events.append(f"t={at:g}s cloud-0 killed (SIGKILL)")
        else:
            if hard_broker_kill:
                broker.kill()  # SIGKILL, a power cut: loses what it acknowledged since its last save
            else:
                broker.stop()  # SIGTERM: mosquitto writes its persistence file first
            time.sleep(broker_down_s)
            broker.start()
            how = "killed (SIGKILL)" if hard_broker_kill else "stopped (SIGTERM)"
            what = getattr(broker, "name", "broker")
            result.events.append(f"t={at:g}s {what} {how} and restarted after {broker_down_s:g} s")
        console.print(f"[yellow]{result.events[-1]}[/]")


def _account(
    db: Union[Path, str], fleet_id: str, devices: List[str], expected: Counter[Identity], result: FleetResult
) -> None:
    """Account for each device's dataset items (`bench.accounting`) and count the exit stages."""
    rows = query(
        db,
        "SELECT run_id, label, p_main, exit_stage, prediction FROM inferences WHERE run_id LIKE ?",
        (f"{fleet_id}-%",),
    )
    by_run: Dict[str, List[Tuple[int, Optional[float]]]] = {f"{fleet_id}-{d}": [] for d in devices}
    for run_id, label, p_main, *_ in rows:
        by_run.setdefault(run_id, []).append((label, p_main))
    result.rows = len(rows)
    result.lost = result.duplicates = 0
    for items in by_run.values():
        lost, dupes = compare(expected, items)
        result.lost += lost
        result.duplicates += dupes
    result.fallbacks = sum(1 for row in rows if row[3] == "fallback")
    result.shed = sum(1 for row in rows if row[3] == "shed")
    result.cloud_answers = sum(1 for row in rows if row[3] == "cloud")
    result.accuracy = sum(row[1] == row[4] for row in rows) / len(rows) if rows else 0.0


def add_db_options(parser: argparse.ArgumentParser) -> None:
    """--db URL | --postgres: where the collector writes the results (default: SQLite, fleet.db)."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--db", metavar="URL", help="results database URL (postgresql+psycopg://...)")
    where.add_argument(
        "--postgres", action="store_true", help="the results in a private PostgreSQL server, stopped after"
    )


def results_db_url(args: argparse.Namespace) -> Optional[str]:
    """The database URL of `add_db_options`, migrated before any collector starts (a cell each: they would
    race), or None (fleet.db in --results); a private server stops when this process exits."""
    from results_db import open_database
    from results_db.testing import private_postgres_url

    url = args.db
    if args.postgres:
        server = contextlib.ExitStack()
        atexit.register(server.close)
        url = server.enter_context(private_postgres_url())
    if url is not None:
        open_database(url).dispose()
    return url


def summary_table(results: List[FleetResult]) -> Table:
    table = Table(title="fleet simulation")
    for col in (
        "agents",
        "workers",
        "samples",
        "rows",
        "lost",
        "dupes",
        "fallbacks (deadline)",
        "of offloads",
        "shed",
        "re-sent (spared)",
        "accuracy (edge-only)",
        "workers busy (processes up)",
        "... while streaming",
        "... while all ran",
        "agent exits != 0",
        "samples/s",
        "cloud answers/s",
        "offload p50 ms (median device)",
        "p99 ms (worst device)",
        "chaos",
    ):
        table.add_column(col, justify="right")
    for r in results:
        p50s = sorted(d["p50_ms"] for d in r.per_device) or [float("nan")]
        p99 = max((d["p99_ms"] for d in r.per_device), default=float("nan"))
        table.add_row(
            str(r.agents),
            str(r.workers),
            f"{r.expected:,}",
            f"{r.rows:,}",
            str(r.lost),
            str(r.duplicates),
            str(r.fallbacks),
            f"{r.deadline_waits:.1%}",
            str(r.shed),
            f"{r.resent} ({r.resends_spared})",
            f"{r.accuracy:.2%} ({r.edge_only_accuracy:.2%})",
            " ".join(f"{b:.0%}" for b in r.workers_busy),
            " ".join(f"{b:.0%}" for b in r.workers_busy_streaming) + f" ({r.streaming_s:.0f} s)",
            " ".join(f"{b:.0%}" for b in r.workers_busy_all_running) + f" ({r.all_running_s:.0f} s)",
            str(r.agent_failures),
            f"{r.throughput:,.0f}",
            f"{r.cloud_rate:,.0f}",
            f"{p50s[len(p50s) // 2]:.1f}",
            f"{p99:.1f}",
            "; ".join(r.events) or "—",
        )
    return table


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.fleet_sim",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--agents", type=int, default=50)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--samples", type=int, default=100, help="samples per agent")
    parser.add_argument("--rate", type=float, help="samples/s per agent, like a camera (default: flat out)")
    parser.add_argument(
        "--cloud-cpus",
        type=float,
        help="hold each cloud worker to this many CPUs (cgroup quota; 0.05 = 5 %% of a core): a cloud "
        "smaller than the fleet's demand, as for the capacity figures (default: no quota)",
    )
    parser.add_argument(
        "--device-nice",
        type=int,
        default=DEVICE_NICE,
        help="the agents' niceness: they yield the shared CPU to the cloud side (default %(default)s; "
        "0: everything competes as equals)",
    )
    parser.add_argument(
        "--start-after",
        type=float,
        metavar="S",
        help="every agent takes its first sample S seconds after the launch, together (50 agents load in "
        "~20 s on 2 cores; default: each as soon as it has started)",
    )
    parser.add_argument(
        "--policy", default="meanet", help="agents' policy (cloud-only overloads 2 cores: all fallbacks)"
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument(
        "--kill-worker-at", type=float, help="SIGKILL cloud worker 0 this many s into the run"
    )
    parser.add_argument("--kill-broker-at", type=float, help="stop the broker this many s in, restart it")
    parser.add_argument(
        "--hard-broker-kill", action="store_true", help="SIGKILL the broker rather than SIGTERM (see README)"
    )
    parser.add_argument(
        "--compare-workers", action="store_true", help="run with 1 worker, then with --workers"
    )
    parser.add_argument("--json", type=Path, help="write the figures as JSON here")
    add_db_options(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    console = Console(stderr=True)
    worker_counts = [1, args.workers] if args.compare_workers else [args.workers]
    db_url = results_db_url(args)
    results = [
        run_fleet(
            agents=args.agents,
            workers=w,
            samples=args.samples,
            policy=args.policy,
            models=args.models,
            results=args.results,
            kill_worker_at=None if args.compare_workers else args.kill_worker_at,
            kill_broker_at=None if args.compare_workers else args.kill_broker_at,
            hard_broker_kill=args.hard_broker_kill,
            rate=args.rate,
            cloud_cpus=args.cloud_cpus,
            device_nice=args.device_nice,
            start_after_s=args.start_after,
            console=console,
            db_url=db_url,
        )
        for w in worker_counts
    ]
    Console(width=200).print(summary_table(results))
    if args.json:
        args.json.write_text(
            json.dumps(
                [
                    {
                        **r.__dict__,
                        "throughput": r.throughput,
                        "cloud_rate": r.cloud_rate,
                        "deadline_waits": r.deadline_waits,
                    }
                    for r in results
                ],
                indent=2,
            )
        )
    return 0 if all(r.lost == 0 and r.duplicates == 0 for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
