"""The gateway of the fault hierarchy: a cloud worker whose task may ask the cloud in turn.

A gateway worker is a `CloudWorker` (shared subscription, fair queue, deadlines, refusals, replies) serving
the sensors' `gateway` topics (`Topics.gateway`, group `gateway`) with the `Gateway` task: it runs the
gateway tier of the fault card on a batch of windows, applies its rule (HI or the two-threshold rule,
`vibration.rules`; per sensor when `rules` names one, e.g. a critical pump whose misses cost more), and sends
each window it is unsure of on to the cloud, as a device of its own (`forward_device`: its own `offload` and
`reply` topics, so that the cloud worker's checks and the ACL treat it like any device). The reply to the
sensor carries the final answer and, in `extra`, the tier that gave it (`gateway`, `cloud`, or
`gateway-fallback` when the cloud did not answer within `forward_deadline_s`), the gateway's max-softmax
(`p_gateway`), its own model time per window (`gateway_ms`: its share of the batch's model run, not the wait
for the cloud) and joules (`gateway_j`: analytic, from the card's MACs and bytes, `metering.analytic`), and
for a forwarded window the cloud's compute (`cloud_ms`, `cloud_j` as the cloud worker reported them) and
the gateway's round trip to the cloud (`forward_ms`). A window the gateway answers gets its rule's answer
(`TierDecision.prediction`: the two-threshold rule's "fault" is the likeliest fault class even where
"healthy" is likelier).

On a bridged site (`cells.sites`) both log in to the site broker (`Site.gateway_address`): the sensors'
windows never leave the site, and the forwarded ones cross its bridge to the cell's cloud workers as that
device's offloads, their replies coming back over it (tests/test_fault_sites.py).

A forwarded batch waits for the cloud in the compute thread: with a few percent forwarded and round trips of
milliseconds this costs the gateway little; a gateway that forwards much would run `streams` > 1.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from cloud_worker.model import CloudSession, ModelError
from cloud_worker.tasks import Served
from metering.analytic import AnalyticModel
from protocol.codec import (
    CONTENT_TYPE_OFFLOAD,
    CONTENT_TYPE_REPLY,
    OffloadReply,
    OffloadRequest,
    ProtocolError,
    decode_reply,
    encode_offload,
    encode_reply,
    is_refusal,
)
from protocol.mqtt import BrokerAddress, new_client, publish_properties
from protocol.topics import Topics
from vibration.card import FaultCardError, load_fault_card
from vibration.rules import FixedRule, HiRule, TwoThresholdRule

logger = logging.getLogger(__name__)

GATEWAY_GROUP = "gateway"


@dataclass(frozen=True)
class Forward:
    """How the gateway reaches the cloud: as device `device_id` (its own account) on `broker`."""

    broker: BrokerAddress
    topics: Topics
    device_id: str
    deadline_s: float = 1.0


@dataclass
class GatewayAnswer:
    logits: np.ndarray
    prediction: int
    tier: str  # gateway, cloud or gateway-fallback
    p_gateway: float
    gateway_ms: float
    gateway_j: float
    cloud_ms: Optional[float] = None
    forward_ms: Optional[float] = None
    cloud_j: Optional[float] = None


@dataclass
class _Uplink:
    """The gateway's MQTT client towards the cloud: one request per unsure window, answers by correlation."""

    forward: Forward
    run_id: str = field(default="")
    _pending: Dict[bytes, Future] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _seq: int = 0

    def start(self, timeout_s: float = 10.0) -> None:
        fw = self.forward
        self.run_id = f"{fw.device_id}-fwd"
        connected = threading.Event()
        reply_topic = fw.topics.reply(fw.device_id)

        def on_connect(client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
            if not reason.is_failure:
                client.subscribe(reply_topic, qos=1)
                connected.set()

        # a device account: the broker binds its client id to its username
        self.client = new_client(fw.broker, fw.device_id, on_connect=on_connect)
        self.client.on_message = self._on_message
        self.client.connect(fw.broker.host, fw.broker.port, keepalive=15)
        self.client.loop_start()
        if not connected.wait(timeout_s):
            self.close()
            raise TimeoutError(f"gateway uplink {fw.device_id} not connected within {timeout_s}s")

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()

    def ask(self, window: np.ndarray) -> Tuple[Future, float]:
        fw = self.forward
        with self._lock:
            self._seq += 1
            seq = self._seq
        corr = f"{self.run_id}/{seq}".encode()
        future: Future = Future()
        with self._lock:
            self._pending[corr] = future
        payload = encode_offload(OffloadRequest(self.run_id, fw.device_id, seq, window, time.time_ns()))
        props = publish_properties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=fw.topics.reply(fw.device_id),
            correlation_data=corr,
            expiry_s=max(1, math.ceil(fw.deadline_s)),
        )
        self.client.publish(fw.topics.offload(fw.device_id), payload, qos=1, properties=props)
        return future, time.monotonic()

    def forget(self, future: Future) -> None:
        with self._lock:
            for corr, f in list(self._pending.items()):
                if f is future:
                    del self._pending[corr]

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        corr = getattr(message.properties, "CorrelationData", None) or b""
        with self._lock:
            future = self._pending.pop(bytes(corr), None)
        if future is None:
            return
        payload = bytes(message.payload)
        if is_refusal(payload):
            future.set_result(None)
            return
        try:
            future.set_result(decode_reply(payload))
        except ProtocolError as exc:
            logger.warning("bad cloud reply to the gateway: %s", exc)
            future.set_result(None)


