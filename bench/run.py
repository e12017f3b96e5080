"""One benchmark run: broker, collector, cloud workers and the device agent over MQTT, once per policy.

The same code paths as production: services are the real `edgecascade` CLI in child processes, the agent is
`DeviceAgent`, results travel over MQTT to the collector and into SQLite. Then the HTTP peer (Sedna-style)
runs the same filter and models, and the report and the targets are printed.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Optional, Tuple, TypeVar, Union

import numpy as np
from rich.console import Console
from rich.markup import escape
from tqdm import tqdm

from bench.http_baseline import run_http_peer
from bench.stack import DEVICE_ID, HTTP_DEVICE_ID, CloudSide, cloud_side
from device_agent import AgentConfig, DeviceAgent
from device_agent.card import sha256_file
from device_agent.cascade import EdgeCascade
from device_agent.config import apply_profile, load_profile
from device_agent.sources import load_idx_dataset
from protocol.codec import CONTENT_TYPE_RESULTS, encode_records
from protocol.mqtt import BrokerAddress, new_client, publish_properties
from protocol.topics import Topics

logger = logging.getLogger(__name__)
T = TypeVar("T")

POLICIES: List[Dict[str, Any]] = [
    {"name": "edge-only", "params": {}},
    {"name": "cloud-only", "params": {}},
    {"name": "meanet", "params": {}},
    {"name": "hi-threshold", "params": {}},
    {"name": "hi-online", "params": {}},
    {"name": "entropy", "params": {}},
]
# Parameter sweeps of the threshold policies, for the Pareto front.
SWEEPS: Dict[str, Tuple[str, List[float]]] = {
    "hi-threshold": ("theta", [0.5, 0.6, 0.8, 0.9, 0.95]),
    "entropy": ("tau", [0.1, 0.2, 0.4, 0.5, 0.6]),
}


def run_label(label: str) -> str:
    """A run label (`hi-threshold[theta=0.77]`) as the run-id part it names (`hi-threshold_theta-0.77`)."""
    return re.sub(r"[^A-Za-z0-9._-]", "", label.replace("[", "_").replace("=", "-"))


@dataclass
class BenchConfig:
    profile: str = "x86"
    quick: bool = False
    samples: Optional[int] = None  # default: 10,000 (quick: 1,000)
    sweep: Optional[bool] = None  # default: not in quick mode
    models: Path = Path("models/fashion-mnist")
    results: Path = Path("results")
    broker: Optional[str] = None  # host:port of an existing broker (then `credentials` is needed)
    credentials: Optional[Path] = None  # JSON from `edgecascade broker --credentials-out`
    link: Optional[str] = None  # a link profile (bench/profiles/links) the device side reaches the cloud over
    http_peer: bool = True
    # The HTTP peer's clients (bench.http_baseline.HTTP_STYLES), each a run labelled `http_label(style)`.
    http_styles: Tuple[str, ...] = ("keepalive",)
    progress: bool = True
    idle_seconds: Optional[float] = None  # override the profile's idle baseline length (tests)
    # Service latency is measured at a camera's pace (0: no paced runs), throughput flat out: a flat-out run's
    # latency is mostly the queue in front of a saturated worker, which a paced device never sees.
    rate_hz: float = 30.0
    paced_samples: int = 300
    policies: List[Dict[str, Any]] = field(default_factory=lambda: [dict(p) for p in POLICIES])
    # Off: the benchmark compares what each policy decides, like for like with the HTTP peer (which has no
    # shedding). On, a policy fast enough flat out to outrun the one worker would shed, and its accuracy would
    # show the cloud's capacity, not the policy (hi-threshold 93.66 % instead of 94.00 % on 2026-12-03).
    # Shedding is measured where it is the point: the fleet simulation and the links' outage run.
    capacity_aware: bool = False
    # Back off offloading while the cloud is less sure than the edge (device_agent.safety); `--cloud-watch`.
    cloud_watch: bool = False

    @property
    def n_samples(self) -> int:
        return self.samples or (1000 if self.quick else 10000)

    @property
    def do_sweep(self) -> bool:
        return (not self.quick) if self.sweep is None else self.sweep


@dataclass
class BenchResult:
    bench_id: str
    db: Path
    runs: Dict[str, str] = field(default_factory=dict)  # label -> run_id (flat out)
    paced: Dict[str, str] = field(default_factory=dict)  # label -> run_id of its paced run
    paced_hz: Dict[str, float] = field(default_factory=dict)  # label -> the rate the paced run achieved
    summaries: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # label -> agent summary
    http_runs: Dict[str, Dict[str, float]] = field(default_factory=dict)  # label -> its flat-out run
    targets: List[Tuple[str, str, bool]] = field(default_factory=list)
    interrupted: bool = False
    seconds: float = 0.0
    windows: Dict[str, Tuple[float, float]] = field(default_factory=dict)  # run_id -> (start, end) unix
    link_profile: Any = None  # bench.link.LinkProfile, when the device side went over a link
    link_bytes: List[Tuple[float, int, int]] = field(default_factory=list)  # (unix s, up, down) over it

    @property
    def http(self) -> Dict[str, float]:
        """The kept-alive HTTP peer's flat-out run ({} when it did not run): `make bench`'s comparison."""
        return self.http_runs.get(http_label("keepalive"), {})

    def link_trace(self, start: float, end: float) -> List[Tuple[float, int, int]]:
        """The link's traffic between two instants, as (unix s, bytes up, bytes down) transfers."""
        return [t for t in self.link_bytes if start <= t[0] <= end]


