"""A minimal requester: sends offloads as one device and matches replies by CorrelationData.

For health checks, tests and the offload benchmarks; the device agent has its own, fuller client (window,
deadline, outbox). Replies are matched only by CorrelationData, never by arrival order.
"""

from __future__ import annotations

import itertools
import logging
import select
import threading
import time
import uuid
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import numpy as np
import paho.mqtt.client as mqtt

from protocol.codec import (
    CONTENT_TYPE_OFFLOAD,
    OffloadRefusal,
    OffloadReply,
    OffloadRequest,
    ProtocolError,
    decode_refusal,
    decode_reply,
    encode_offload,
    is_refusal,
)
from protocol.mqtt import BrokerAddress, PublishProperties, connect_properties, new_client
from protocol.topics import Topics

logger = logging.getLogger(__name__)


@dataclass
class Answer:
    """A reply and its round trip, send call to reply callback."""

    reply: OffloadReply
    round_trip_ms: float
    correlation: bytes
    received_ns: int = 0  # time.perf_counter_ns() when the reply arrived


class Refused(Exception):
    """A worker refused the offload (`OffloadRefusal`): what a request's future raises then."""

    def __init__(self, refusal: OffloadRefusal) -> None:
        super().__init__(f"refused by {refusal.worker_id}: {refusal.reason}")
        self.refusal = refusal


class OffloadProbe:
    """Connects as `device_id` (its broker user), subscribes to its reply topic, sends offloads."""

    def __init__(
        self, broker: BrokerAddress, topics: Topics, device_id: str, run_id: Optional[str] = None
    ) -> None:
        self.topics = topics
        self.device_id = device_id
        self.run_id = run_id or uuid.uuid4().hex[:12]
        self.reply_topic = topics.reply(device_id)
        self.bad_replies = 0
        self.unmatched_replies = 0
        self.refusals = 0  # requests a worker refused (their futures raise `Refused`)
        self._seq = itertools.count()
        self._pending: Dict[bytes, Any] = {}  # correlation -> (future, sent perf_counter_ns)
        self._lock = threading.Lock()
        self._subscribed = threading.Event()
        self._broker = broker
        # Client id = device id: the broker binds a device account to it (a probe and an agent of one device
        # therefore take turns, like two agents would).
        self.client = new_client(broker, device_id, on_connect=self._on_connect)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda c, u, mid, reasons, props: self._subscribed.set()

    def start(self, timeout_s: float = 10.0, threaded: bool = True) -> OffloadProbe:
        """Connect and subscribe. `threaded=False`: no network thread; the caller drives I/O with `pump`
        from the one thread that also sends, so a request is written by the call that publishes it."""
        self.threaded = threaded
        self.client.connect(
            self._broker.host, self._broker.port, clean_start=True, properties=connect_properties(0)
        )
        if threaded:
            self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._subscribed.is_set() and time.monotonic() < deadline:
            if threaded:
                self._subscribed.wait(0.05)
            else:
                self.pump(0.05)
        if not self._subscribed.is_set():
            self.close()
            raise TimeoutError(f"probe {self.device_id} not subscribed to {self.reply_topic}")
        return self

    def pump(self, timeout_s: float) -> None:
        """Unthreaded mode: wait up to `timeout_s` for traffic, then handle everything already received."""
        self.client.loop(timeout=timeout_s)
        sock = self.client.socket()
        while sock is not None and select.select([sock], [], [], 0)[0]:
            if self.client.loop_read() != mqtt.MQTT_ERR_SUCCESS:
                break
            sock = self.client.socket()

    def close(self) -> None:
        self.client.disconnect()
        if getattr(self, "threaded", True):
            self.client.loop_stop()

    def __enter__(self) -> OffloadProbe:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(self.reply_topic, qos=1)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        received_ns = time.perf_counter_ns()
        correlation = getattr(message.properties, "CorrelationData", None)
        payload = bytes(message.payload)
        try:
            refusal = decode_refusal(payload) if is_refusal(payload) else None
            reply = decode_reply(payload) if refusal is None else None
        except ProtocolError as exc:
            self.bad_replies += 1
            logger.warning("bad reply on %s: %s", message.topic, exc)
            return
        key = bytes(correlation) if correlation is not None else b""
        with self._lock:
            entry = self._pending.pop(key, None)
        if entry is None:
            self.unmatched_replies += 1  # a duplicate (after a re-send) or not ours
            return
        future, sent_ns = entry
        if reply is None:
            assert refusal is not None
            self.refusals += 1
            future.set_exception(Refused(refusal))
            return
        future.set_result(Answer(reply, (received_ns - sent_ns) / 1e6, key, received_ns))

    def request(
        self,
        image: np.ndarray,
        *,
        seq: Optional[int] = None,
        correlation: Optional[bytes] = None,
        expiry_s: Optional[int] = 30,
        future: Optional[Future] = None,
    ) -> Future:
        """Publish one offload (QoS 1); the future resolves to an `Answer`. Re-send by passing the same
        correlation and future."""
        seq = next(self._seq) if seq is None else seq
        correlation = correlation or f"{self.run_id}:{seq}".encode()
        future = future or Future()
        payload = encode_offload(OffloadRequest(self.run_id, self.device_id, seq, image, time.time_ns()))
        props = PublishProperties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=self.reply_topic,
            correlation_data=correlation,
            expiry_s=expiry_s,
        )
        with self._lock:
            self._pending[correlation] = (future, time.perf_counter_ns())
        self.client.publish(self.topics.offload(self.device_id), payload, qos=1, properties=props)
        return future

    def outstanding(self) -> List[bytes]:
        with self._lock:
            return list(self._pending)
