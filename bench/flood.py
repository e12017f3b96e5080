"""One device floods the cloud worker; does another device still get its answers? (issue #13, point 7)

A private Mosquitto with the project's config, one `edgecascade cloud` worker process (the committed cloud
model by default), an attacker process that publishes valid offloads on its own topic as fast as it can
(QoS 0 by default, no expiry), and a victim that sends offloads at a steady rate with the agent's 2 s
deadline. Printed (and with --json written): the victim's answers within the deadline and its fallbacks,
what the attacker published, the worker's counters (every refusal by reason) and its peak memory (VmHWM).

  python -m bench.flood                         # QoS 0 flood at 5,000/s, 1,000 victim offloads at 100/s
  python -m bench.flood --attack-qos 1          # a QoS 1 flood: within the protocol, still one device
  python -m bench.flood --no-attack             # the baseline: the victim alone
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO / "models/fashion-mnist/cloud.onnx"


def _attack(address: Any, root: str, device: str, qos: int, rate: float, seconds: float, out: Any) -> None:
    """Publish valid offloads on `device`'s own topic for `seconds`, `rate` a second (0: as fast as it can);
    put the count in `out`."""
    from protocol.codec import CONTENT_TYPE_OFFLOAD, OffloadRequest, encode_offload
    from protocol.mqtt import PublishProperties, new_client
    from protocol.topics import Topics

    topics = Topics(root)
    client = new_client(address, device, max_queued=0)
    client.connect(address.host, address.port)
    client.loop_start()
    image = np.zeros((1, 28, 28), np.uint8)
    props = PublishProperties(
        content_type=CONTENT_TYPE_OFFLOAD, response_topic=topics.reply(device), correlation_data=b"flood"
    )
    payloads = [encode_offload(OffloadRequest("flood", device, seq, image)) for seq in range(1000)]
    sent = 0
    start = time.monotonic()
    deadline = start + seconds
    topic = topics.offload(device)
    while time.monotonic() < deadline:
        if rate and sent % 50 == 0:  # paced in steps of 50: a link of that rate, not a busy loop
            ahead = start + sent / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)
        info = client.publish(topic, payloads[sent % 1000], qos=qos, properties=props)
        sent += 1
        if qos and sent % 500 == 0:
            info.wait_for_publish(10)  # keep paho's own queue of unacknowledged messages bounded
    client.disconnect()
    client.loop_stop()
    out.put(sent)


def _peak_rss_mb(pid: int) -> Optional[float]:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


def run(args: argparse.Namespace) -> Dict[str, Any]:
    from bench.services import ServiceGroup
    from broker.launcher import BrokerProcess
    from cloud_worker.probe import OffloadProbe
    from protocol.topics import Topics

    namespace = f"flood{uuid.uuid4().hex[:6]}"
    topics = Topics.namespaced(namespace)
    images = np.random.default_rng(0).integers(0, 256, (args.victim, 1, 28, 28), dtype=np.uint8)
    with tempfile.TemporaryDirectory(prefix="flood-") as tmp, BrokerProcess(
        Path(tmp) / "broker", extra_config="\n".join(args.broker_config)
    ) as broker:
        services = ServiceGroup(Path(tmp) / "services")
        attacker: Optional[multiprocessing.Process] = None
        sent_by_attacker: multiprocessing.Queue[int] = multiprocessing.Queue()
        try:
            worker = services.start_cloud(
                "cloud",
                broker.credentials("cloud"),
                args.model,
                "w-flood",
                ["--threads", "1", "--namespace", namespace],
            )
            if not args.no_attack:
                attacker = multiprocessing.Process(
                    target=_attack,
                    args=(
                        broker.credentials("cam-flood"),
                        topics.root,
                        "cam-flood",
                        args.attack_qos,
                        args.attack_rate,
                        args.attack_seconds,
                        sent_by_attacker,
                    ),
                    daemon=True,
                )
                attacker.start()
                time.sleep(args.head_start_s)  # the flood is under way before the victim starts
            with OffloadProbe(broker.credentials("cam-victim"), topics, "cam-victim") as victim:
                futures = []
                start = time.monotonic()
                for i in range(args.victim):
                    delay = start + i / args.rate - time.monotonic()
                    if delay > 0:
                        time.sleep(delay)
                    futures.append(victim.request(images[i], seq=i, expiry_s=2))
                time.sleep(args.deadline_s + 0.5)  # every answer that could still count has come
                in_time = sum(
                    f.done() and f.result().round_trip_ms <= args.deadline_s * 1000.0 for f in futures
                )
            attack_sent = None
            if attacker is not None:
                attacker.join(args.attack_seconds + 30)
                attack_sent = sent_by_attacker.get(timeout=5) if attacker.exitcode == 0 else None
            peak = _peak_rss_mb(worker.pid)
            services.stop("cloud", timeout_s=60)
            log = (Path(tmp) / "services" / "cloud.log").read_text().splitlines()
            stats: Dict[str, Any] = next(
                (json.loads(line) for line in reversed(log) if line.startswith("{")), {}
            )
        finally:
            services.close()
            if attacker is not None and attacker.is_alive():
                attacker.kill()
    return {
        "attack_qos": None if args.no_attack else args.attack_qos,
        "attack_rate": None if args.no_attack else args.attack_rate,
        "attack_published": attack_sent,
        "victim_sent": args.victim,
        "victim_answered_in_time": in_time,
        "victim_fallbacks": args.victim - in_time,
        "worker_peak_rss_mb": None if peak is None else round(peak, 1),
        "worker_stats": stats,
    }


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.flood",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="cloud model (default %(default)s)")
    parser.add_argument("--victim", type=int, default=1000, help="victim offloads (default %(default)s)")
    parser.add_argument("--rate", type=float, default=100.0, help="victim offloads/s (default %(default)s)")
    parser.add_argument(
        "--deadline-s", type=float, default=2.0, help="victim's deadline (default %(default)s)"
    )
    parser.add_argument("--attack-qos", type=int, choices=(0, 1), default=0, help="QoS of the flood")
    parser.add_argument(
        "--attack-rate",
        type=float,
        default=5000.0,
        help="flood offloads/s (default %(default)s, about 40 Mbit/s; 0: as fast as the attacker can, which "
        "on a shared small host measures CPU contention more than the worker)",
    )
    parser.add_argument(
        "--attack-seconds", type=float, default=12.0, help="how long the flood lasts (default %(default)s)"
    )
    parser.add_argument("--head-start-s", type=float, default=1.0, help="flood before the victim starts")
    parser.add_argument("--no-attack", action="store_true", help="the victim alone (baseline)")
    parser.add_argument(
        "--broker-config", action="append", default=[], help="a mosquitto.conf line to add (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if not args.model.exists():
        print(f"bench.flood: no model at {args.model} (give --model)", file=sys.stderr)
        return 2
    result = run(args)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
