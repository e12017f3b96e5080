"""CLI for `edgecascade video`: generate the synthetic video benchmark (`video make`), run a camera agent
(`video run`)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

EPILOG = """examples:
  # the sets the committed detectors were trained and evaluated on
  edgecascade video make --split train --sequences 800 --frames 24 --out build/video/train
  edgecascade video make --split test --sequences 20 --frames 150 --out build/video/test

  # a tiny set for a smoke test, 160x160 frames
  edgecascade video make --split test --sequences 2 --frames 30 --size 160 --out /tmp/tiny

Train sequences take sprites only from the Fashion-MNIST train split, test sequences only from the test split;
the same --seed gives the same bytes. Layout: see video/dataset.py (one npz per sequence, COCO
annotations.json).
"""


HELP = "Synthetic video benchmark (REACT detection)"
DESCRIPTION = (
    "The REACT video detection task: `edgecascade video make --help`, `edgecascade video run --help`."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    sub = parser.add_subparsers(dest="video_command", metavar="VIDEO_COMMAND", required=True)
    make = sub.add_parser(
        "make",
        help="generate sequences of Fashion-MNIST items with COCO ground truth",
        description="Generate deterministic synthetic video sequences (uint8 grey frames, nominal fps) of "
        "moving, occluding Fashion-MNIST items over textured noisy backgrounds, with COCO ground truth.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    make.add_argument(
        "--split", choices=["train", "test"], required=True, help="Fashion-MNIST split to draw from"
    )
    make.add_argument("--sequences", type=int, default=20, help="number of sequences")
    make.add_argument("--frames", type=int, default=150, help="frames per sequence")
    make.add_argument("--size", type=int, default=128, help="frame width and height in pixels")
    make.add_argument("--fps", type=float, default=30.0, help="nominal frame rate")
    make.add_argument("--seed", type=int, default=0, help="seed: decides everything")
    make.add_argument("--data-dir", help="directory of the Fashion-MNIST IDX files (default: searched)")
    make.add_argument("--out", type=Path, required=True, help="output directory")
    make.set_defaults(func=run_make)

    cam = sub.add_parser(
        "run",
        help="run a REACT camera agent (edge detector + tracker + late cloud answers, over MQTT)",
        description="Run a REACT camera agent: frames paced at the source's fps through the edge detector "
        "every k frames and a tracker between, frames offloaded to the cloud detector workers "
        "(`edgecascade cloud --task detect`) and their late answers fused in; one result row per frame.",
        epilog=RUN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    cam.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker address")
    cam.add_argument("--device-id", required=True, help="device id (also the MQTT username and client id)")
    cam.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password")
    cam.add_argument("--tls-ca", help="CA certificate: connect over TLS")
    cam.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests, staging)")
    cam.add_argument(
        "--source", required=True, help="synthetic:DIR, file:PATH, url:URL, camera:N or gst:PIPELINE"
    )
    cam.add_argument("--models", type=Path, default=Path("models/video-fmnist"), help="model directory")
    cam.add_argument(
        "--method", default="react", choices=["edge-only", "edge+tracker", "cloud-only", "react"]
    )
    cam.add_argument("--k", type=int, default=5, help="run the edge detector every k-th frame (default 5)")
    cam.add_argument(
        "--cloud-every", type=int, help="offload every m-th frame (default: when the last is back)"
    )
    cam.add_argument("--extra-delay-ms", type=float, default=0.0, help="hold cloud answers back this long")
    cam.add_argument("--fps", type=float, help="pace at this rate (default: the source's; 0: flat out)")
    cam.add_argument("--clips", type=int, help="synthetic source: this many clips (default all)")
    cam.add_argument("--max-frames", type=int, help="a video source: stop after this many frames")
    cam.add_argument("--state-dir", type=Path, default=Path("state"), help="outbox and run state")
    cam.add_argument("--run-id", help="run id (default: generated)")
    cam.add_argument(
        "--meters", nargs="+", default=["rapl", "estimate"], help="metering backends, first that works"
    )
    cam.set_defaults(func=run_camera)


def run(args: argparse.Namespace) -> int:
    return int(args.func(args))  # pragma: no cover - argparse requires a VIDEO_COMMAND, whose func wins


RUN_EPILOG = """examples:
  # the benchmark's clips through REACT, cloud answers held back 300 ms
  edgecascade video run --broker 127.0.0.1:1883 --device-id cam-01 --password-file cam-01.pw \\
      --source synthetic:results/video/test-5x150 --method react --k 5 --extra-delay-ms 300

  # a video file (any size, colour or grey: resized to the model's 128x128 grey), or a USB camera
  edgecascade video run ... --source file:traffic.mp4 --max-frames 900
  edgecascade video run ... --source camera:0

