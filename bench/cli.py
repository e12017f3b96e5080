"""CLI for `edgecascade bench`: the end-to-end, energy-metered benchmark."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, List, Tuple

EPILOG = """examples:
  edgecascade bench                       # profile detected (x86 here), 10,000 samples per policy + sweeps
  edgecascade bench --quick               # 1,000 samples per policy, no sweep (about 2 minutes)
  edgecascade bench --profile jetson --broker 10.0.0.2:1883 --credentials creds.json
  edgecascade bench --samples 300 --no-sweep --no-http-peer --results /tmp/r
  edgecascade bench --rate 10 --paced-samples 600   # latency at 10 Hz; --rate 0: flat out only
  edgecascade bench --task video --quick  # REACT: camera agent, cloud detector, mAP (about 1 minute)
  edgecascade bench --task fault --quick  # sensor -> gateway -> cloud fault detection, 6 configs (~2 min)
  edgecascade bench --link lte            # every policy with the device behind an emulated LTE link
  edgecascade bench --task links          # MQTT vs HTTP over lan, wifi, lte, satellite + a 30 s outage
  edgecascade bench --task links --links lte --outage-s 0 --samples 300
  edgecascade bench --corruptions --quick  # every policy on each corruption kind at severity 2, 300 samples
  edgecascade bench --corruptions --kinds gaussian-noise,blur --severities 1,2,3 --samples 1000
  edgecascade bench --corruptions --cloud-watch   # agents back off a worse cloud, escalate to a better one
