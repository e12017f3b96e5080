"""CLI for `edgecascade fault`: run a sensor agent (`fault sensor`) or a site gateway (`fault gateway`), and
write simulated recordings (`fault simulate`)."""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

import numpy as np

logger = logging.getLogger(__name__)

EPILOG = """examples:
  # a gateway for the site: answers the sensors' windows, asks the cloud (as device gw-site1) when unsure
  edgecascade fault gateway --broker 10.0.0.2:1883 --user gateway --password-file gw.pw \\
      --forward-device gw-site1 --forward-password-file gw-site1.pw --rule hi

  # a sensor streaming the simulated test windows at its real rate (5.86 windows/s), HI, via the gateway
  edgecascade fault sensor --broker 10.0.0.2:1883 --device-id pump-7 --password-file pump-7.pw --rule hi

  # a real CWRU recording (12 kHz drive-end + fan-end), sent straight to the cloud when unsure
  edgecascade fault sensor ... --cwru 130.mat --uplink cloud

  # simulated recordings as int16 .npy windows [N, 2, 2048] and their labels
  edgecascade fault simulate --split test --recordings 5 --out /tmp/windows

Synthetic data (vibration.simulate) unless --cwru or --mafaulda names a real file. Thresholds default to the
model card's (models/vibration/card.json), calibrated on the validation recordings.
"""

HELP = "Machine fault detection: sensor agent, site gateway, simulated recordings"
DESCRIPTION = (
    "The vibration fault hierarchy (sensor -> gateway -> cloud): `edgecascade fault <command> --help`."
)