def _rotate(db: Path) -> None:
    """Keep an earlier results database beside the new one rather than mixing two benchmarks in one file."""
    if db.exists():
        stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(db.stat().st_mtime))
        for suffix in ("", "-wal", "-shm"):
            old = db.with_name(db.name + suffix)
            if old.exists():
                old.rename(db.with_name(f"bench-{stamp}.db{suffix}"))


def agent_config(
    cfg: BenchConfig, side: CloudSide, profile: Dict[str, Any], policy: Dict[str, Any], run_id: str
) -> AgentConfig:
    """The benchmark device's agent for one run, reaching the cloud side (through its link, if any)."""
    config = apply_profile(
        AgentConfig(
            device_id=DEVICE_ID,
            broker=side.device_address(),
            topics=Topics(),
            model_dir=cfg.models,
            policy=policy,
            state_dir=cfg.results / "state",
            run_id=run_id,
            profile=profile["device"]["name"],
        ),
        profile,
    )
    return dataclasses.replace(config, capacity_aware=cfg.capacity_aware, cloud_watch=cfg.cloud_watch)


def run_bench(cfg: BenchConfig, console: Optional[Console] = None) -> BenchResult:
    console = console or Console(stderr=True)
    started = time.monotonic()
    cfg.results.mkdir(parents=True, exist_ok=True)
    db = cfg.results / "bench.db"
    _rotate(db)
    bench_id = time.strftime("b%Y%m%d-%H%M%S")
    result = BenchResult(bench_id=bench_id, db=db)
    profile = load_profile(cfg.profile)
    images, labels = load_idx_dataset("fashion-mnist", "test", limit=cfg.n_samples)
    console.print(
        f"[bold]edgecascade bench[/] {bench_id}: profile {profile['device']['name']}, "
        f"{len(images)} samples per policy, models {cfg.models}"
    )

    with cloud_side(cfg, db, bench_id, profile.get("cloud", {}), console) as side:
        plan = [(p["name"], p) for p in cfg.policies]
        if cfg.do_sweep:
            for name, (param, values) in SWEEPS.items():
                plan += [(f"{name}[{param}={v:g}]", {"name": name, "params": {param: v}}) for v in values]
        try:
            for label, policy in plan:
                run_id = f"{bench_id}-{run_label(label)}"
                agent_cfg = agent_config(cfg, side, profile, policy, run_id)
                if cfg.idle_seconds is not None:
                    agent_cfg = dataclasses.replace(agent_cfg, idle_seconds=cfg.idle_seconds)
                console.print(
                    f"[cyan]{escape(label)}[/]: idle {agent_cfg.idle_seconds:g} s, {len(images)} samples"
                )
                with DeviceAgent(agent_cfg) as agent:
                    summary = agent.run_dataset(zip(images, (int(x) for x in labels)), progress=cfg.progress)
                result.runs[label] = run_id
                result.summaries[label] = {**summary.as_dict(), "samples_per_s": summary.samples_per_s}
                if cfg.rate_hz and "[" not in label:  # the policies, not each point of a sweep
                    paced_id = f"{run_id}-paced"
                    paced_cfg = dataclasses.replace(agent_cfg, run_id=paced_id, idle_seconds=0.0)
                    n = min(cfg.paced_samples, len(images))
                    console.print(f"[cyan]{escape(label)}[/] paced: {n} samples at {cfg.rate_hz:g} Hz")
                    begun = time.time()
                    with DeviceAgent(paced_cfg) as agent:
                        paced_run = agent.run_dataset(
                            paced(zip(images[:n], (int(x) for x in labels[:n])), cfg.rate_hz),
                            progress=cfg.progress,
                        )
                    result.windows[paced_id] = (begun, time.time())
                    result.paced[label] = paced_id
                    result.paced_hz[label] = paced_run.samples_per_s
            if cfg.http_peer:
                for style in cfg.http_styles:
                    label = http_label(style)
                    result.http_runs[label] = _run_http(
                        cfg, side, images, labels, bench_id, console, style=style
                    )
                    result.runs[label] = f"{bench_id}-{label}"
                    if cfg.rate_hz:
                        n = min(cfg.paced_samples, len(images))
                        begun = time.time()
                        paced_http = _run_http(
                            cfg, side, images[:n], labels[:n], bench_id, console, cfg.rate_hz, style
                        )
                        result.windows[f"{bench_id}-{label}-paced"] = (begun, time.time())
                        result.paced[label] = f"{bench_id}-{label}-paced"
                        result.paced_hz[label] = paced_http["samples_per_s"]
        except KeyboardInterrupt:
            result.interrupted = True
            console.print("[yellow]interrupted: keeping the runs that finished[/]")
        expected = {run_id: len(images) for run_id in result.runs.values()}
        expected.update({run_id: min(cfg.paced_samples, len(images)) for run_id in result.paced.values()})
        wait_for_rows(db, expected, console)
        side.services.stop("collector")
        if side.link is not None:
            result.link_profile, result.link_bytes = side.link.profile, side.link.traffic()
    result.seconds = time.monotonic() - started
    return result


