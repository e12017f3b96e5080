"""The cloud worker: shared-subscription consumer of offloads, micro-batched onnxruntime, MQTT 5 replies.

One thread does everything on the request path: it reads every offload the socket holds (paho's
`on_message` checks each one, `requests.parse_offload`, and queues it), decides whether a micro-batch is due
(`batching`), runs the task (`tasks`), and publishes one reply per request to its ResponseTopic with its
CorrelationData (QoS 1) before acknowledging the request. paho is driven by hand (`loop`/`loop_read`, not
`loop_start`), so a reply is written to the socket by the call that publishes it: no thread hand-off, and so
no context switch, on the request path (bench/offload_bench.py measures the overhead). While a batch
computes, new offloads wait in the socket and form the next batch; a batch must therefore finish well within
the keepalive (15 s by default).

Sessions are clean (session expiry 0) on purpose. Mosquitto 2.0 round-robins a shared subscription over every
session in the group, connected or not: a crashed worker with a persistent session would keep being handed
a share of the offloads, to be delivered only if it ever came back. With a clean session the dead worker
leaves the group the moment its socket closes and the survivors get everything published after that; the
few requests that were in flight to it are lost with its session (Mosquitto 2.0 does not re-dispatch them
to the group), which the requester covers with its per-offload deadline (re-send, or fall back to the edge
answer). Measured on Mosquitto 2.0.11: see tests/test_cloud_worker_failover.py.

One device must not be able to starve the others (tests/test_cloud_worker_limits.py, bench/flood.py): QoS 0
offloads are refused unread (they bypass Receive Maximum); the queue is bounded and shared fairly between
devices (`batching`), what a device sends beyond its share being acknowledged and dropped at once; every
offload has a deadline, at most `max_expiry_s`, also one that carries no MessageExpiryInterval. Each refusal
is counted in `stats` by reason.

Connecting: a refused login that cannot heal (`protocol.mqtt.permanent_connack_refusal`) or a refused cloud
subscription stops the worker with `LoginRefused`; every other failure is retried with exponential backoff
(0.5 s doubling to 8 s), also when the broker accepts the TCP connection and drops it before a CONNACK.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import select
import ssl
import threading
import time
from typing import Any, Dict, List, Optional

import numpy as np
import paho.mqtt.client as mqtt

from cloud_worker.batching import BatchQueue, Pending
from cloud_worker.config import BACKOFF_MAX_S, BACKOFF_MIN_S, LoginRefused, WorkerConfig
from cloud_worker.energy import BatchEnergy
from cloud_worker.requests import HEADER_SLACK_BYTES, Job, parse_offload
from cloud_worker.tasks import Served, make_task
from edgecascade.systemd import Watchdog
from protocol.codec import ProtocolError
from protocol.mqtt import PublishProperties, connect_properties, new_client, permanent_connack_refusal

logger = logging.getLogger(__name__)

STAT_KEYS = (
    "received",
    "answered",
    "rejected",  # malformed or not addressed properly (ProtocolError)
    "expired",  # its deadline passed before the batch ran
    "refused_qos0",  # sent at QoS 0: not read any further
    "refused_over_share",  # its device already had its fair share of the queue
    "refused_queue_full",  # the queue was at its bound
    "failed",
    "batches",
    "reply_refused",
)


class CloudWorker:
    """One worker of the shared group. `start()`, then `stats`, then `stop()`; any number may run."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.task = make_task(config.task, config.model_path, config.providers, config.threads)
        self.task.warm_up(sorted({1, config.max_batch}))
        self.max_payload_bytes = self.task.sample_bytes + HEADER_SLACK_BYTES
        self._energy = BatchEnergy(config.meters, config.meter_options, config.idle_seconds)
        self.receive_maximum = config.receive_maximum_or_default()
        self.max_queue = config.queue_bound(self.max_payload_bytes)
        self._queue: BatchQueue[Job] = BatchQueue(
            config.max_batch, config.max_wait_ms / 1000.0, max_items=self.max_queue
        )
        self._stats: Dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._batched_samples = 0
        self._stats_lock = threading.Lock()
        self._generation = 0
        self._subscribed = threading.Event()
        self._stop = threading.Event()
        self._drain_s = 2.0
        # Set while a batch computes: offloads that arrive then wait unread in the socket, so their expiry
        # clock is started (conservatively) at the batch's start rather than when they are finally read.
        self._blind_since: Optional[float] = None
        self._thread: Optional[threading.Thread] = None
        self.fatal: Optional[str] = None  # why the broker will never let this worker in (LoginRefused)
        self._connack_ok = False  # the current connection got a successful CONNACK
        self.subscription = config.topics.cloud_subscription(config.group, self.task.topic_kind)
        self.client_id = f"cloud-{config.worker_id}-{os.getpid()}"
        self._client = new_client(config.broker, self.client_id, on_connect=self._on_connect, manual_ack=True)
        self._client.on_message = self._on_message
        self._client.on_subscribe = self._on_subscribe
        self._client.on_disconnect = self._on_disconnect
        self._client.on_publish = self._on_publish
        self.watchdog = Watchdog(healthy=self._client.is_connected)

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> CloudWorker:
        """Connect, subscribe to the group and serve; returns once subscribed (TimeoutError otherwise).

        The worker keeps (re)connecting in the background with backoff, so a broker that is not up yet
        only delays readiness."""
        self._thread = threading.Thread(target=self._run, name=f"worker-{self.client_id}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._subscribed.wait(0.05):
            if self.fatal is not None:
                self.stop(drain_s=0)
                raise LoginRefused(self.fatal)
            if time.monotonic() < deadline:
                continue
            self.stop(drain_s=0)
            raise TimeoutError(
                f"cloud worker {self.config.worker_id} not subscribed at "
                f"{self.config.broker.host}:{self.config.broker.port} within {timeout_s}s"
            )
        # Everything loaded so far (onnxruntime, numpy, the model) lives as long as the process: keep it out
        # of the garbage collector's full passes, which otherwise scan it and stall a reply now and then.
        gc.freeze()
        self.watchdog.ready(f"serving {self.subscription}")
        logger.info(
            "worker %s serving %s with %s on %s (max batch %d, max wait %.1f ms)",
            self.config.worker_id,
            self.subscription,
            self.task.path,
            self.config.providers,
            self.config.max_batch,
            self.config.max_wait_ms,
        )
        return self

    def stop(self, drain_s: float = 2.0) -> None:
        """Leave the group, answer what is already queued (at most `drain_s`), then disconnect."""
        self.watchdog.stopping()
        self._drain_s = drain_s
        self._stop.set()
        if self._thread is not None:
            self._thread.join(drain_s + 10.0)
            self._thread = None
        self._energy.close()

    @property
    def running(self) -> bool:
        """True while the worker thread is alive (it stops only on `stop()` or on a bug, logged)."""
        return self._thread is not None and self._thread.is_alive()

    def __enter__(self) -> CloudWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters since start (STAT_KEYS: received, answered, the reasons for not answering, batches ...),
        mean_batch and queued."""
        with self._stats_lock:
            out: Dict[str, Any] = dict(self._stats)
            out["mean_batch"] = self._batched_samples / out["batches"] if out["batches"] else 0.0
        out["queued"] = len(self._queue)
        return out

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    # -- the worker thread -------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_until_stopped()
        except Exception:  # a bug here must be loud; systemd's watchdog restarts the service
            logger.exception("worker %s crashed", self.config.worker_id)
        finally:
            self._subscribed.clear()
            try:
                self._client.disconnect()
            except Exception:
                logger.debug("disconnect after stop failed", exc_info=True)

    def _connect(self, first: bool) -> bool:
        props = connect_properties(0)  # clean session: see the module docstring
        props.ReceiveMaximum = self.receive_maximum
        self._connack_ok = False
        try:
            if first:
                self._client.connect(
                    self.config.broker.host,
                    self.config.broker.port,
                    keepalive=self.config.keepalive_s,
                    clean_start=True,
                    properties=props,
                )
            else:
                self._client.reconnect()
            return True
        except (OSError, ssl.SSLError) as exc:
            logger.warning(
                "worker %s cannot reach %s:%d: %s",
                self.config.worker_id,
                self.config.broker.host,
                self.config.broker.port,
                exc,
            )
            return False

    def _serve_until_stopped(self) -> None:
        connected, first, backoff_s = False, True, BACKOFF_MIN_S
        stop_deadline: Optional[float] = None
        while True:
            self.watchdog.beat()
            now = time.monotonic()
            if self.fatal is not None:
                logger.error("worker %s stops: %s", self.config.worker_id, self.fatal)
                return
            if self._stop.is_set() and stop_deadline is None:
                stop_deadline = now + self._drain_s
                if connected:
                    self._client.unsubscribe(self.subscription)
            if stop_deadline is not None and (now >= stop_deadline or not len(self._queue)):
                return
            if not connected:
                connected = self._connect(first)
                if connected:
                    first = False
                else:
                    self._stop.wait(backoff_s)
                    backoff_s = min(2 * backoff_s, BACKOFF_MAX_S)
                    continue
            wait = self._queue.wait_s(now)
            rc: int = self._client.loop(timeout=0.25 if wait is None else min(wait, 0.25))
            if rc == mqtt.MQTT_ERR_SUCCESS:
                rc = self._read_all()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                connected = False
                self._subscribed.clear()
                if self.fatal is not None:
                    continue
                if self._connack_ok:  # a connection that worked: reconnect at once, backoff from the start
                    backoff_s = BACKOFF_MIN_S
                else:  # refused or dropped before CONNACK: the same would happen again right away
                    self._stop.wait(backoff_s)
                    backoff_s = min(2 * backoff_s, BACKOFF_MAX_S)
                if not self._stop.is_set():
                    logger.warning("worker %s lost the broker (%s); reconnecting", self.config.worker_id, rc)
            if self._queue.wait_s(time.monotonic()) == 0:
                self._blind_since = time.monotonic()
                self._serve(self._queue.take())

    def _read_all(self) -> int:
        """Read every packet already in the socket (bounded), so that the batching rule sees them all."""
        sock = self._client.socket()
        for _ in range(4 * self.receive_maximum):
            if sock is None:
                return mqtt.MQTT_ERR_NO_CONN
            buffered = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            if not buffered and not select.select([sock], [], [], 0)[0]:
                self._blind_since = None
                break
            rc = self._client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return rc
            sock = self._client.socket()
        return mqtt.MQTT_ERR_SUCCESS

    # -- MQTT callbacks (run inside loop/loop_read, on the worker thread) ---------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            why = permanent_connack_refusal(reason)
            if why is not None:
                self.fatal = (
                    f"the broker at {self.config.broker.host}:{self.config.broker.port} refused the login as "
                    f"{self.config.broker.username!r} with client id {self.client_id!r}: {why}"
                )
            return  # new_client logged it; otherwise the worker thread retries with backoff
        self._connack_ok = True
        self._generation += 1
        # Clean session: the subscription must be made again on every connection.
        client.subscribe(self.subscription, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if reasons and all(not r.is_failure for r in reasons):
            self._subscribed.set()
        else:
            # Only the cloud role may join the group: another account's subscription never succeeds.
            user = self.config.broker.username
            self.fatal = (
                f"the broker refused the subscription {self.subscription} to {user!r}: "
                f"{', '.join(str(r) for r in reasons or [])} (is it a cloud account?)"
            )

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self._subscribed.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if reason is not None and reason.is_failure:
            self._count("reply_refused")
            logger.warning("broker refused a reply (mid %d): %s", mid, reason)

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._count("received")
        if message.qos == 0:  # first and cheapest: a QoS 0 flood must cost as little as possible
            self._count("refused_qos0")
            return
        try:
            received = self._blind_since if self._blind_since is not None else time.monotonic()
            job = parse_offload(
                message,
                self.config.topics,
                self.task.input_shape,
                self.max_payload_bytes,
                self.config.max_expiry_s,
                received,
                self._generation,
            )
        except ProtocolError as exc:
            self._count("rejected")
            logger.warning("rejected offload on %s: %s", message.topic, exc)
            self._ack(message.mid, message.qos, self._generation)
            return
        shed = self._queue.put(job, time.monotonic(), key=job.request.device_id)
        if shed is not None:
            # Acknowledged without an answer: the requester falls back at its deadline, and the broker may
            # send us the next offload, which may be another device's.
            self._count(f"refused_{shed.reason}")
            dropped = shed.pending.item
            self._ack(dropped.mid, dropped.qos, dropped.generation)

    def _ack(self, mid: int, qos: int, generation: int) -> None:
        # A PUBACK for a message of an earlier connection would name a packet id the broker never sent here.
        if qos > 0 and generation == self._generation:
            self._client.ack(mid, qos)

    # -- serving ---------------------------------------------------------------------------------
    def _serve(self, batch: List[Pending[Job]]) -> None:
        now = time.monotonic()
        live: List[Pending[Job]] = []
        for pending in batch:
            job = pending.item
            if now >= job.deadline:
                self._count("expired")
                logger.info("dropped expired offload %s/%d", job.request.device_id, job.request.seq)
                self._ack(job.mid, job.qos, job.generation)
            else:
                live.append(pending)
        if not live:
            return
        images = np.stack([p.item.request.tensor for p in live])
        try:
            outputs, seconds, joules = self._energy.run(lambda: self.task.run(images), len(live))
        except Exception:
            logger.exception("cloud model failed on a batch of %d; requesters will fall back", len(live))
            self._count("failed", len(live))
            for p in live:
                self._ack(p.item.mid, p.item.qos, p.item.generation)
            return
        self._queue.note_compute(seconds, len(live))
        cloud_ms = seconds * 1000.0 / len(live)
        # Counted before the replies leave, so that whoever holds a reply also sees it in `stats`.
        with self._stats_lock:
            self._stats["answered"] += len(live)
            self._stats["batches"] += 1
            self._batched_samples += len(live)
        for i, pending in enumerate(live):
            job = pending.item
            served = Served(
                cloud_ms=cloud_ms,
                worker_id=self.config.worker_id,
                cloud_j=None if joules is None else joules[i],
                energy_source=self._energy.source if joules is not None else "none",
                extra={"batch": len(live), "queue_ms": round((now - pending.arrived) * 1000.0, 3)},
            )
            # The answer is worth no more than the question.
            expiry_s = max(1, math.ceil(job.deadline - time.monotonic()))
            props = PublishProperties(
                content_type=self.task.reply_content_type, correlation_data=job.correlation, expiry_s=expiry_s
            )
            self._client.publish(
                job.reply_topic, self.task.reply(job.request, outputs, i, served), qos=1, properties=props
            )
            self._ack(job.mid, job.qos, job.generation)
