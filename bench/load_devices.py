"""Simulated devices for the load mode: each its own paho MQTT 5 client (TCP connection, account, client id =
device id, persistent session), run id and sequence numbers, all driven by one selector loop in one thread.

One thread for thousands of clients: paho's `loop_start` would make a thread per device (4,000 threads cost
more memory and scheduling than the broker under test), and paho's documented external-loop calls
(`loop_read`, `loop_write`, `loop_misc` on each client's socket) need nothing around them but a selector.

A device replays the recorded trace (bench/load_trace.py) from its own offset, one sample every 1/rate_hz s
(each device's phase random, seeded): the sample is done `edge_ms` after it is due; an edge exit becomes a
result record at once; an offload carries the real image (QoS 1, ResponseTopic, CorrelationData, expiry, as
`device_agent.offloads` sends it) and becomes a record with the cloud's answer, or the edge's answer flagged
`fallback` when no reply comes within the deadline. Records leave in batches (QoS 1) to the collector. Every
record is labelled simulated: energy_source `trace`, the run's profile `load-mode-simulated`.
"""

from __future__ import annotations

import heapq
import logging
import math
import random
import selectors
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Tuple

import numpy as np
import paho.mqtt.client as mqtt

from device_agent.keys import correlation
from protocol import CONTENT_TYPE_OFFLOAD, CONTENT_TYPE_RESULTS, Topics, encode_records
from protocol.codec import OffloadRequest, decode_reply, encode_offload, is_refusal
from protocol.mqtt import BrokerAddress, connect_properties, new_client, publish_properties
from protocol.records import InferenceRecord, RunRecord

logger = logging.getLogger(__name__)

PROFILE = "load-mode-simulated"
ENERGY_SOURCE = "trace"  # no meter: these devices compute nothing


@dataclass
class Pending:
    seq: int
    entry: Dict[str, Any]
    sent_mono: float
    ts_unix: float
    bytes_up: int


@dataclass
class SimDevice:
    device_id: str
    address: BrokerAddress
    run_id: str
    offset: int
    client: Any = None
    connected: bool = False
    seq: int = 0
    pending: Dict[bytes, Pending] = field(default_factory=dict)
    records: List[Dict[str, Any]] = field(default_factory=list)


@dataclass
class LoadStats:
    connected: int = 0
    connect_failures: int = 0
    disconnects: int = 0
    samples: int = 0
    offloads: int = 0
    replies: int = 0
    refusals: int = 0
    fallbacks: int = 0
    late_replies: int = 0
    records_published: int = 0
    records_acked: int = 0
    rtt_ms: List[float] = field(default_factory=list)
    lag_ms: List[float] = field(default_factory=list)  # how late the driver ran each sample: its own limit


