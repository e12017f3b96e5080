"""REACT end to end: camera agents on the real clock, a cloud detector worker over MQTT, mAP from SQL.

    edgecascade bench --task video            # 5 test clips of 150 frames per run, every method and delay
    edgecascade bench --task video --quick    # 2 clips of 60 frames, the targets' runs only
    python -m bench.video_bench --json results/video.json

One broker, collector and cloud detector worker (`edgecascade cloud --task detect`), as child processes;
the camera agent (`device_agent.camera.CameraAgent`) runs here, one run per method and setting, paced at
the clips' 30 fps.
Methods: edge-only (the detector on every frame), edge+tracker (every k-th frame, tracked between),
cloud-only (no detector on the device: the latest cloud answer carried forward and tracked — the stronger
variant; bench/video_offline.py shows the held one too), and REACT (edge every k + tracker + fusion of the
late cloud answers). The injected delay holds each cloud answer back until that long after its frame left
(0, 100, 300, 1000 ms). Every frame becomes a row in `frames`; `bench.video_eval.evaluate_run` scores
each run with pycocotools into `video_runs`; the figures come from `video_run_summary`. The test clips are
generated from the Fashion-MNIST *test* split (seed 0, `edgecascade video make`), the detectors trained on
clips from the train split only.
"""

from __future__ import annotations

import argparse
import json
import logging
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from rich.console import Console

from bench.run import wait_for_rows
from bench.services import cloud_site
from bench.video_targets import print_tables, targets

logger = logging.getLogger(__name__)

DELAYS_MS = (0, 100, 300, 1000)
DEVICE_ID = "bench-cam"


@dataclass(frozen=True)
class Setting:
    method: str
    delay_ms: float = 0.0
    detect_every: int = 5
    cloud_every: Optional[int] = None
    kill_worker: bool = False  # SIGKILL the cloud worker halfway (and start a new one)

    @property
    def label(self) -> str:
        parts = [self.method]
        if self.method in ("edge+tracker", "react"):
            parts.append(f"k={self.detect_every}")
        if self.cloud_every:
            parts.append(f"m={self.cloud_every}")
        if self.method in ("cloud-only", "react"):
            parts.append(f"{self.delay_ms:g} ms")
        if self.kill_worker:
            parts.append("worker SIGKILL")
        return ", ".join(parts)


def plan(quick: bool) -> List[Setting]:
    if quick:
        return [
            Setting("edge-only", detect_every=1),
            Setting("edge+tracker"),
            Setting("cloud-only", 300),
            Setting("react", 0),
            Setting("react", 300),
            Setting("react", 300, kill_worker=True),
        ]
    out = [
        Setting("edge-only", detect_every=1),
        Setting("edge+tracker"),
        Setting("edge+tracker", detect_every=10),
    ]
    out += [Setting("cloud-only", d) for d in DELAYS_MS]
    out += [Setting("react", d) for d in DELAYS_MS]
    out += [Setting("react", 300, detect_every=10), Setting("react", 300, cloud_every=15)]
    out.append(Setting("react", 300, kill_worker=True))
    return out


@dataclass
class VideoBenchResult:
    rows: List[Dict[str, Any]] = field(default_factory=list)
    targets: List[Tuple[str, str, bool]] = field(default_factory=list)
    seconds: float = 0.0
    clips: int = 0
    frames_per_clip: int = 0


def ensure_split(root: Path, clips: int, frames: int) -> Any:
    """The benchmark's test clips (generated once, deterministic: seed 0, Fashion-MNIST test images)."""
    from device_agent.sources import FASHION_MNIST_CLASSES, load_idx_dataset
    from video.dataset import load_split, write_split
    from video.synth import SynthConfig

    try:
        split = load_split(root)
        if split.sequences >= clips and split.frames_per_sequence == frames:
            return split
    except FileNotFoundError:
        pass
    images, labels = load_idx_dataset("fashion-mnist", "test")
    write_split(
        root, "test", clips, SynthConfig(frames=frames), 0, images, labels, class_names=FASHION_MNIST_CLASSES
    )
    return load_split(root)