def _login(parser: argparse.ArgumentParser, user_flag: str) -> None:
    parser.add_argument("--broker", default="localhost:1883", help="host:port")
    parser.add_argument(user_flag, required=True, help="broker account")
    parser.add_argument(
        "--password-file", type=Path, required=True, help="file whose first line is the password"
    )
    parser.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests, staging)")
    parser.add_argument("--models", type=Path, default=Path("models/vibration"), help="fault model directory")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    sub = parser.add_subparsers(dest="fault_command", metavar="FAULT_COMMAND", required=True)
    sensor = sub.add_parser(
        "sensor",
        help="a sensor agent: windows at the sensor's rate, unsure ones sent up",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _login(sensor, "--device-id")
    sensor.add_argument("--rule", choices=["hi", "two-threshold", "none", "all"], default="hi")
    sensor.add_argument("--uplink", choices=["gateway", "cloud"], default="gateway")
    sensor.add_argument("--deadline-s", type=float, default=1.0, help="an answer later than this is given up")
    sensor.add_argument("--state-dir", type=Path, default=Path("state"))
    source = sensor.add_mutually_exclusive_group()
    source.add_argument("--cwru", type=Path, help="a CWRU .mat recording (12 kHz: DE and FE channels)")
    source.add_argument(
        "--mafaulda", type=Path, help="a MaFaulDa CSV recording (underhang radial/tangential)"
    )
    sensor.add_argument(
        "--recordings", type=int, default=5, help="simulated: recordings per class and severity"
    )
    sensor.add_argument("--as-fast-as-possible", action="store_true", help="do not pace at the sensor's rate")
    sensor.set_defaults(func=run_sensor)
    gateway = sub.add_parser(
        "gateway",
        help="a site gateway: answers windows, forwards unsure ones to the cloud",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _login(gateway, "--user")
    gateway.add_argument("--worker-id", default="gw0")
    gateway.add_argument(
        "--rule", default="hi", help="hi, hi:<theta>, two-threshold, none (never forward), all"
    )
    gateway.add_argument(
        "--forward-device", help="the gateway's device account towards the cloud (none: no cloud)"
    )
    gateway.add_argument("--forward-password-file", type=Path)
    gateway.add_argument("--forward-deadline-s", type=float, default=1.0)
    gateway.set_defaults(func=run_gateway)
    simulate = sub.add_parser(
        "simulate",
        help="simulated windows as .npy files",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    simulate.add_argument("--split", choices=["train", "validation", "test"], default="test")
    simulate.add_argument("--recordings", type=int, default=5, help="per fault and severity")
    simulate.add_argument("--duration-s", type=float, default=0.6)
    simulate.add_argument("--out", type=Path, required=True)
    simulate.set_defaults(func=run_simulate)


def run(args: argparse.Namespace) -> int:
    return int(args.func(args))  # pragma: no cover - argparse requires a FAULT_COMMAND, whose func wins


def _address(args: argparse.Namespace, user: str, password_file: Path) -> Any:
    from protocol.mqtt import BrokerAddress, read_secret

    return BrokerAddress.parse(args.broker, user, read_secret(password_file))


def _topics(args: argparse.Namespace) -> Any:
    from protocol.topics import Topics

    return Topics.namespaced(args.namespace) if args.namespace else Topics()


def _stop_on_signals() -> threading.Event:
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    return stop


def run_sensor(args: argparse.Namespace) -> int:
    from vibration.dataset import SplitSpec, make_windows
    from vibration.loaders import LoaderError, load_cwru, load_mafaulda, to_sensor_windows
    from vibration.sensor import SensorAgent, SensorConfig, window_stream

    try:
        if args.cwru is not None:
            x = to_sensor_windows(load_cwru(args.cwru), ["DE", "FE"])
            y = None
        elif args.mafaulda is not None:
            x = to_sensor_windows(load_mafaulda(args.mafaulda), ["underhang_radial", "underhang_tangential"])
            y = None
        else:
            windows = make_windows(SplitSpec("test", args.recordings, duration_s=0.6))
            x, y = windows.x, windows.y
        config = SensorConfig(
            device_id=args.device_id,
            broker=_address(args, args.device_id, args.password_file),
            topics=_topics(args),
            model_dir=args.models,
            state_dir=args.state_dir,
            rule=args.rule,
            uplink=args.uplink,
            deadline_s=args.deadline_s,
            realtime=not args.as_fast_as_possible,
        )
    except (LoaderError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    with SensorAgent(config) as agent:
        summary = agent.run(window_stream(x, y), stop)
    print(json.dumps(summary.as_dict()))
    return 0


def run_gateway(args: argparse.Namespace) -> int:
    from cloud_worker.gateway import GATEWAY_GROUP, Forward, Gateway
    from cloud_worker.model import ModelError
    from cloud_worker.worker import CloudWorker, WorkerConfig

    topics = _topics(args)
    try:
        forward = None
        if args.forward_device:
            if args.forward_password_file is None:
                raise ValueError("--forward-device needs --forward-password-file")
            address = _address(args, args.forward_device, args.forward_password_file)
            forward = Forward(address, topics, args.forward_device, args.forward_deadline_s)
        task = Gateway(args.models, rule=args.rule, forward=forward)
        config = WorkerConfig(
            _address(args, args.user, args.password_file),
            topics,
            args.models,
            args.worker_id,
            group=GATEWAY_GROUP,
            load_interval_s=0,  # the cloud workers' load is what devices plan on; a gateway publishes none
        )
    except (ModelError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    stop = _stop_on_signals()
    worker = CloudWorker(config, task=task).start()
    try:
        stop.wait()
    finally:
        worker.stop()
    print(json.dumps(worker.stats))
    return 0


def run_simulate(args: argparse.Namespace) -> int:
    from vibration.dataset import SplitSpec, describe, make_windows

    windows = make_windows(SplitSpec(args.split, args.recordings, duration_s=args.duration_s))
    args.out.mkdir(parents=True, exist_ok=True)
    np.save(args.out / f"{args.split}.windows.npy", windows.x)
    np.save(args.out / f"{args.split}.labels.npy", windows.y)
    counts: Dict[str, Any] = describe(windows)
    files: List[str] = [f"{args.split}.windows.npy", f"{args.split}.labels.npy"]
    print(json.dumps({"windows": len(windows), "per_class": counts, "files": files, "data": "synthetic"}))
    return 0
