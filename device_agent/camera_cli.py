"""CLI for `edgecascade camera`: a REACT camera agent (`device_agent.camera`) on clips, a file or a camera."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

EPILOG = """examples:
  # the benchmark's clips through REACT, cloud answers held back 300 ms
  edgecascade camera --broker 127.0.0.1:1883 --device-id cam-01 --password-file cam-01.pw \\
      --source synthetic:results/video/test-5x150 --method react --k 5 --extra-delay-ms 300

  # a video file (any size, colour or grey: resized to the model's 128x128 grey), or a USB camera
  edgecascade camera ... --source file:traffic.mp4 --max-frames 900
  edgecascade camera ... --source camera:0

The run's summary is printed on stdout as JSON. Frame rows go through the outbox (--state-dir) to the
collector; `edgecascade bench --task video` runs every method and scores them with pycocotools.
"""


HELP = "Run a REACT camera agent (edge detector + tracker + late cloud answers, over MQTT)"
DESCRIPTION = (
    "Run a REACT camera agent: frames paced at the source's fps through the edge detector every k frames "
    "and a tracker between, frames offloaded to the cloud detector workers (`edgecascade cloud --task "
    "detect`) and their late answers fused in; one result row per frame."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker address")
    parser.add_argument("--device-id", required=True, help="device id (also the MQTT username and client id)")
    parser.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password")
    parser.add_argument("--tls-ca", help="CA certificate: connect over TLS")
    parser.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests, staging)")
    parser.add_argument(
        "--source", required=True, help="synthetic:DIR, file:PATH, url:URL, camera:N or gst:PIPELINE"
    )
    parser.add_argument("--models", type=Path, default=Path("models/video-fmnist"), help="model directory")
    parser.add_argument(
        "--method", default="react", choices=["edge-only", "edge+tracker", "cloud-only", "react"]
    )
    parser.add_argument("--k", type=int, default=5, help="run the edge detector every k-th frame (default 5)")
    parser.add_argument(
        "--cloud-every", type=int, help="offload every m-th frame (default: when the last is back)"
    )
    parser.add_argument("--extra-delay-ms", type=float, default=0.0, help="hold cloud answers back this long")
    parser.add_argument("--fps", type=float, help="pace at this rate (default: the source's; 0: flat out)")
    parser.add_argument("--clips", type=int, help="synthetic source: this many clips (default all)")
    parser.add_argument("--max-frames", type=int, help="a video source: stop after this many frames")
    parser.add_argument("--state-dir", type=Path, default=Path("state"), help="outbox and run state")
    parser.add_argument("--run-id", help="run id (default: generated)")
    parser.add_argument(
        "--meters", nargs="+", default=["rapl", "estimate"], help="metering backends, first that works"
    )


def run(args: argparse.Namespace) -> int:
    """Exit codes as `edgecascade agent`'s: 0 done; 1 the collector refused records, or the run failed; 2 bad
    arguments or a broker, model or state directory that cannot work; 3 results still wait in the outbox."""
    import signal
    import threading

    from device_agent.camera import CameraAgent
    from device_agent.camera_config import CameraConfig
    from device_agent.cli import close_after_failure, delivery_exit_code
    from device_agent.outbox import OutboxFull, OutboxInUse
    from protocol.mqtt import BrokerAddress, BrokerUnusable, read_secret
    from protocol.topics import Topics
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
        config = CameraConfig(
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
        agent = CameraAgent(config).start()
    except (ValueError, OSError, KeyError, BrokerUnusable, OutboxInUse) as exc:
        print(f"edgecascade camera: {exc}", file=sys.stderr)
        return 2
    except OutboxFull as exc:  # still full from the last run, and the broker still away
        print(f"edgecascade camera: {exc}", file=sys.stderr)
        return 3
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # a clean stop: run_end, the outbox drained
        signal.signal(signum, lambda *_: stop.set())
    try:
        summary = agent.run(clips, stop)
        agent.close()
    except BaseException as exc:
        code = close_after_failure("edgecascade camera", agent, exc)
        if code is None:
            raise
        return code
    out = summary.as_dict()
    out["outbox_left"] = agent.outbox_left
    out["refused_records"] = agent.session.refused_records
    print(json.dumps(out))
    return delivery_exit_code(
        "edgecascade camera",
        refused=agent.session.refused,
        refused_records=agent.session.refused_records,
        records_left=agent.outbox_left.get("record", 0),
        broker=config.broker,
    )