The classification task writes results/bench.db (an earlier one is kept as results/bench-<time>.db),
results/report/*.png + report.md, and prints one row per policy and the targets: accuracy, energy and
throughput from a flat-out run, latency from a run paced at --rate (service, not queueing). Exit status 0
when the run finished, whatever the targets say (--check: 1 when one failed). The video task
(bench/video_bench.py) writes results/video.db and prints one row per method and delay, and its targets.
The fault task (bench/fault_bench.py) writes results/fault.db and results/fault-front.png, prints one row
per configuration and its targets (synthetic data: vibration.simulate).
"""


HELP = "Run the end-to-end energy-metered benchmark (broker, collector, cloud, agent)"
DESCRIPTION = (
    "Stream Fashion-MNIST through the real pipeline once per policy and report accuracy, "
    "energy, latency and bandwidth."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument(
        "--task",
        choices=["classify", "video", "links", "fault"],
        default="classify",
        help="classify: the MEANet / HI cascade; video: REACT detection (models/video-fmnist); "
        "links: meanet over MQTT and HTTP across emulated links (bench/link_bench.py); "
        "fault: vibration fault detection, sensor -> gateway -> cloud (bench/fault_bench.py)",
    )
    parser.add_argument(
        "--profile", default="x86", help="device profile: a name in bench/profiles or a .toml"
    )
    parser.add_argument("--quick", action="store_true", help="1,000 samples per policy, no sweep")
    parser.add_argument("--samples", type=int, help="samples per policy (default 10,000; quick 1,000)")
    parser.add_argument(
        "--no-sweep", dest="sweep", action="store_false", default=None, help="skip the sweeps"
    )
    parser.add_argument("--sweep", dest="sweep", action="store_true", help="run the sweeps even with --quick")
    parser.add_argument("--no-http-peer", dest="http_peer", action="store_false", help="skip the HTTP peer")
    parser.add_argument("--models", type=Path, help="models (default models/fashion-mnist, video-fmnist)")
    parser.add_argument("--results", type=Path, default=Path("results"), help="where the db and report go")
    parser.add_argument("--broker", help="use this broker (host:port) instead of starting one")
    parser.add_argument("--credentials", type=Path, help="with --broker: JSON from `edgecascade broker`")
    parser.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bars")
    parser.add_argument("--idle-seconds", type=float, help="idle baseline per run (default: the profile's)")
    parser.add_argument(
        "--rate",
        type=float,
        default=30.0,
        metavar="HZ",
        help="pace of the latency runs, a camera's frame rate (default 30; 0: no paced runs)",
    )
    parser.add_argument(
        "--paced-samples",
        type=int,
        help="samples per paced run (default 300; --task links 1,000: the first 300 test items are easier, "
        "18 %% offloaded against 21.7 %% over all, and a blocking peer's pace depends on that share)",
    )
    parser.add_argument(
        "--link", help="classify over this emulated link (a name in bench/profiles/links or a .toml)"
    )
    parser.add_argument(
        "--links",
        default="lan,wifi,lte,satellite",
        help="--task links: the link profiles to sweep, comma-separated (default: %(default)s)",
    )
    parser.add_argument("--outage-link", default="lte", help="--task links: the link of the outage run")
    parser.add_argument("--outage-s", type=float, default=30.0, help="--task links: outage length (0: none)")
    parser.add_argument(
        "--outage-at-s", type=float, default=15.0, help="--task links: outage start in its run"
    )
    parser.add_argument(
        "--outage-run-s", type=float, default=60.0, help="--task links: length of the outage run"
    )
    parser.add_argument(
        "--corruptions",
        action="store_true",
        help="classify: every policy on each corruption of the suite (training/corruptions.py) and on the "
        "clean test images, one row per policy per corruption (results/corruptions/; default 1,000 samples "
        "per run, all kinds x severities; --quick: 300 samples, severity 2)",
    )
    parser.add_argument(
        "--cloud-watch",
        action="store_true",
        help="agents back off offloading while the cloud is less sure than the edge, and send it every "
        "sample while their inputs drift and it is the surer one (device_agent.safety)",
    )
    parser.add_argument("--kinds", help="--corruptions: comma-separated kinds (default: all)")
    parser.add_argument("--severities", help="--corruptions: comma-separated severities 1-3 (default: all)")
    parser.add_argument("--json", type=Path, help="also write the figures and targets as JSON here")
    parser.add_argument(
        "--check",
        action="store_true",
        help="exit 1 when a target fails (CI); without it the exit status says only whether the run finished",
    )


def run(args: argparse.Namespace) -> int:
    if args.task != "links":
        args.paced_samples = args.paced_samples or 300
    if args.task == "links":
        from bench import link_bench

        args.models = args.models or Path("models/fashion-mnist")
        args.samples = args.samples or (300 if args.quick else 1000)
        args.paced_samples = args.paced_samples or (300 if args.quick else 1000)
        args.results = args.results / "links"
        return link_bench.run(args)
    if args.task == "video":
        from bench.video_bench import run_and_report

        models = args.models or Path("models/video-fmnist")
        status = run_and_report(args.quick, models, args.results, None, None, args.json)
        return status if args.check or status != 1 else 0
    if args.task == "fault":
        from bench.fault_bench import run_and_report as run_fault

        models = args.models or Path("models/vibration")
        return run_fault(models, args.quick, args.results, args.json, args.check)
    args.models = args.models or Path("models/fashion-mnist")
    if args.corruptions:
        return run_corruptions(args)
    from rich.console import Console
    from rich.markup import escape

    from bench.run import BenchConfig, run_bench
    from bench.targets import evaluate, policy_table, summaries, targets_table, with_latency
    from results_db import open_database
    from results_db.report import build_report

    cfg = BenchConfig(
        profile=args.profile,
        quick=args.quick,
        samples=args.samples,
        sweep=args.sweep,
        models=args.models,
        results=args.results,
        broker=args.broker,
        credentials=args.credentials,
        http_peer=args.http_peer,
        progress=args.progress,
        idle_seconds=args.idle_seconds,
        link=args.link,
        rate_hz=args.rate,
        paced_samples=args.paced_samples,
        cloud_watch=args.cloud_watch,
    )
    err = Console(stderr=True)
    result = run_bench(cfg, err)
    engine = open_database(result.db)
    build_report(engine, cfg.results / "report")
    rows = with_latency(summaries(engine, result.runs), summaries(engine, result.paced), cfg.rate_hz)
    throughput = {k: v["samples_per_s"] for k, v in result.summaries.items()}
    if result.http:
        throughput["http-peer"] = result.http["samples_per_s"]
    result.targets = evaluate(rows, throughput, cfg.models, cfg.n_samples, cfg.rate_hz)
    out = Console(width=None if sys.stdout.isatty() else 170)  # a wide table also in logs and pipes
    out.print(policy_table(rows, throughput, cfg.rate_hz))
    for label, hz in result.paced_hz.items():
        if hz < 0.95 * cfg.rate_hz:
            out.print(f"[yellow]{escape(label)} fell behind the pace: {hz:.1f} of {cfg.rate_hz:g} Hz[/]")
    out.print(targets_table(result.targets, result.seconds))
    out.print(f"database: {result.db}   report: {cfg.results / 'report' / 'report.md'}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "bench_id": result.bench_id,
                    "seconds": result.seconds,
                    "runs": result.runs,
                    "paced_runs": result.paced,
                    "paced_hz": result.paced_hz,
                    "rate_hz": cfg.rate_hz,
                    "summary": rows,
                    "throughput": throughput,
                    "http": result.http,
                    "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in result.targets],
                },
                indent=2,
                default=str,
            )
        )
    engine.dispose()
    if result.interrupted:
        return 130
    return exit_status(result.targets, args.check, out)


def exit_status(targets: List[Tuple[str, str, bool]], check: bool, console: Any) -> int:
    """0 when the benchmark ran to the end; with `check`, 1 when a target failed too."""
    failed = sum(not ok for _, _, ok in targets)
    if failed and check:
        return 1
    if failed:
        console.print(
            f"{failed} target(s) not met (see above); the run finished, so exit 0 (--check: exit 1)"
        )
    return 0


def run_corruptions(args: argparse.Namespace) -> int:
    """`--corruptions`: bench/corruption_bench.py over the real pipeline; the table, and JSON with --json."""
    from rich.console import Console

    from bench.corruption_bench import QUICK_SEVERITIES, as_json, corruption_table
    from bench.corruption_bench import run_corruptions as run_suite
    from bench.run import BenchConfig
    from training.corruptions import SEVERITIES, suite

    kinds = args.kinds.split(",") if args.kinds else None
    if args.severities:
        severities: Tuple[int, ...] = tuple(int(s) for s in args.severities.split(","))
    else:
        severities = QUICK_SEVERITIES if args.quick else SEVERITIES
    corruptions = suite(kinds, severities)  # ValueError for an unknown kind or severity
    cfg = BenchConfig(
        profile=args.profile,
        quick=args.quick,
        samples=args.samples,
        models=args.models,
        results=args.results / "corruptions",
        broker=args.broker,
        credentials=args.credentials,
        http_peer=False,
        progress=False,
        rate_hz=0.0,
        cloud_watch=args.cloud_watch,
    )
    from results_db import open_database
    from results_db.report import build_report

    result = run_suite(cfg, corruptions, Console(stderr=True))
    engine = open_database(result.db)
    build_report(engine, cfg.results / "report")  # with its Drift section: the agents' tests of every run
    engine.dispose()
    out = Console(width=None if sys.stdout.isatty() else 170)
    out.print(corruption_table(result))
    report = cfg.results / "report" / "report.md"
    out.print(f"database: {result.db}   report: {report}   {result.seconds / 60:.1f} min")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(as_json(result), indent=2, default=str))
    return 130 if result.interrupted else 0