def http_label(style: str) -> str:
    """The label (and run id suffix) of the HTTP peer's runs with one client style."""
    return "http-peer" if style == "keepalive" else f"http-{style}"


def _run_http(
    cfg: BenchConfig,
    side: CloudSide,
    images: np.ndarray,
    labels: np.ndarray,
    bench_id: str,
    console: Console,
    rate_hz: float = 0.0,
    style: str = "keepalive",
) -> Dict[str, float]:
    """The Sedna-style peer, same filter and models; its records go to the collector like any device's.
    With `rate_hz`, samples come at that pace (its run id ends in `-paced`)."""
    label = http_label(style)
    run_id = f"{bench_id}-{label}" + ("-paced" if rate_hz else "")
    cascade = EdgeCascade(cfg.models)
    pace = f" at {rate_hz:g} Hz" if rate_hz else ""
    how = "a blocking POST" if style == "keepalive" else "a new connection and a blocking JSON POST"
    console.print(f"[cyan]{label}[/]: meanet filter, {how} per complex sample, {len(images)} samples{pace}")
    # disable=None: no carriage-return bars when stderr is a log file rather than a terminal
    bar = tqdm(total=len(images), desc=label, unit="img", disable=None if cfg.progress else True)
    samples: Iterable[Tuple[np.ndarray, Optional[int]]] = zip(images, (int(x) for x in labels))
    peer = run_http_peer(
        cascade,
        paced(samples, rate_hz) if rate_hz else samples,
        side.http_address(),
        run_id=run_id,
        device_id=HTTP_DEVICE_ID,
        style=style,
        progress=bar,
    )
    bar.close()
    run_record = {
        "type": "run",
        "run_id": run_id,
        "device_id": HTTP_DEVICE_ID,
        "policy": label,
        "policy_params": {
            "filter": "meanet",
            "transport": "http",
            "client": style,
            **({"rate_hz": rate_hz} if rate_hz else {}),
        },
        "profile": "x86",
        "dataset": "fashion-mnist",
        "split": "test",
        "model_sha256": sha256_file(cfg.models / "card.json"),
        "code_revision": "",
        "host": {},
        "started_unix": time.time() - peer.seconds,
    }
    records = [run_record] + [r.to_record() for r in peer.records]
    publish_records(side.broker.address(HTTP_DEVICE_ID), Topics(), HTTP_DEVICE_ID, records)
    offloaded = sum(r.exit_stage == "cloud" for r in peer.records)
    return {"samples_per_s": peer.throughput, "seconds": peer.seconds, "offloaded": offloaded}


def paced(samples: Iterable[T], rate_hz: float) -> Iterator[T]:
    """Each sample at its frame time (start + i / rate), as a camera delivers them; a consumer that falls
    behind gets the next one at once (so its achieved rate, not its latency, shows that it fell behind)."""
    start = time.monotonic()
    for i, sample in enumerate(samples):
        wait = start + i / rate_hz - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        yield sample


def publish_records(
    address: BrokerAddress, topics: Topics, device_id: str, records: List[Dict[str, Any]], batch: int = 500
) -> None:
    """Publish result records at QoS 1 and return once the broker has acknowledged every batch."""
    client = new_client(address, device_id)  # the broker binds a device account to client id = device id
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        props = publish_properties(content_type=CONTENT_TYPE_RESULTS)
        infos = [
            client.publish(
                topics.results(device_id), encode_records(records[i : i + batch]), qos=1, properties=props
            )
            for i in range(0, len(records), batch)
        ]
        for info in infos:
            info.wait_for_publish(30)
    finally:
        client.disconnect()
        client.loop_stop()


def wait_for_rows(
    db: Union[Path, str],
    expected: Dict[str, int],
    console: Console,
    timeout_s: float = 120,
    table: str = "inferences",
) -> None:
    """The collector commits asynchronously: wait until every finished run (id -> samples) has its rows in
    `table` (`inferences`, or `frames` for video runs)."""
    if table not in ("inferences", "frames"):
        raise ValueError(f"no rows per run in table {table!r}")
    from sqlalchemy import text

    from results_db import open_database

    engine = open_database(db)
    deadline = time.monotonic() + timeout_s
    counts: Dict[str, int] = {}
    while time.monotonic() < deadline:
        with engine.connect() as conn:
            counts = dict(conn.execute(text(f"SELECT run_id, COUNT(*) FROM {table} GROUP BY run_id")).all())
        if all(counts.get(r, 0) >= n for r, n in expected.items()):
            break
        time.sleep(0.5)
    missing = {r: n - counts.get(r, 0) for r, n in expected.items() if counts.get(r, 0) < n}
    if missing:
        console.print(f"[red]rows still missing after {timeout_s:.0f} s: {missing}[/]")
    engine.dispose()
