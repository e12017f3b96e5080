"""Soak: an agent paced like a camera for a long time, with broker restarts; is its state bounded?

    python -m bench.soak                     # 35 min at 100 samples/s, broker restart every 5 min
    python -m bench.soak --minutes 5 --restart-every 60          # a short look
    python -m bench.soak --json results/soak.json --plot docs/soak.png

One broker, collector and cloud worker; one `edgecascade agent --loop` (meanet, the Fashion-MNIST test split
over and over, one run id). Every `--sample-every` seconds the agent process's resident memory, open file
descriptors and the size of its outbox (the SQLite file plus its WAL) are read from /proc and the file system.
The verdict compares the last 20 minutes (or the second half of a shorter run) with their own mean: flat means
within ±5 % (resident memory, outbox size; open descriptors must not grow at all).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional

from bench.services import cloud_site

logger = logging.getLogger(__name__)
DEVICE = "soak-cam"


@dataclass
class Reading:
    t_s: float
    rss_mib: float
    fds: int
    outbox_mib: float
    rows: int


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def _outbox_mib(state: Path) -> float:
    return sum(p.stat().st_size for p in state.glob("outbox-*.sqlite*")) / 2**20


def _rows(db: Path) -> int:
    import sqlite3

    try:
        with sqlite3.connect(db, timeout=10) as conn:
            return int(conn.execute("SELECT COUNT(*) FROM inferences").fetchone()[0])
    except sqlite3.Error:
        return 0


def soak(
    *, minutes: float, rate: float, restart_every_s: float, sample_every_s: float, models: Path, workdir: Path
) -> List[Reading]:
    readings: List[Reading] = []
    db, state = workdir / "results.db", workdir / "state"
    with cloud_site(workdir, db, models) as (broker, services):
        agent = services.start(
            "agent",
            [
                "agent",
                *services.login(broker.credentials(DEVICE), user_flag="--device-id"),
                "--models", str(models),
                "--policy", "meanet",
                "--source", "dataset:fashion-mnist:test",
                "--loop",
                "--rate", str(rate),
                "--state-dir", str(state),
                "--run-id", "soak",
                "--idle-seconds", "0",
                "--no-progress",
            ],
        )  # fmt: skip
        started = time.monotonic()
        next_restart = started + restart_every_s
        end = started + minutes * 60.0
        while time.monotonic() < end:
            now = time.monotonic()
            readings.append(
                Reading(
                    t_s=now - started,
                    rss_mib=_rss_mib(agent.pid),
                    fds=len(os.listdir(f"/proc/{agent.pid}/fd")),
                    outbox_mib=_outbox_mib(state),
                    rows=_rows(db),
                )
            )
            r = readings[-1]
            print(
                f"{r.t_s / 60:6.1f} min  rss {r.rss_mib:7.1f} MiB  fds {r.fds:3d}  "
                f"outbox {r.outbox_mib:6.2f} MiB  rows {r.rows:,}",
                file=sys.stderr,
                flush=True,
            )
            if now >= next_restart:
                broker.stop()  # SIGTERM, then back: the agent keeps inferring into its outbox meanwhile
                broker.start()
                next_restart += restart_every_s
            time.sleep(max(0.0, now + sample_every_s - time.monotonic()))  # the sampling period
        services.stop("agent")
    return readings


def verdict(readings: List[Reading], minutes: float) -> Dict[str, object]:
    """Flatness over the last 20 minutes (the second half of a run shorter than 30 minutes)."""
    window_s = 20 * 60.0 if minutes >= 30 else minutes * 30.0
    tail = [r for r in readings if r.t_s >= readings[-1].t_s - window_s]
    out: Dict[str, object] = {"window_min": window_s / 60.0, "readings": len(tail)}
    for name in ("rss_mib", "outbox_mib"):
        values = [getattr(r, name) for r in tail]
        mean = statistics.fmean(values)
        spread = max(abs(v - mean) for v in values) / mean if mean else 0.0
        out[name] = {"mean": round(mean, 2), "max_deviation": round(spread, 4), "flat": spread <= 0.05}
    fds = [r.fds for r in tail]
    out["fds"] = {"first": fds[0], "last": fds[-1], "max": max(fds), "flat": max(fds) <= fds[0] + 2}
    return out


def plot(readings: List[Reading], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = [r.t_s / 60 for r in readings]
    fig, axes = plt.subplots(3, 1, figsize=(8, 6.5), sharex=True)
    for ax, (name, label) in zip(
        axes, (("rss_mib", "agent RSS (MiB)"), ("outbox_mib", "outbox + WAL (MiB)"), ("fds", "open fds"))
    ):
        values = [getattr(r, name) for r in readings]
        ax.plot(t, values, lw=1.2)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        # Headroom: a flat line at the autoscaled top hides under the frame.
        ax.set_ylim(0, 1.15 * max(values))
    axes[-1].set_xlabel("minutes (broker restarted every few minutes)")
    fig.suptitle("edgecascade agent soak: 100 samples/s, meanet, one run")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.soak", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=35.0)
    parser.add_argument("--rate", type=float, default=100.0, help="samples/s fed to the agent")
    parser.add_argument("--restart-every", type=float, default=300.0, help="broker restart period, s")
    parser.add_argument("--sample-every", type=float, default=10.0, help="reading period, s")
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--workdir", type=Path, default=Path("results/soak"))
    parser.add_argument("--json", type=Path, help="write readings and verdict here")
    parser.add_argument("--plot", type=Path, help="write a PNG of the readings here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    workdir = args.workdir / time.strftime("%Y%m%d-%H%M%S")
    readings = soak(
        minutes=args.minutes,
        rate=args.rate,
        restart_every_s=args.restart_every,
        sample_every_s=args.sample_every,
        models=args.models,
        workdir=workdir,
    )
    result = verdict(readings, args.minutes)
    print(json.dumps(result, indent=2))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(
            json.dumps({"verdict": result, "readings": [asdict(r) for r in readings]}, indent=2)
        )
    if args.plot:
        plot(readings, args.plot)
    flat = all(v.get("flat", True) for v in result.values() if isinstance(v, dict))
    return 0 if flat else 1


if __name__ == "__main__":
    sys.exit(main())