class LoadDriver:
    """`connect(devices)`, `run(seconds)`, `finish(timeout_s)`, `close()`; figures in `stats`."""

    def __init__(
        self,
        trace: Dict[str, Any],
        images: np.ndarray,
        topics: Topics,
        *,
        rate_hz: float,
        deadline_s: float = 2.0,
        results_batch: int = 50,
        flush_s: float = 1.0,
        seed: int = 0,
    ) -> None:
        self.entries = trace["samples"]
        self.images = images
        self.topics = topics
        self.rate_hz = rate_hz
        self.deadline_s = deadline_s
        self.results_batch = results_batch
        self.flush_s = flush_s
        self.random = random.Random(seed)
        self.selector = selectors.DefaultSelector()
        self.devices: List[SimDevice] = []
        self.stats = LoadStats()
        self._timers: List[Tuple[float, int, str, SimDevice]] = []  # (due, tiebreak, what, device)
        self._tie = 0
        self._acks: Dict[Tuple[str, int], int] = {}  # (device, mid) -> records in that results message
        self._sampling = False

    # -- connecting --------------------------------------------------------------------------------
    def connect(self, devices: List[SimDevice], per_second: float = 400.0, timeout_s: float = 120.0) -> float:
        """Connect every device (at most `per_second` new connections a second); seconds until all were."""
        start = time.monotonic()
        for k, device in enumerate(devices):
            self._open(device)
            self.devices.append(device)
            due = start + (k + 1) / per_second
            while time.monotonic() < due:  # serve the connections made so far until the next is due
                self._turn(due - time.monotonic())
        deadline = start + timeout_s
        while self.stats.connected < len(devices) and time.monotonic() < deadline:
            self._turn(0.05)
        return time.monotonic() - start

    def _open(self, device: SimDevice) -> None:
        client = new_client(device.address, device.device_id, on_connect=self._on_connect)
        client.user_data_set(device)
        client.on_message = self._on_message
        client.on_publish = self._on_publish
        client.on_disconnect = self._on_disconnect
        device.client = client
        client.connect(
            device.address.host,
            device.address.port,
            keepalive=60,
            clean_start=False,
            properties=connect_properties(600),
        )
        sock = client.socket()
        if sock is None:  # connect() raised otherwise; paho's contract, said for the type checker
            raise ConnectionError(f"{device.device_id}: no socket after connect")
        self.selector.register(sock, selectors.EVENT_READ, device)
        self._write(device)

    def _on_connect(self, client: Any, device: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self.stats.connect_failures += 1
            return
        device.connected = True
        self.stats.connected += 1
        client.subscribe(self.topics.reply(device.device_id), qos=1)
        run = RunRecord(
            run_id=device.run_id,
            device_id=device.device_id,
            policy="meanet",
            policy_params={"replayed": "bench/load_trace.py"},
            profile=PROFILE,
            dataset="fashion-mnist:test",
            split="test",
            model_sha256="",
            code_revision="",
            host={"simulated": True},
            started_unix=time.time(),
        )
        device.records.append(run.to_map())

    def _on_disconnect(self, client: Any, device: SimDevice, flags: Any, reason: Any, props: Any) -> None:
        if device.connected:
            self.stats.disconnects += 1
            self.stats.connected -= 1
        device.connected = False

    # -- the loop ------------------------------------------------------------------------------------
    def _write(self, device: SimDevice) -> None:
        if device.client.want_write():
            device.client.loop_write()

    def _turn(self, timeout_s: float) -> None:
        for key, _ in self.selector.select(timeout_s):
            device = key.data
            rc = device.client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                self.selector.unregister(key.fileobj)
                continue
            self._write(device)

    def _at(self, due: float, what: str, device: SimDevice) -> None:
        self._tie += 1
        heapq.heappush(self._timers, (due, self._tie, what, device))

    def run(self, seconds: float) -> float:
        """Every device samples for `seconds`; returns the seconds it took."""
        start = time.monotonic()
        period = 1.0 / self.rate_hz
        for device in self.devices:
            first = start + self.random.uniform(0, period)
            self._at(first, "sample", device)
            self._at(start + self.random.uniform(0, self.flush_s), "flush", device)
        self._sampling = True
        end = start + seconds
        next_misc = start + 1.0
        while True:
            now = time.monotonic()
            if now >= end and self._sampling:
                self._sampling = False
            if not self._sampling and not any(d.pending for d in self.devices):
                break
            while self._timers and self._timers[0][0] <= now:
                due, _, what, device = heapq.heappop(self._timers)
                self._fire(what, device, due, now, period)
            if now >= next_misc:
                next_misc = now + 1.0
                self._expire(now)
                for device in self.devices:
                    device.client.loop_misc()
            wait = self._timers[0][0] - time.monotonic() if self._timers else 0.05
            self._turn(min(0.05, max(0.0, wait)))
        return time.monotonic() - start

    def _fire(self, what: str, device: SimDevice, due: float, now: float, period: float) -> None:
        if what == "flush":
            self._flush(device)
            if self._sampling:
                self._at(due + self.flush_s, "flush", device)
            return
        if not self._sampling:
            return
        self.stats.lag_ms.append((now - due) * 1000.0)
        entry = self.entries[(device.offset + device.seq) % len(self.entries)]
        self._sample(device, entry)
        # The next sample is due a period after this one; this one took edge_ms of (simulated) compute.
        self._at(due + period + entry["edge_ms"] / 1000.0, "sample", device)

    def _record(self, device: SimDevice, seq: int, entry: Dict[str, Any], **fields: Any) -> None:
        record = InferenceRecord(
            run_id=device.run_id,
            device_id=device.device_id,
            seq=seq,
            prediction=fields.pop("prediction", entry["prediction"]),
            exit_stage=fields.pop("exit_stage"),
            edge_ms=entry["edge_ms"],
            label=entry["label"],
            p_main=entry["p_main"],
            p_ext=entry["p_ext"],
            energy_source=ENERGY_SOURCE,
            ts_unix=fields.pop("ts_unix", time.time()),
            **fields,
        )
        device.records.append(record.to_map())
        if len(device.records) >= self.results_batch:
            self._flush(device)

    def _sample(self, device: SimDevice, entry: Dict[str, Any]) -> None:
        seq = device.seq
        device.seq += 1
        self.stats.samples += 1
        if entry["exit"] != "offload":
            self._record(device, seq, entry, exit_stage=entry["exit"])
            return
        payload = encode_offload(
            OffloadRequest(device.run_id, device.device_id, seq, self.images[entry["i"]], time.time_ns())
        )
        corr = correlation(device.run_id, seq)
        props = publish_properties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=self.topics.reply(device.device_id),
            correlation_data=corr,
            expiry_s=max(1, math.ceil(self.deadline_s)),
        )
        device.pending[corr] = Pending(seq, entry, time.monotonic(), time.time(), len(payload))
        device.client.publish(self.topics.offload(device.device_id), payload, qos=1, properties=props)
        self.stats.offloads += 1

    def _on_message(self, client: Any, device: SimDevice, message: Any) -> None:
        corr = getattr(message.properties, "CorrelationData", None)
        pending = device.pending.pop(bytes(corr), None) if corr else None
        if pending is None:
            self.stats.late_replies += 1
            return
        rtt_ms = (time.monotonic() - pending.sent_mono) * 1000.0
        payload = bytes(message.payload)
        if is_refusal(payload):
            self.stats.refusals += 1
            self._fallback(device, pending)
            return
        reply = decode_reply(payload)
        self.stats.replies += 1
        self.stats.rtt_ms.append(rtt_ms)
        self._record(
            device,
            pending.seq,
            pending.entry,
            exit_stage="cloud",
            prediction=reply.prediction,
            cloud_ms=reply.cloud_ms,
            network_ms=max(0.0, rtt_ms - reply.cloud_ms),
            bytes_up=pending.bytes_up,
            bytes_down=len(payload),
            ts_unix=pending.ts_unix,
        )

    def _fallback(self, device: SimDevice, pending: Pending) -> None:
        self.stats.fallbacks += 1
        self._record(
            device, pending.seq, pending.entry, exit_stage="fallback", bytes_up=pending.bytes_up,
            ts_unix=pending.ts_unix,
        )  # fmt: skip

    def _expire(self, now: float) -> None:
        for device in self.devices:
            late = [c for c, p in device.pending.items() if now - p.sent_mono > self.deadline_s]
            for corr in late:
                self._fallback(device, device.pending.pop(corr))

    def _flush(self, device: SimDevice) -> None:
        if not device.records or not device.connected:
            return
        payload = encode_records(device.records)
        props = publish_properties(content_type=CONTENT_TYPE_RESULTS)
        info = device.client.publish(self.topics.results(device.device_id), payload, qos=1, properties=props)
        inferences = sum(r["type"] == "inference" for r in device.records)
        self._acks[(device.device_id, info.mid)] = inferences
        self.stats.records_published += inferences
        device.records = []

    def _on_publish(self, client: Any, device: SimDevice, mid: int, reason: Any, props: Any) -> None:
        self.stats.records_acked += self._acks.pop((device.device_id, mid), 0)

    def finish(self, timeout_s: float = 30.0) -> bool:
        """Every buffered record sent and PUBACKed (True), or `timeout_s` passed."""
        for device in self.devices:
            self._flush(device)
        deadline = time.monotonic() + timeout_s
        while self._acks and time.monotonic() < deadline:
            self._turn(0.05)
        return not self._acks

    def close(self) -> None:
        for device in self.devices:
            if device.client is not None:
                device.client.disconnect()
                self._write(device)
        self.selector.close()
