"""The sensor agent of the fault hierarchy: vibration windows on the sensor's clock, the tiny model, the rule,
and the windows it is unsure of sent up (to the gateway, or straight to the cloud).

For every window, paced at the sensor's real rate (one window per `window / sample_rate` seconds): the sensor
tier's model (onnxruntime), then its rule (`rules`: HI or the two-threshold rule; `none`: never offload,
`all`: always). An unsure window goes as an offload (protocol.codec, the raw int16 counts, MQTT 5 QoS 1,
ResponseTopic + CorrelationData, an expiry) on the device's `gateway` topic, answered by a gateway worker
(`cloud_worker.gateway`), which answers itself or asks the cloud; or on its `offload` topic, answered by a
cloud worker. The answer names the tier that decided (`extra["tier"]`). Every window ends as one `inference`
record through the outbox, like the classification agent's (`device_agent.session`): exit stage `main` (the
sensor decided), `gateway`, `cloud`, or `fallback` (no answer within the deadline: the sensor's own answer);
p_main / p_gateway / p_cloud the sensor's / gateway's / cloud's max-softmax; edge_ms the sensor's compute,
gateway_ms / gateway_j the gateway's (its model time, its analytic joules), cloud_ms / cloud_j the cloud's,
network_ms the rest of the round trip; device_j_analytic the sensor's compute joules (`metering.analytic`: a
microcontroller has no RAPL counter).

Offloads are not kept in the outbox: an answer later than the deadline is worth nothing (the machine is
already in its next state); the sensor's answer stands (`fallback`) and the next window goes on.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from device_agent.keys import correlation, entry_key
from device_agent.runs import run_record
from device_agent.session import RunSession
from device_agent.sink import Finished
from metering.analytic import AnalyticModel
from protocol import CONTENT_TYPE_OFFLOAD, InferenceRecord, OffloadRequest, ProtocolError, encode_offload
from protocol.codec import decode_reply, is_refusal
from protocol.ids import check_device_id, check_run_id
from protocol.mqtt import BrokerAddress, publish_properties
from protocol.records import RunEndRecord
from protocol.topics import Topics
from vibration.card import FaultCard, load_fault_card
from vibration.rules import FixedRule, HiRule, TierDecision, TwoThresholdRule

logger = logging.getLogger(__name__)

RULES = ("none", "all", "hi", "two-threshold")
UPLINKS = ("gateway", "cloud")


@dataclass(frozen=True)
class SensorConfig:
    """Everything a `SensorAgent` needs; validated when built. Thresholds default to the card's."""

    device_id: str
    broker: BrokerAddress
    topics: Topics = field(default_factory=Topics)
    model_dir: Path = Path("models/vibration")
    state_dir: Path = Path("state")
    run_id: Optional[str] = None
    rule: str = "hi"
    theta: Optional[float] = None  # hi
    thresholds: Optional[Tuple[float, float]] = None  # two-threshold (low, high)
    uplink: str = "gateway"  # where unsure windows go
    deadline_s: float = 1.0
    realtime: bool = True  # pace windows at the sensor's sampling rate (False: as fast as they come)
    threads: int = 1
    results_batch: int = 100
    flush_s: float = 0.2
    results_receipts: bool = True
    receipt_timeout_s: float = 30.0
    session_expiry_s: int = 3600
    connect_timeout_s: float = 10.0
    close_timeout_s: float = 30.0
    outbox_wait_s: Optional[float] = 300.0
    outbox_max_entries: int = 200_000
    outbox_max_bytes: int = 256 * 1024 * 1024
    dataset: str = "vibration-sim"
    split: str = "test"
    profile: str = "sensor"

    def __post_init__(self) -> None:
        object.__setattr__(self, "model_dir", Path(self.model_dir))
        object.__setattr__(self, "state_dir", Path(self.state_dir))
        check_device_id(self.device_id)
        if self.run_id is not None:
            check_run_id(self.run_id)
        if self.rule not in RULES:
            raise ValueError(f"rule must be one of {', '.join(RULES)}, got {self.rule!r}")
        if self.uplink not in UPLINKS:
            raise ValueError(f"uplink must be one of {', '.join(UPLINKS)}, got {self.uplink!r}")
        if not (self.deadline_s > 0 and math.isfinite(self.deadline_s)):
            raise ValueError(f"deadline_s must be a positive number of seconds, got {self.deadline_s!r}")


@dataclass
class SensorSummary:
    run_id: str
    windows: int = 0
    rejected: int = 0  # not the card's shape and dtype
    offloaded: int = 0
    answered: int = 0
    fallbacks: int = 0  # no answer within the deadline (or refused, or not connected)
    bad_replies: int = 0
    behind_s: float = 0.0  # the most the loop ran behind the sensor's clock
    seconds: float = 0.0
    exits: Dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        return dict(vars(self))


@dataclass
class _Pending:
    record: Dict[str, Any]
    sent_mono: float
    due_mono: float


