"""CLI for `edgecascade agent`: run the device agent on a dataset, a watched directory, the device's MQTT
input topic or a video (file, RTSP, camera, GStreamer)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from edgecascade.metrics import add_metrics_arguments

logger = logging.getLogger(__name__)

EPILOG = """examples:
  # the test split of Fashion-MNIST (first 1000 images) through the MEANet policy, on an x86 profile
  edgecascade agent --broker 127.0.0.1:1883 --device-id cam-01 --password-file cam-01.pw \\
      --models models/fashion-mnist --policy meanet --source dataset:fashion-mnist:test:1000 \\
      --state-dir /var/lib/edgecascade/cam-01 --profile x86

  # Hierarchical Inference with a threshold learned online, offload cost 0.3
  edgecascade agent ... --policy hi-online --policy-params '{"beta": 0.3}'

  # serve every PNG/PGM dropped into /srv/inbox until SIGTERM (a `label7` in a name scores it)
  edgecascade agent ... --policy hi-threshold --source dir:/srv/inbox

  # at most 5 offloads a second (10 saved up), shed when a round trip is predicted beyond 40 % of the deadline
  edgecascade agent ... --offload-budget 5 --offload-budget-burst 10 --shed-above 0.4

  # images (PNG, PGM, JPEG at the model's size) that sensors publish to <root>/cam-01/input, at most 64
  # waiting (the oldest dropped and counted beyond that); Prometheus metrics on :9101/metrics
  edgecascade agent ... --source mqtt --input-queue 64 --metrics-port 9101
  mosquitto_pub -h broker.lan -u sensor-cam-01 -P ... -t edgecascade/v1/cam-01/input -f shirt.png

  # a video through OpenCV, each frame resized and converted to the model card's input shape
  edgecascade agent ... --source file:/srv/clips/belt.mp4
  edgecascade agent ... --source url:rtsp://10.0.0.7:554/stream1 --rate 10
  edgecascade agent ... --source camera:0
  edgecascade agent ... --source 'gst:nvarguscamerasrc ! video/x-raw(memory:NVMM),width=1280,height=720 ! \\
      nvvidconv ! video/x-raw,format=BGRx ! videoconvert ! video/x-raw,format=BGR ! appsink drop=true'

  # drift tests on a longer window, at most a 1 % chance of a false alarm in a million clean samples
  edgecascade agent ... --drift-window 500 --drift-horizon 1000000

  # follow the model versions the operator rolls out to group `canary` (`edgecascade models publish`),
  # signed with the key whose public half is model-signing.pub; each is swapped in between two samples
  edgecascade agent ... --model-group canary --trusted-key /etc/edgecascade/model-signing.pub