The run's summary is printed on stdout as JSON. Frame rows go through the outbox (--state-dir) to the
collector; `edgecascade bench --task video` runs every method and scores them with pycocotools.
"""


def run_camera(args: argparse.Namespace) -> int:
    import signal
    import threading

    from protocol.mqtt import BrokerAddress, BrokerUnusable, read_secret
    from protocol.topics import Topics
    from video.agent import VideoAgent
    from video.settings import VideoConfig
    from video.sources import capture_frames, parse_video_source, synthetic_clips

    try:
        kind, where = parse_video_source(args.source)
        password = read_secret(args.password_file) if args.password_file else ""
        broker = BrokerAddress.parse(args.broker, args.device_id, password, args.tls_ca)
        card = json.loads((args.models / "card.json").read_text())
        _, height, width = card["input"]["shape"]
        clips: Any
        if kind == "synthetic":
            source_fps, clips = synthetic_clips(where, args.clips)
        else:
            target = int(where) if kind == "camera" else where
            source_fps, frames = capture_frames(target, (height, width), args.max_frames)
            clips = iter([(0, frames)])
        config = VideoConfig(
            device_id=args.device_id,
            broker=broker,
            topics=Topics.namespaced(args.namespace) if args.namespace else Topics(),
            model_dir=args.models,
            state_dir=args.state_dir,
            run_id=args.run_id,
            method=args.method,
            detect_every=args.k,
            cloud_every=args.cloud_every,
            extra_delay_ms=args.extra_delay_ms,
            fps=source_fps if args.fps is None else args.fps,
            meters=list(args.meters),
            dataset=args.source,
        )
        agent = VideoAgent(config).start()
    except (ValueError, OSError, KeyError, BrokerUnusable) as exc:
        print(f"edgecascade video run: {exc}", file=sys.stderr)
        return 2
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        summary = agent.run(clips, stop)
    finally:
        agent.close()
    out = summary.as_dict()
    out["outbox_left"] = agent.outbox_left
    print(json.dumps(out))
    return 3 if out["outbox_left"].get("record") else 0


def run_make(args: argparse.Namespace) -> int:
    from device_agent.sources import load_idx_dataset
    from video.dataset import write_split
    from video.synth import SynthConfig

    try:
        config = SynthConfig(width=args.size, height=args.size, frames=args.frames, fps=args.fps)
        search = [args.data_dir] if args.data_dir else None
        images, labels = load_idx_dataset("fashion-mnist", args.split, search=search)
    except (ValueError, FileNotFoundError) as exc:
        print(f"edgecascade video make: {exc}", file=sys.stderr)
        return 2
    progress = None
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.sequences, desc=f"video {args.split}", unit="seq")
        progress = bar.update
    try:
        manifest = write_split(
            args.out, args.split, args.sequences, config, args.seed, images, labels, progress
        )
    finally:
        if bar is not None:
            bar.close()
    print(json.dumps({k: manifest[k] for k in ("split", "seed", "sequences", "frames_per_sequence")}))
    return 0
