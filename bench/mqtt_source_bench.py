"""The MQTT input source under load: a separate process publishes images to a device's input topic, the agent
classifies them, the collector stores one row each.

    .venv/bin/python -m bench.mqtt_source_bench                       # 10,000 at 500/s, then an overrun
    .venv/bin/python -m bench.mqtt_source_bench --count 2000 --overrun-count 3000 --json results/mqtt.json

Two phases, each its own run of one agent (the committed Fashion-MNIST models, `--policy`, no cloud):
- paced:   the publisher (a separate process, the device's sensor account, QoS 1 to the broker) sends
           `--count` test images as PNG at `--rate`; every one must reach the agent and get exactly one row in
           the results database, with the label it was sent with (checked per label).
- overrun: the publisher sends `--overrun-count` images as fast as it can to a device slowed by
           `--device-ms` per sample (a sleep in the policy: a slower device emulated, said so), with a queue
           of `--queue`: the source is faster than the device, so images must be dropped and counted, the
           queue must never hold more than its bound, and every accepted image must still get exactly one row.
Exit status 1 when a check fails.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent


# -- the publisher (a process of its own) ------------------------------------------------------------------
def publish(args: argparse.Namespace) -> int:
    """Publish `count` test images (PNG, label chunk) to `topic` at `rate` (0: flat out); JSON figures out."""
    from PIL import Image, PngImagePlugin

    from device_agent.sources import load_idx_dataset
    from protocol.mqtt import BrokerAddress, new_client

    images, labels = load_idx_dataset("fashion-mnist", "test")
    payloads: List[bytes] = []
    sent_labels: List[int] = []
    for i in range(args.count):
        k = (args.offset + i) % len(images)
        text = PngImagePlugin.PngInfo()
        text.add_text("label", str(int(labels[k])))
        out = io.BytesIO()
        Image.fromarray(images[k][0]).save(out, format="PNG", pnginfo=text)
        payloads.append(out.getvalue())
        sent_labels.append(int(labels[k]))
    address = BrokerAddress(args.host, args.port, args.user, Path(args.password_file).read_text().strip())
    client = new_client(address, args.user)  # a sensor account is bound to client id = its name
    client.max_inflight_messages_set(1000)
    client.connect(address.host, address.port)
    client.loop_start()
    started = time.monotonic()
    infos: List[Any] = []
    for i, payload in enumerate(payloads):
        if args.rate > 0:
            due = started + i / args.rate
            if due > time.monotonic():
                time.sleep(due - time.monotonic())
        infos.append(client.publish(args.topic, payload, qos=1))
    published_s = time.monotonic() - started
    for info in infos:
        info.wait_for_publish(60)
    acked_s = time.monotonic() - started
    client.disconnect()
    client.loop_stop()
    print(
        json.dumps(
            {
                "published": len(payloads),
                "published_s": round(published_s, 3),
                "acked_s": round(acked_s, 3),
                "bytes": sum(len(p) for p in payloads),
                "labels": dict(collections.Counter(sent_labels)),
            }
        )
    )
    return 0


# -- the device side ---------------------------------------------------------------------------------------
def _rss_mib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def _rows(db: Path, run_id: str) -> List[Any]:
    with sqlite3.connect(db) as raw:
        return raw.execute(
            "SELECT seq, label, prediction FROM inferences WHERE run_id = ?", (run_id,)
        ).fetchall()


def phase(
    name: str,
    *,
    broker: Any,
    topics: Any,
    db: Path,
    work: Path,
    args: argparse.Namespace,
    count: int,
    rate: float,
    device_ms: float,
    offset: int,
) -> Dict[str, Any]:
    """One run: an agent with an MQTT input, a publisher process, the rows accounted."""
    from device_agent import AgentConfig, DeviceAgent
    from device_agent.mqtt_input import MqttInput
    from protocol.ids import sensor_account

    device_id = f"bench-{name}-{uuid.uuid4().hex[:6]}"
    config = AgentConfig(
        device_id=device_id,
        broker=broker.credentials(device_id),
        topics=topics,
        model_dir=REPO / "models" / "fashion-mnist",
        policy={"name": args.policy, "params": {}},
        state_dir=work / f"state-{name}",
        meters=["estimate"],
        idle_seconds=0.0,
        threads=1,
    )
    agent = DeviceAgent(config)
    inputs = MqttInput(agent, queue_size=args.queue)
    sensor = sensor_account(device_id)
    secret = work / f"{sensor}.pw"
    secret.write_text(broker.credentials(sensor).password + "\n")
    agent.start()
    if device_ms > 0:
        decide = agent.policy.decide

        def slow(view: Any) -> Any:  # a slower device, emulated: said so in the output
            time.sleep(device_ms / 1000.0)
            return decide(view)

        agent.policy.decide = slow  # type: ignore[method-assign]
    stop = threading.Event()
    served: List[Any] = []
    consumer = threading.Thread(target=lambda: served.append(inputs.serve(stop)), name="mqtt-input")
    consumer.start()
    rss_before = _rss_mib()
    first: List[float] = []

    def first_arrival() -> None:  # the device's clock starts with the first image, not the publisher's start
        while not stop.is_set() and not inputs.stats["received"]:
            time.sleep(0.001)
        first.append(time.monotonic())

    threading.Thread(target=first_arrival, daemon=True).start()
    publisher = subprocess.run(
        [sys.executable, "-m", "bench.mqtt_source_bench", "publish", "--host", broker.host, "--port",
         str(broker.port), "--user", sensor, "--password-file", str(secret), "--topic",
         topics.input(device_id), "--count", str(count), "--rate", str(rate), "--offset", str(offset)],
        cwd=REPO, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    if publisher.returncode != 0:
        raise RuntimeError(f"publisher failed: {publisher.stderr}")
    sent = json.loads(publisher.stdout.strip().splitlines()[-1])
    # Everything the broker took reaches us (QoS 0 to the agent on loopback); wait until it is all taken.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (inputs.stats["received"] >= count and inputs.depth() == 0):
        time.sleep(0.05)
    stop.set()
    consumer.join(300)
    took_s = time.monotonic() - (first[0] if first else time.monotonic())
    rss_after = _rss_mib()
    final = agent.close()
    stats = dict(inputs.stats)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and len(_rows(db, agent.run_id)) < stats["accepted"]:
        time.sleep(0.2)
    rows = _rows(db, agent.run_id)
    seqs = [r[0] for r in rows]
    row_labels = collections.Counter(int(r[1]) for r in rows)
    sent_labels = collections.Counter({int(k): v for k, v in sent["labels"].items()})
    correct = sum(1 for r in rows if r[1] == r[2])
    result = {
        "phase": name,
        "published": sent["published"],
        # what the broker acknowledged per second (paho queues a flat-out publisher's messages first)
        "publish_rate_per_s": round(sent["published"] / sent["acked_s"], 1) if sent["acked_s"] else None,
        "received": stats["received"],
        "accepted": stats["accepted"],
        "dropped": stats["dropped"],
        "bad": inputs.bad_by_reason(),
        "rows": len(rows),
        "rows_duplicated": len(seqs) - len(set(seqs)),
        "queue_bound": args.queue,
        "queue_high_water": stats["high_water"],
        "queue_high_water_kib": round(stats["high_water_bytes"] / 1024, 1),
        "seconds": round(took_s, 2),  # first image received to the last one taken and answered
        "answered_per_s": round(stats["accepted"] / took_s, 1) if took_s > 0 else None,
        "accuracy": round(correct / len(rows), 4) if rows else None,
        "labels_match": row_labels == sent_labels,
        "rss_mib_before": round(rss_before, 1),
        "rss_mib_after": round(rss_after, 1),
        "device_ms_emulated": device_ms,
        "outbox_left": final.outbox_left,
    }
    return result


def _line(r: Dict[str, Any]) -> str:
    """One phase in a line."""
    device = f"device emulated at {r['device_ms_emulated']} ms/image" if r["device_ms_emulated"] else "device"
    return (
        f"{r['phase']:8} {r['published']} images at {r['publish_rate_per_s']}/s to a {device}: received "
        f"{r['received']}, accepted {r['accepted']} ({r['answered_per_s']}/s), dropped {r['dropped']}, rows "
        f"{r['rows']} (twice: {r['rows_duplicated']}), labels {'match' if r['labels_match'] else 'differ'}, "
        f"accuracy {r['accuracy']}, queue high water {r['queue_high_water']}/{r['queue_bound']} "
        f"({r['queue_high_water_kib']} KiB), RSS {r['rss_mib_before']} -> {r['rss_mib_after']} MiB"
    )


def checks(paced: Dict[str, Any], overrun: Dict[str, Any]) -> List[str]:
    """What must hold (empty: all did)."""
    failed = []
    if not (paced["received"] == paced["accepted"] == paced["rows"] == paced["published"]):
        failed.append("paced: not every published image got exactly one row")
    if paced["dropped"] or not paced["labels_match"] or paced["rows_duplicated"]:
        failed.append("paced: drops, duplicates or labels that differ from what was sent")
    if overrun["dropped"] == 0:
        failed.append("overrun: the source was not faster than the device (nothing dropped)")
    if overrun["accepted"] + overrun["dropped"] + sum(overrun["bad"].values()) != overrun["received"]:
        failed.append("overrun: received images unaccounted for")
    if overrun["rows"] != overrun["accepted"] or overrun["rows_duplicated"]:
        failed.append("overrun: accepted images without exactly one row")
    if overrun["queue_high_water"] > overrun["queue_bound"]:
        failed.append("overrun: the queue grew beyond its bound")
    return failed


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench.mqtt_source_bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command")
    pub = sub.add_parser("publish", help="(internal) the publisher process")
    for flag, kind in (("--host", str), ("--port", int), ("--user", str), ("--password-file", str),
                       ("--topic", str), ("--count", int), ("--rate", float), ("--offset", int)):  # fmt: skip
        pub.add_argument(flag, type=kind, required=True)
    parser.add_argument("--count", type=int, default=10_000, help="paced phase: images (default %(default)s)")
    parser.add_argument(
        "--rate", type=float, default=500.0, help="paced phase: images/s (default %(default)s)"
    )
    parser.add_argument("--overrun-count", type=int, default=5000, help="overrun phase: images, flat out")
    parser.add_argument(
        "--device-ms", type=float, default=2.0, help="overrun phase: emulated device time per image (ms)"
    )
    parser.add_argument("--queue", type=int, default=64, help="the input queue's bound (default %(default)s)")
    parser.add_argument("--policy", default="edge-only", help="the agent's policy (no cloud runs here)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    if args.command == "publish":
        return publish(args)

    from broker.launcher import BrokerProcess
    from protocol.topics import Topics
    from results_db import Collector, CollectorConfig

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    results = []
    with tempfile.TemporaryDirectory(prefix="mqtt-source-bench-") as tmp, BrokerProcess(
        Path(tmp) / "broker"
    ) as broker:
        work = Path(tmp)
        db = work / "results.db"
        topics = Topics.namespaced(f"b{uuid.uuid4().hex[:8]}")
        collector = Collector(CollectorConfig(broker.credentials("collector"), topics, db)).start()
        try:
            for name, count, rate, device_ms in (
                ("paced", args.count, args.rate, 0.0),
                ("overrun", args.overrun_count, 0.0, args.device_ms),
            ):
                results.append(
                    phase(
                        name,
                        broker=broker,
                        topics=topics,
                        db=db,
                        work=work,
                        args=args,
                        count=count,
                        rate=rate,
                        device_ms=device_ms,
                        offset=0,
                    )
                )
        finally:
            collector.stop()
    for r in results:
        print(json.dumps(r))
    for r in results:
        print(_line(r))
    paced, overrun = results
    failed = checks(paced, overrun)
    for line in failed:
        print(f"FAILED: {line}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"phases": results, "failed": failed}, indent=2) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