def run_video_bench(
    *,
    quick: bool,
    models: Path,
    results: Path,
    clips: Optional[int] = None,
    frames: Optional[int] = None,
    meters: Tuple[str, ...] = ("rapl", "estimate"),
    settings: Optional[List[Setting]] = None,
    log: Any = print,
) -> VideoBenchResult:
    from bench.video_eval import evaluate_run
    from device_agent.camera import CameraAgent
    from device_agent.camera_config import CameraConfig
    from results_db import open_database
    from results_db.video import video_report

    started = time.monotonic()
    clips = clips or (2 if quick else 5)
    frames = frames or (60 if quick else 150)
    split = ensure_split(results / "video" / f"test-{clips}x{frames}", clips, frames)
    stamp = time.strftime("v%Y%m%d-%H%M%S")
    db = results / "video.db"
    db.parent.mkdir(parents=True, exist_ok=True)
    out = VideoBenchResult(clips=clips, frames_per_clip=frames)
    with cloud_site(results / "video" / stamp, db, models, workers=1, task="detect") as (broker, services):
        engine = open_database(db)
        for n, setting in enumerate(settings or plan(quick)):
            run_id = f"{stamp}-{n:02d}"
            config = CameraConfig(
                device_id=DEVICE_ID,
                broker=broker.credentials(DEVICE_ID),
                model_dir=models,
                state_dir=results / "video" / stamp / "state",
                run_id=run_id,
                method=setting.method,
                detect_every=setting.detect_every,
                cloud_every=setting.cloud_every,
                extra_delay_ms=setting.delay_ms,
                fps=split.fps,
                meters=list(meters),
            )
            agent = CameraAgent(config).start()
            clip_iter = ((c, split.frames(c)) for c in range(clips))
            if setting.kill_worker:
                summary = _run_with_kill(
                    agent, clip_iter, services, broker, models, clips * frames / split.fps
                )
            else:
                summary = agent.run(clip_iter)
            agent.close()
            wait_for_rows(db, {run_id: clips * frames}, Console(stderr=True), timeout_s=60, table="frames")
            accuracy = evaluate_run(
                engine,
                run_id,
                split,
                method=setting.method + (" (worker SIGKILL)" if setting.kill_worker else ""),
                detect_every=setting.detect_every if setting.method != "edge-only" else 1,
                cloud_every=setting.cloud_every,
                delay_ms=setting.delay_ms,
            )
            row = _row(db, run_id, setting, summary.as_dict(), accuracy.map50, accuracy.map, clips * frames)
            out.rows.append(row)
            log(
                f"{setting.label:<32} mAP@0.5 {100 * row['map50']:5.1f}  mAP {100 * row['map']:5.1f}  "
                f"frames {row['frames']}/{row['expected_frames']}  cloud p50 {row['cloud_latency_p50_ms']}"
            )
        video_report(engine, results / "report")
        engine.dispose()
    out.seconds = time.monotonic() - started
    out.targets = targets(out.rows, quick, out.seconds)
    return out


def _run_with_kill(
    agent: Any, clips: Any, services: Any, broker: Any, models: Path, duration_s: float
) -> Any:
    """The run, with the cloud worker SIGKILLed halfway through and a new one started."""
    import threading

    def strike() -> None:
        time.sleep(duration_s / 2)  # halfway through the clips: the scenario's parameter
        services.kill("cloud-0")
        services.start_cloud(
            "cloud-0", broker.credentials("cloud"), models, "w0b", ["--threads", "1", "--task", "detect"]
        )

    killer = threading.Thread(target=strike, daemon=True)
    killer.start()
    summary = agent.run(clips)
    killer.join(60)
    return summary


def _query(db: Path, sql: str, params: Tuple[Any, ...] = ()) -> List[Tuple[Any, ...]]:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(sql, params).fetchall()


def _row(
    db: Path, run_id: str, s: Setting, summary: Dict[str, Any], map50: float, map_: float, expected: int
) -> Dict[str, Any]:
    [(frames, energy, analytic, bytes_pf, p50, sent)] = _query(
        db,
        "SELECT frames, device_j_per_frame, device_j_analytic_per_frame, bytes_per_frame, "
        "cloud_latency_p50_ms, sent_fraction FROM video_run_summary WHERE run_id = ?",
        (run_id,),
    )
    edge_p50 = summary["edge_ms_p50"]
    return {
        "label": s.label,
        "method": s.method,
        "delay_ms": s.delay_ms,
        "k": s.detect_every if s.method != "edge-only" else 1,
        "m": s.cloud_every,
        "worker_killed": s.kill_worker,
        "run_id": run_id,
        "map50": map50,
        "map": map_,
        "frames": frames,
        "expected_frames": expected,
        "fps": summary["fps"],  # the paced rate achieved (the clips' 30 fps when the device keeps up)
        "loop_fps": round(1000.0 / edge_p50, 1) if edge_p50 else None,  # what the device loop could do
        "device_j_per_frame": energy,
        "device_j_analytic_per_frame": analytic,
        "bytes_per_frame": bytes_pf,
        "sent_fraction": sent,
        "cloud_latency_p50_ms": None if p50 is None else round(p50, 1),
        "answers_lost": summary["lost"],
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.video_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="2 clips of 60 frames, the targets' runs only")
    parser.add_argument("--clips", type=int, help="test clips per run (default 5, quick 2)")
    parser.add_argument("--frames", type=int, help="frames per clip (default 150, quick 60)")
    parser.add_argument("--models", type=Path, default=Path("models/video-fmnist"))
    parser.add_argument("--results", type=Path, default=Path("results"))
    parser.add_argument("--json", type=Path, help="write rows and targets here")
    args = parser.parse_args(argv)
    return run_and_report(args.quick, args.models, args.results, args.clips, args.frames, args.json)


def run_and_report(
    quick: bool,
    models: Path,
    results: Path,
    clips: Optional[int],
    frames: Optional[int],
    json_path: Optional[Path],
) -> int:
    logging.basicConfig(level=logging.WARNING)
    err = Console(stderr=True)
    result = run_video_bench(
        quick=quick,
        models=models,
        results=results,
        clips=clips,
        frames=frames,
        log=lambda m: err.print(m, markup=False),
    )
    print_tables(result, Console(width=None if sys.stdout.isatty() else 170))
    if json_path:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(
            json.dumps(
                {
                    "seconds": result.seconds,
                    "rows": result.rows,
                    "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in result.targets],
                },
                indent=2,
            )
        )
    return 0 if all(ok for _, _, ok in result.targets) else 1


if __name__ == "__main__":
    sys.exit(main())