Offloads are capacity-aware by default: one the cloud workers' published load and the device's own round
trips say would come back too late, or one beyond the budget, is answered at the edge, flagged `shed`.
The run's summary is printed on stdout as JSON (`shed`, and `capacity`: sheds by reason); logs and progress
go to stderr. Result records stay in the
outbox (--state-dir) until the collector has stored them; what is left at exit is sent on the next start.
Policies: edge-only, cloud-only, meanet, hi-threshold, hi-online, entropy.
"""


HELP = "Run the device agent (edge cascade + offload over MQTT)"
DESCRIPTION = (
    "Run the device agent: the edge cascade on onnxruntime, a policy deciding what to "
    "offload, store-and-forward of offloads and result records over MQTT 5."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument("--broker", required=True, metavar="HOST:PORT", help="MQTT broker address")
    parser.add_argument("--device-id", required=True, help="device id (also the MQTT username and client id)")
    parser.add_argument("--username", help="MQTT username (default: the device id)")
    parser.add_argument("--password-file", type=Path, help="file whose first line is the MQTT password")
    parser.add_argument("--tls-ca", help="CA certificate: connect over TLS")
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"), help="model directory")
    parser.add_argument("--policy", default="meanet", help="offload policy name (default: meanet)")
    parser.add_argument("--policy-params", default="{}", metavar="JSON", help="policy parameters as JSON")
    parser.add_argument(
        "--source",
        required=True,
        help="dataset:NAME:SPLIT[:N] (IDX files), dir:PATH (watch a directory for PNG/PGM files), mqtt "
        "(images published to this device's input topic), or a video: file:PATH, url:URL, camera:N, "
        "gst:PIPELINE",
    )
    parser.add_argument(
        "--input-queue",
        type=int,
        default=64,
        metavar="N",
        help="mqtt source: images waiting at most; beyond, the oldest is dropped and counted (default 64)",
    )
    add_metrics_arguments(parser, "this agent")
    parser.add_argument("--state-dir", type=Path, default=Path("state"), help="outbox and run state")
    parser.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests, staging)")
    parser.add_argument("--profile", help="device profile: a name in bench/profiles or a .toml file")
    parser.add_argument(
        "--run-id",
        help="run id (default: generated). Reuse one to continue a run: a dataset pass that was cut short "
        "(SIGKILL, SIGTERM) resumes where its records end; a finished one starts a new pass",
    )
    parser.add_argument("--idle-seconds", type=float, help="idle baseline length (default: profile, 5 s)")
    parser.add_argument("--deadline", type=float, help="offload deadline in s (default: profile, 2 s)")
    parser.add_argument(
        "--shed-above",
        type=float,
        metavar="FRACTION",
        help="shed an offload (answer it at the edge, flagged shed) when its round trip is predicted beyond "
        "this fraction of the deadline (default: profile, 0.4; the workers' queue alone may take 0.25)",
    )
    parser.add_argument(
        "--offload-budget",
        type=float,
        metavar="PER_S",
        help="at most this many offloads a second; the rest are shed (default: profile, no budget)",
    )
    parser.add_argument(
        "--offload-budget-burst",
        type=float,
        metavar="N",
        help="... of which up to N may be saved up for a burst (default: one second's worth)",
    )
    parser.add_argument(
        "--no-capacity",
        action="store_true",
        help="offload whatever the policy says, however loaded the cloud (no shedding, no budget)",
    )
    parser.add_argument(
        "--cloud-watch",
        action="store_true",
        help="follow the better tier: back off offloading while the cloud is less sure than the edge on "
        "what it is sent (answered at the edge, flagged shed; a probe share still goes), and send the cloud "
        "every sample while the drift monitor flags the inputs and the cloud is the surer one",
    )
    parser.add_argument(
        "--no-drift",
        action="store_true",
        help="do not watch the inputs for drift (default: watch, if the card can)",
    )
    parser.add_argument("--drift-window", type=int, help="samples per drift test (default: profile, 300)")
    parser.add_argument(
        "--drift-stride", type=int, help="a drift test every N samples (default: profile, 50)"
    )
    parser.add_argument(
        "--drift-alpha", type=float, help="chance of any false drift alarm within the horizon (default 0.01)"
    )
    parser.add_argument("--drift-horizon", type=int, help="... of this many clean samples (default 100000)")
    parser.add_argument(
        "--rate",
        type=float,
        metavar="HZ",
        help="dataset or video source: feed at most this many samples per second, like a camera (default: "
        "flat out; a live camera paces itself)",
    )
    parser.add_argument(
        "--start-at",
        type=float,
        metavar="UNIX_S",
        help="connected and loaded, wait until this wall-clock time (unix seconds) before the first sample: "
        "a fleet test whose devices start together (bench/fleet_sim.py)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=float,
        help="at the start, wait this long (s) for the broker before running from the outbox (default: 10)",
    )
    parser.add_argument(
        "--close-timeout",
        type=float,
        help="at the end, wait this long (s) for offloads and results to be settled (default: 30)",
    )
    parser.add_argument(
        "--no-receipts",
        action="store_true",
        help="forget result records once the broker has them, not once the collector has stored them "
        "(for setups without a collector; a broker crash can then lose records)",
    )
    parser.add_argument(
        "--loop",
        action="store_true",
        help="dataset source: start the next pass when one ends, until SIGTERM (a camera that never stops)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress lines on stderr")
    parser.add_argument(
        "--model-group",
        metavar="GROUP",
        help="follow the model versions rolled out to this device group (needs --trusted-key; default: "
        "serve --models only)",
    )
    parser.add_argument(
        "--trusted-key",
        type=Path,
        metavar="FILE.pub",
        help="ed25519 public key (PEM) whose signature a rolled-out model version must carry",
    )
    parser.add_argument(
        "--model-download-timeout",
        type=float,
        metavar="S",
        default=120.0,
        help="a model version whose files have not all arrived within S seconds is refused (default 120)",
    )


def parse_source(source: str) -> Tuple[str, Dict[str, Any]]:
    """`dataset:NAME:SPLIT[:N]`, `dir:PATH`, `mqtt` or a video source (`video.sources.parse_video_source`)
    -> (kind, fields)."""
    from video.sources import VIDEO_KINDS, capture_target, parse_video_source

    kind, _, rest = source.partition(":")
    if source == "mqtt":
        return "mqtt", {}
    if kind in VIDEO_KINDS and kind != "synthetic":
        video_kind, where = parse_video_source(source)
        return "video", {"target": capture_target(video_kind, where)}
    if kind == "dataset":
        parts = rest.split(":")
        if len(parts) not in (2, 3) or not all(parts[:2]):
            raise ValueError(f"dataset source is dataset:NAME:SPLIT[:N], got {source!r}")
        limit: Optional[int] = None
        if len(parts) == 3:
            if not parts[2].isdigit() or int(parts[2]) < 1:
                raise ValueError(f"N in source {source!r} must be a positive integer")
            limit = int(parts[2])
        return "dataset", {"name": parts[0], "split": parts[1], "limit": limit}
    if kind == "dir" and rest:
        return "dir", {"path": Path(rest)}
    raise ValueError(
        "--source must be dataset:NAME:SPLIT[:N], dir:PATH, mqtt, file:PATH, url:URL, camera:N or "
        f"gst:PIPELINE, got {source!r}"
    )


def build_config(args: argparse.Namespace, kind: str, source: Dict[str, Any]) -> Any:
    """The agent's config from the flags, built and validated once (ValueError says what is wrong)."""
    from device_agent import AgentConfig, apply_profile, load_profile
    from device_agent.config import drift_settings
    from device_agent.policies import PolicyError, policy_names
    from protocol.mqtt import BrokerAddress, read_secret
    from protocol.topics import Topics

    params = json.loads(args.policy_params)
    if not isinstance(params, dict):
        raise ValueError("--policy-params must be a JSON object")
    if args.policy not in policy_names():
        raise PolicyError(f"unknown policy {args.policy!r}; known: {', '.join(policy_names())}")
    if args.rate is not None and not args.rate > 0:
        raise ValueError(f"--rate must be positive, got {args.rate}")
    if (args.model_group is None) != (args.trusted_key is None):
        raise ValueError("--model-group and --trusted-key go together (a rollout must be signed)")
    rollout = None
    if args.model_group is not None:
        from device_agent.rollout import RolloutSettings

        rollout = RolloutSettings(
            args.model_group, args.trusted_key, download_timeout_s=args.model_download_timeout
        )
    password = read_secret(args.password_file) if args.password_file else ""
    broker = BrokerAddress.parse(args.broker, args.username or args.device_id, password, args.tls_ca)
    overrides = {
        "idle_seconds": args.idle_seconds,
        "offload_deadline_s": args.deadline,
        "close_timeout_s": args.close_timeout,
        "connect_timeout_s": args.connect_timeout,
        "shed_above": args.shed_above,
        "offload_budget_per_s": args.offload_budget,
        "offload_budget_burst": args.offload_budget_burst,
        "capacity_aware": False if args.no_capacity else None,
        "cloud_watch": True if args.cloud_watch else None,
    }
    config = AgentConfig(
        device_id=args.device_id,
        broker=broker,
        topics=Topics.namespaced(args.namespace) if args.namespace else Topics(),
        model_dir=args.models,
        policy={"name": args.policy, "params": params},
        state_dir=args.state_dir,
        run_id=args.run_id,
        dataset=source["name"] if kind == "dataset" else _live_name(args, kind, source),
        split=source["split"] if kind == "dataset" else "live",
        results_receipts=not args.no_receipts,
        rollout=rollout,
    )
    if args.profile:
        config = apply_profile(config, load_profile(args.profile))
    drift = {"drift": False} if args.no_drift else {}
    drift.update(
        {f"drift_{k}": getattr(args, f"drift_{k}") for k in ("window", "stride", "alpha", "horizon")}
    )
    overrides["drift"] = drift_settings(config.drift, drift)
    if overrides["drift"] is None:
        config = dataclasses.replace(config, drift=None)  # `None` below means "no flag", not "off"
    # Flags win over the profile; `replace` validates the result again.
    return dataclasses.replace(config, **{k: v for k, v in overrides.items() if v is not None})