class Gateway:
    """The gateway tier of a fault card: int16 windows in, the gateway's or the cloud's logits out."""

    topic_kind = "gateway"
    reply_content_type = CONTENT_TYPE_REPLY

    def __init__(
        self,
        model_dir: Path,
        rule: str = "hi",
        rules: Optional[Mapping[str, str]] = None,
        forward: Optional[Forward] = None,
        threads: Optional[int] = 1,
        providers: Sequence[str] = ("CPUExecutionProvider",),
    ) -> None:
        try:
            card = load_fault_card(model_dir)
            path = card.verify("gateway")
        except FaultCardError as exc:
            raise ModelError(str(exc)) from None
        self.card = card
        self.session = CloudSession(path, providers, threads)
        self.path = path
        self.input_shape: Tuple[int, ...] = self.session.input_shape
        self.input_dtype = self.session.input_dtype
        self.sample_bytes = self.session.sample_bytes
        self.gateway_j = AnalyticModel.for_card(card.raw).block_j("gateway")
        self.default_rule = self._rule(rule)
        self.rules = {device: self._rule(name) for device, name in (rules or {}).items()}
        self.uplink: Optional[_Uplink] = None
        if forward is not None:
            self.uplink = _Uplink(forward)
            self.uplink.start()
        self._batch_devices: List[str] = []

    def _rule(self, spec: str) -> Any:
        """`hi` (the card's θ) or `hi:<θ>`, `two-threshold`, `none` (never forward), `all` (always)."""
        name, _, value = spec.partition(":")
        if name == "hi":
            return HiRule(float(value) if value else self.card.hi_theta("gateway"))
        if name == "two-threshold" and not value:
            return TwoThresholdRule(*self.card.two_thresholds("gateway"))
        if name in ("none", "all") and not value:  # never forward, or forward every window (a relay)
            return FixedRule(offload=name == "all")
        raise ValueError(f"gateway rule must be hi[:θ], two-threshold, none or all, got {spec!r}")

    def warm_up(self, batch_sizes: Sequence[int]) -> None:
        self.session.warm_up(batch_sizes)

    def run(self, windows: np.ndarray) -> np.ndarray:
        """The gateway tier's logits alone (the worker times one sample with it)."""
        return self.session.logits(windows)

    def run_jobs(self, requests: Sequence[OffloadRequest]) -> List[GatewayAnswer]:
        """The answers of a batch: the gateway's, and the cloud's for the windows it is unsure of."""
        windows = np.stack([r.tensor for r in requests])
        started = time.perf_counter()
        logits = self.session.logits(windows)
        gateway_ms = (time.perf_counter() - started) * 1000.0 / len(requests)
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        answers: List[GatewayAnswer] = []
        asked: List[Tuple[int, Future, float]] = []
        for i, request in enumerate(requests):
            decision = self.rules.get(request.device_id, self.default_rule).decide(probs[i])
            answers.append(
                GatewayAnswer(
                    logits[i], decision.prediction, "gateway", decision.confidence, gateway_ms, self.gateway_j
                )
            )
            if not decision.offload or self.uplink is None:
                continue
            future, sent = self.uplink.ask(windows[i])
            asked.append((i, future, sent))
        deadline = time.monotonic() + (self.uplink.forward.deadline_s if self.uplink else 0.0)
        for i, future, sent in asked:
            assert self.uplink is not None
            try:
                reply: Optional[OffloadReply] = future.result(max(0.0, deadline - time.monotonic()))
            except Exception:  # the deadline passed: the gateway's own answer stands
                reply = None
                self.uplink.forget(future)
            if reply is None:
                answers[i].tier = "gateway-fallback"
                continue
            answers[i].tier = "cloud"
            answers[i].prediction = int(reply.prediction)
            answers[i].logits = np.asarray(reply.logits, dtype=np.float32)
            answers[i].cloud_ms = float(reply.cloud_ms)
            answers[i].cloud_j = reply.cloud_j
            answers[i].forward_ms = (time.monotonic() - sent) * 1000.0
        return answers

    def reply(self, request: OffloadRequest, answers: List[GatewayAnswer], i: int, served: Served) -> bytes:
        answer = answers[i]
        extra = dict(
            served.extra,
            tier=answer.tier,
            p_gateway=round(answer.p_gateway, 6),
            gateway_ms=round(answer.gateway_ms, 4),
            gateway_j=answer.gateway_j,
        )
        if answer.cloud_ms is not None:
            extra.update(cloud_ms=round(answer.cloud_ms, 4), forward_ms=round(answer.forward_ms or 0.0, 3))
            extra.update(cloud_j=answer.cloud_j)
        return encode_reply(
            OffloadReply(
                run_id=request.run_id,
                device_id=request.device_id,
                seq=request.seq,
                prediction=answer.prediction,
                logits=answer.logits,
                cloud_ms=served.cloud_ms,
                worker_id=served.worker_id,
                cloud_j=served.cloud_j,
                energy_source=served.energy_source,
                extra=extra,
            )
        )

    def close(self) -> None:
        if self.uplink is not None:
            self.uplink.close()