def make_rule(config: SensorConfig, card: FaultCard) -> Any:
    """The sensor's rule: an object with `decide(probs) -> TierDecision`."""
    if config.rule == "hi":
        return HiRule(card.hi_theta("sensor") if config.theta is None else config.theta)
    if config.rule == "two-threshold":
        low, high = card.two_thresholds("sensor") if config.thresholds is None else config.thresholds
        return TwoThresholdRule(low, high)
    return FixedRule(offload=config.rule == "all")


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64).reshape(-1)
    e = np.exp(z - z.max())
    return e / e.sum()


class SensorAgent:
    """`SensorAgent(SensorConfig(...)).start()`, `run(windows)`, `close()`."""

    def __init__(self, config: SensorConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.session = RunSession(config)
        self.run_id = self.session.run_id
        self.summary = SensorSummary(self.run_id)
        self._lock = threading.Lock()
        self._pending: Dict[bytes, _Pending] = {}
        self._closed = False

    def start(self) -> SensorAgent:
        import onnxruntime as ort

        cfg = self.config
        self.card = load_fault_card(cfg.model_dir)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = cfg.threads
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.model = ort.InferenceSession(
            str(self.card.verify("sensor")), sess_options=opts, providers=["CPUExecutionProvider"]
        )
        self.input_name = self.model.get_inputs()[0].name
        self.input_shape = tuple(self.card.input_shape)
        self.input_dtype = np.dtype(self.card.input_dtype)
        self.rule = make_rule(cfg, self.card)
        self.sensor_j = AnalyticModel.for_card(self.card.raw).block_j("sensor")
        self.model_version = self.card.tiers["sensor"].sha256[:12]
        self.session.open(self._on_reply, tick_s=0.05)
        if self.session.has_run_before():
            raise ValueError(
                f"run id {self.run_id!r} has run on this device before: a sensor run is not resumed"
            )
        self.link, self.sink = self.session.link, self.session.sink
        self._seq = self.session.counter("sample")
        self.link.hooks.append(lambda connected: self.sink.flush(block=False))
        try:
            self.session.connect(
                lambda: run_record(
                    cfg,
                    self.run_id,
                    policy=f"{cfg.rule}->{cfg.uplink}",
                    params=self._params(),
                    meter="analytic",
                    providers=self.model.get_providers(),
                    task="fault-detection",
                ).to_map()
            )
        except BaseException:
            self.session.close()
            raise
        return self

    def _params(self) -> Dict[str, Any]:
        rule = self.rule
        out: Dict[str, Any] = {"rule": self.config.rule, "uplink": self.config.uplink}
        if isinstance(rule, HiRule):
            out["theta"] = rule.theta
        if isinstance(rule, TwoThresholdRule):
            out.update(low=rule.low, high=rule.high)
        return out

    def check(self, window: np.ndarray) -> Optional[str]:
        """Why `window` cannot be classified, or None (the card's shape and dtype)."""
        if window.dtype == self.input_dtype and tuple(window.shape) == self.input_shape:
            return None
        want = f"{self.input_dtype} {list(self.input_shape)}"
        return f"window must be {want}, got {window.dtype} {list(window.shape)}"

    def run(
        self, windows: Iterable[Tuple[np.ndarray, Optional[int]]], stop: Optional[threading.Event] = None
    ) -> SensorSummary:
        """Every (window, label) through the sensor, paced at its sampling rate; then the last answers."""
        stop = stop or threading.Event()
        period = self.card.window_s if self.config.realtime else 0.0
        started = time.monotonic()
        for index, (window, label) in enumerate(windows):
            if stop.is_set():
                break
            due = started + index * period
            wait = due - time.monotonic()
            if wait > 0:
                stop.wait(wait)
            else:
                self.summary.behind_s = max(self.summary.behind_s, -wait)
            arr = np.asarray(window)
            problem = self.check(arr)
            if problem is not None:  # counted and logged; the next window goes on
                self.summary.rejected += 1
                logger.warning("rejected window %d: %s", index, problem)
                continue
            self._window(np.ascontiguousarray(arr), label)
            self._expire(time.monotonic())
        deadline = time.monotonic() + self.config.deadline_s
        while self._pending and time.monotonic() < deadline:
            stop.wait(0.01)
        self._expire(math.inf)
        self.summary.seconds = time.monotonic() - started
        self.sink.flush(block=True)
        return self.summary

    def _window(self, window: np.ndarray, label: Optional[int]) -> None:
        t0 = time.perf_counter()
        if self.config.rule == "all":  # everything goes up: the sensor computes nothing (no answer: -1)
            decision = TierDecision(True, -1, 0.0, 0.0)
        else:
            (logits,) = self.model.run(["logits"], {self.input_name: window[None]})
            decision = self.rule.decide(softmax(logits[0]))
        edge_ms = (time.perf_counter() - t0) * 1000.0
        seq = self._seq.take()
        self.summary.windows += 1
        record = InferenceRecord(
            run_id=self.run_id,
            device_id=self.device_id,
            seq=seq,
            prediction=decision.prediction,
            exit_stage="main",
            edge_ms=edge_ms,
            label=label,
            p_main=None if self.config.rule == "all" else decision.confidence,
            device_j_analytic=0.0 if self.config.rule == "all" else self.sensor_j,
            energy_source="analytic",
            ts_unix=time.time(),
            model_version=self.model_version,
        ).to_map()
        if decision.offload and self._offload(seq, window, record):
            return
        if decision.offload:
            record["exit_stage"] = "fallback"  # not connected: the sensor's answer, now
        self._finish(record)

    def _offload(self, seq: int, window: np.ndarray, record: Dict[str, Any]) -> bool:
        cfg = self.config
        payload = encode_offload(OffloadRequest(self.run_id, self.device_id, seq, window, time.time_ns()))
        corr = correlation(self.run_id, seq)
        props = publish_properties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=cfg.topics.reply(self.device_id),
            correlation_data=corr,
            expiry_s=max(1, math.ceil(cfg.deadline_s)),
        )
        topic = (
            cfg.topics.gateway(self.device_id)
            if cfg.uplink == "gateway"
            else cfg.topics.offload(self.device_id)
        )
        now = time.monotonic()
        record["bytes_up"] = len(payload)
        with self._lock:
            self._pending[corr] = _Pending(record, now, now + cfg.deadline_s)
        if self.link.publish(topic, payload, props) is None:
            with self._lock:
                self._pending.pop(corr, None)
            return False
        self.summary.offloaded += 1
        return True

    def _on_reply(self, corr: Optional[bytes], payload: bytes) -> None:
        """An answer (paho's thread): the record completed and finished; a refusal: the sensor's answer."""
        if is_refusal(payload):
            with self._lock:
                pending = self._pending.get(corr or b"")
                if pending is not None:
                    pending.due_mono = 0.0  # `_expire` takes it on the next turn
            return
        try:
            reply = decode_reply(payload)
        except ProtocolError as exc:
            self.summary.bad_replies += 1
            logger.warning("bad reply: %s", exc)
            return
        with self._lock:
            pending = self._pending.pop(corr or b"", None)
        if pending is None:
            return  # after its deadline: the sensor's answer was recorded
        self.summary.answered += 1
        record = pending.record
        extra = reply.extra if isinstance(reply.extra, dict) else {}
        probs = softmax(reply.logits)
        if "tier" in extra:  # a gateway's answer: its own figures and, when it asked, the cloud's
            tier = extra["tier"]
            gateway_ms, gateway_j = _number(extra.get("gateway_ms")), _number(extra.get("gateway_j"))
            cloud_ms, cloud_j = _number(extra.get("cloud_ms")), _number(extra.get("cloud_j"))
            p_gateway = _number(extra.get("p_gateway"))
        else:  # a cloud worker's
            tier, gateway_ms, gateway_j, p_gateway = "cloud", None, None, None
            cloud_ms, cloud_j = float(reply.cloud_ms), reply.cloud_j
        remote_ms = (gateway_ms or 0.0) + (cloud_ms or 0.0)
        record.update(
            prediction=int(reply.prediction),
            exit_stage=tier if tier in ("gateway", "cloud") else "fallback",
            p_gateway=p_gateway,
            p_cloud=float(probs.max()) if tier == "cloud" else None,
            gateway_ms=gateway_ms,
            gateway_j=gateway_j,
            cloud_ms=cloud_ms,
            network_ms=max(0.0, (time.monotonic() - pending.sent_mono) * 1000.0 - remote_ms),
            bytes_down=len(payload),
            cloud_j=cloud_j,
        )
        self._finish(record)

    def _expire(self, now: float) -> None:
        with self._lock:
            late = [corr for corr, p in self._pending.items() if p.due_mono <= now]
            records = [self._pending.pop(corr).record for corr in late]
        for record in records:
            record["exit_stage"] = "fallback"
            self._finish(record)

    def _finish(self, record: Dict[str, Any]) -> None:
        stage = record["exit_stage"]
        with self._lock:
            self.summary.exits[stage] = self.summary.exits.get(stage, 0) + 1
            if stage == "fallback":
                self.summary.fallbacks += 1
        key = entry_key("inference", self.run_id, self.device_id, record["seq"])
        self.sink.add(Finished(key, record, counted=True))

    def close(self) -> SensorSummary:
        """Records to the outbox, `run_end`, the outbox drained (bounded); closed even when that fails."""
        if self._closed:
            return self.summary
        self._closed = True
        try:
            self.session.finish(
                lambda count: RunEndRecord(self.run_id, self.device_id, time.time(), count).to_map()
            )
        finally:
            self.session.close()
        return self.summary

    def __enter__(self) -> SensorAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _number(value: Any) -> Optional[float]:
    """A finite number from a reply's `extra`, else None (the record refuses NaN and other types)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def window_stream(x: np.ndarray, y: Optional[np.ndarray] = None) -> List[Tuple[np.ndarray, Optional[int]]]:
    """(window, label) pairs of a split's arrays."""
    return [(x[i], None if y is None else int(y[i])) for i in range(len(x))]