def _live_name(args: argparse.Namespace, kind: str, source: Dict[str, Any]) -> str:
    """What a live source's run records as its dataset."""
    if kind == "dir":
        return f"dir:{source['path']}"
    return "mqtt:input" if kind == "mqtt" else str(args.source)


def run(args: argparse.Namespace) -> int:
    """Exit codes: 0 done; 1 nothing could be processed (every sample failed or was refused), the collector
    refused records, or the agent failed; 2 bad arguments or a broker, model or state directory that cannot
    work; 3 results still wait in the outbox (the broker or collector was not reached in time, or the outbox
    filled up: they are sent on the next start)."""
    from device_agent import DeviceAgent
    from device_agent.outbox import OutboxFull, OutboxInUse
    from device_agent.sources import load_idx_dataset
    from edgecascade.metrics import check_metrics_port
    from protocol.mqtt import BrokerUnusable

    data: Any = None
    try:
        kind, source = parse_source(args.source)
        check_metrics_port(args.metrics_port)
        if args.input_queue < 1:
            raise ValueError(f"--input-queue must be at least 1, got {args.input_queue}")
        config = build_config(args, kind, source)
        if kind == "dataset":  # read it now: a wrong name or split is an argument error, not a crash later
            data = load_idx_dataset(source["name"], source["split"], source["limit"])
        elif kind == "dir" and not source["path"].is_dir():
            raise FileNotFoundError(f"{source['path']} is not a directory")
        elif kind == "video":  # opened now: a source OpenCV cannot open is an argument error
            from device_agent.card import load_card
            from video.sources import capture_images

            data = capture_images(source["target"], load_card(config.model_dir).input_shape)[1]
    except (ValueError, OSError) as exc:  # json errors, bad files, bad addresses, invalid ids and values
        print(f"edgecascade agent: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):  # a clean stop: run_end, the outbox drained
        signal.signal(signum, lambda *_: stop.set())
    agent = DeviceAgent(config)
    try:
        inputs, server = _attach(agent, args, kind)  # before start: the input subscription, the metrics
    except (OSError, ValueError) as exc:  # a metrics port taken, an address not this host's, no model card
        print(f"edgecascade agent: {exc}", file=sys.stderr)
        return 2
    try:
        try:
            agent.start()
            if args.start_at is not None:
                stop.wait(max(0.0, args.start_at - time.time()))  # SIGTERM meanwhile: ends at once
        except (ValueError, OSError, BrokerUnusable, OutboxInUse) as exc:  # no model or card, bad params, TLS
            print(f"edgecascade agent: {exc}", file=sys.stderr)
            return 2
        except OutboxFull as exc:  # still full from the last run, and the broker still away
            print(f"edgecascade agent: {exc}", file=sys.stderr)
            return 3
        try:
            summary = _serve(agent, args, kind, source, inputs if kind == "mqtt" else data, stop)
            final = agent.close()
        except BaseException as exc:
            code = close_after_failure("edgecascade agent", agent, exc)
            if code is None:
                raise
            return code
    finally:
        if server is not None:
            server.close()
    out = (final if args.loop else summary).as_dict()
    out["outbox_left"] = final.outbox_left
    out["refused_records"] = final.refused_records
    out["offload_stats"] = dict(agent.offloads.stats)
    if inputs is not None:
        out["input"] = {**inputs.stats, "bad": inputs.bad_by_reason()}
    print(json.dumps(out, default=str))
    return _exit_code(summary, final, config, agent.link.refused)


def _attach(agent: Any, args: argparse.Namespace, kind: str) -> Tuple[Any, Any]:
    """(the MQTT input or None, the metrics server or None), attached to an agent not yet started."""
    from device_agent.mqtt_input import MqttInput

    inputs = MqttInput(agent, queue_size=args.input_queue) if kind == "mqtt" else None
    if args.metrics_port is None:
        return inputs, None
    from device_agent.metrics import AgentMetrics
    from edgecascade.metrics import serve_metrics

    metrics = AgentMetrics(agent)
    if inputs is not None:
        metrics.inputs.append(inputs)
    return inputs, serve_metrics(metrics.registry, args.metrics_host, args.metrics_port)


def _serve(
    agent: Any, args: argparse.Namespace, kind: str, source: Dict[str, Any], data: Any, stop: Any
) -> Any:
    """The source through the agent until it ends (every pass, with --loop) or SIGTERM; its summary."""
    if kind == "mqtt":
        return data.serve(stop)
    if kind == "video":
        frames = ((image, None) for image in data)
        return agent.run_dataset(_until(frames, stop, args.rate), progress=not args.no_progress)
    if kind != "dataset":
        return agent.watch(source["path"], stop)
    images, labels = data
    progress = agent.source_progress(args.source)
    while True:
        samples = zip(images, (int(y) for y in labels))
        summary = agent.run_dataset(
            _until(samples, stop, args.rate), progress=not args.no_progress, source=args.source
        )
        if stop.is_set():
            return summary
        progress.finish_pass()  # every item is recorded: the next pass (or start) runs anew
        if not args.loop:
            return summary


def _exit_code(summary: Any, final: Any, config: Any, refused: Any = None) -> int:
    if summary.samples == 0 and (summary.failed or summary.rejected_inputs) and not refused:
        print(
            f"edgecascade agent: no sample could be processed ({summary.failed} failed, "
            f"{summary.rejected_inputs} not an image the model takes)",
            file=sys.stderr,
        )
        return 1
    return delivery_exit_code(
        "edgecascade agent",
        refused=refused,
        refused_records=final.refused_records,
        records_left=final.outbox_left.get("record", 0),
        broker=config.broker,
    )


def close_after_failure(prog: str, agent: Any, exc: BaseException) -> Optional[int]:
    """A run failed with `exc`: one line for what a device command expects (no room for hours, a dead loop,
    a failing disk), the agent closed all the same (after OutboxFull without waiting for room again), and the
    exit code: 3 outbox full, 1 the others; None for anything else, which the caller re-raises."""
    from device_agent.outbox import OutboxFull

    expected = isinstance(exc, (OutboxFull, RuntimeError, OSError, sqlite3.Error))
    if expected:
        print(f"{prog}: {exc}", file=sys.stderr)
    if isinstance(exc, OutboxFull):
        agent.session.stop_waiting_for_room()
    try:
        agent.close()  # idempotent: closes what is still open
    except Exception as again:
        logger.error("closing after the failure failed too: %s", again)
    if not expected:
        return None
    return 3 if isinstance(exc, OutboxFull) else 1


def delivery_exit_code(
    prog: str, *, refused: Any, refused_records: int, records_left: int, broker: Any
) -> int:
    """How a device's results fared, as the exit code every device command documents: 2 the broker refused
    us for good, 1 the collector refused records, 3 records still wait in the outbox, else 0."""
    if refused:
        print(f"{prog}: {refused}", file=sys.stderr)
        return 2
    if refused_records:
        print(
            f"{prog}: the collector refused {refused_records} records (see its rejected_records table)",
            file=sys.stderr,
        )
        return 1
    if records_left:
        print(
            f"{prog}: {records_left} records still wait in the outbox (broker {broker.host}:{broker.port} "
            "or the collector not reached); they are sent on the next start",
            file=sys.stderr,
        )
        return 3
    return 0


def _until(samples: Any, stop: threading.Event, rate: Optional[float] = None) -> Any:
    """The samples until SIGTERM; at most `rate` per second when given (a camera, not a file)."""
    started = time.monotonic()
    for i, sample in enumerate(samples):
        if rate:
            due = started + i / rate
            stop.wait(max(0.0, due - time.monotonic()))
        if stop.is_set():
            logger.warning("stopping early on SIGTERM")
            return
        yield sample
