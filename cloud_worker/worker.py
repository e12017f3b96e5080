"""The cloud worker: shared-subscription consumer of offloads, micro-batched onnxruntime, MQTT 5 replies.

A network thread and one compute thread per stream. The network thread (`link`) owns the MQTT connection:
it reads each offload the moment it arrives, also while batches compute, checks it
(`requests.parse_offload`) and queues it (`batching`). A compute thread takes a batch when the batching
rule lets one go, runs the task (`tasks`) and publishes one reply per request (to its ResponseTopic with
its CorrelationData, QoS 1, then acknowledges the request), itself when the network thread is waiting for
traffic, else through the network thread (`link`: paho is entered by one thread at a time).

Why not one thread that does everything (as until 2026-12): offloads that arrived during a batch waited
unread in the socket, so their queueing showed as "transport", the queue depth was unknown (the published
load needs it), and the next batch started only after they were read and checked. onnxruntime releases the
GIL, so reading during a batch costs it little (bench/worker_throughput.py --threads 1: 93-96 % of bare
onnxruntime, 94-98 % before). That alone does not make offloads wait less where the worker is nearly
saturated; a second stream does. bench/offload_bench.py, 500 offloads/s, trained cloud model, 2-core VM
(cloud model at batch 1: 1.5 ms, 2 intra-op threads), 2026-12-02, offload overhead p50 / p99 in ms:

    one thread (before)                      1.60-2.23 / 3.3-5.2   worker ~95 % busy: queueing dominates
    network thread + 1 stream (default)      0.91-1.99 / 3.0-4.4   bimodal: at 95 % busy a burst lingers
    --streams 2 --threads 1                  1.00-1.09 / 4.1-4.3   streams ~60 % busy; queue p50 0.14
    do-nothing responder (--floor)           0.41-0.42 / 0.8

With two streams what remains is transport (p50 0.8-0.9 ms against the floor's 0.4: the worker's own
read, check and reply on two cores its batches also use); compute thread and network thread share those
cores. Replies written by the compute thread itself, not handed to the network thread, cut 0.3 ms off that
(p50 1.39-1.48 when every reply was handed over). Streams beyond one share the cores and the model
session, so give each one intra-op thread (the default with several streams); metering needs one stream.

One device must not be able to starve the others (tests/test_cloud_worker_limits.py, bench/flood.py): QoS 0
offloads are refused unread (they bypass Receive Maximum); the queue is bounded and shared fairly between
devices (`batching`), what a device sends beyond its share being refused at once; every offload has a
deadline, at most `max_expiry_s`, also one that carries no MessageExpiryInterval. An offload whose predicted
wait (queue / measured capacity) would come too close to its deadline is refused too (`REFUSE_ABOVE`). A
refusal is acknowledged and answered at once with an `OffloadRefusal` on the device's reply topic, so that
the device answers at the edge now rather than after waiting out its deadline; each is counted in `stats`
by reason.

The worker's load (queue depth, service time, capacity, busy fraction: `load`) is published retained on
`Topics.cloud_load(worker_id)` for devices to plan on (`protocol.load`), and its busy totals are in `stats`.
Connecting, clean sessions and the will: see `link`.
"""

from __future__ import annotations

import gc
import logging
import math
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import paho.mqtt.client as mqtt

from cloud_worker.batching import BatchQueue, Pending
from cloud_worker.config import LoginRefused, WorkerConfig
from cloud_worker.energy import BatchEnergy
from cloud_worker.link import WorkerLink
from cloud_worker.load import LoadMeter
from cloud_worker.requests import HEADER_SLACK_BYTES, Job, parse_offload
from cloud_worker.tasks import Served, make_task
from edgecascade.osthread import name_os_thread
from edgecascade.systemd import Watchdog
from protocol.codec import CONTENT_TYPE_REFUSAL, OffloadRefusal, ProtocolError, encode_refusal
from protocol.load import WorkerLoad, encode_load
from protocol.mqtt import PublishProperties

__all__ = ["CloudWorker", "LoginRefused", "WorkerConfig"]

logger = logging.getLogger(__name__)

STAT_KEYS = (
    "received",
    "answered",
    "rejected",  # malformed or not addressed properly (ProtocolError)
    "expired",  # its deadline passed before the batch ran
    "refused_qos0",  # sent at QoS 0: not read any further
    "refused_busy",  # its wait in the queue would have come too close to its deadline
    "refused_over_share",  # its device already had its fair share of the queue
    "refused_queue_full",  # the queue was at its bound
    "failed",
    "batches",
)
# An offload whose predicted wait here exceeds this fraction of the time its deadline leaves is refused at
# once (`OffloadRefusal`, reason busy): answered now at the edge rather than at the deadline. A quarter (the
# devices' shed bound, `device_agent.capacity.SHED_ABOVE`, is the same fraction) leaves the batch in progress
# and both transits well inside the devices' re-send at half the deadline, which would double the work.
REFUSE_ABOVE = 0.25
# A batch is answered only when all of it is done: it may take at most this share of the time left to its most
# urgent request's deadline (at the measured compute time per sample), or the batch itself is a wait that no
# refusal foresaw. On a fast worker max_batch binds (2.5 ms a sample: 80 fit in 200 ms); on a slow one
# (60 ms a sample, the fleet simulation's quota) batches of 3 instead of 7, for ~25 % less per sample.
BATCH_SHARE = 0.1
# A compute thread that has not come round for this long is stuck in a batch: the watchdog stops pinging.
STUCK_S = 60.0
IDLE_WAIT_S = 0.25
COMPUTE_THREAD = "ec-compute"  # the OS name of compute stream k is this + k


@dataclass(frozen=True)
class BatchServed:
    """One batch answered, for `CloudWorker.observers` (the metrics: `cloud_worker.metrics`)."""

    samples: int
    seconds: float  # the batch's compute
    queue_waits_s: List[float]  # each sample's wait in the queue, arrival to the batch's start
    joules: Optional[List[float]]  # each sample's, when a meter was read
    energy_source: str
    requests: List[Any] = field(default_factory=list)  # what was answered (`cloud_worker.keep` keeps them)
    outputs: Any = None  # the task's outputs for the batch (a classifier's logits [N, C])


class CloudWorker:
    """One worker of the shared group. `start()`, then `stats`, then `stop()`; any number may run."""

    def __init__(self, config: WorkerConfig, task: Any = None) -> None:
        """`task`: one built by the caller (a `gateway.Gateway`, which needs more than a model path), else
        `config.task` is made here."""
        self.config = config
        self.task = task or make_task(
            config.task, config.model_path, config.providers, config.intra_op_threads()
        )
        self.task.warm_up(sorted({1, config.max_batch}))
        self.max_payload_bytes = self.task.sample_bytes + HEADER_SLACK_BYTES
        self._energy = BatchEnergy(config.meters, config.meter_options, config.idle_seconds)
        self.receive_maximum = config.receive_maximum_or_default()
        self.max_queue = config.queue_bound(self.max_payload_bytes)
        self._queue: BatchQueue[Job] = BatchQueue(
            config.max_batch, config.max_wait_ms / 1000.0, max_items=self.max_queue
        )
        self._ready = threading.Condition()  # guards the queue; notified on every arrival and on stop
        self._load = LoadMeter(config.streams)
        self._load.seed(self._time_one_sample(), 1)
        self._stats: Dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._batched_samples = 0
        self._stats_lock = threading.Lock()
        self._stopping = threading.Event()
        self._drain_deadline = math.inf
        self._compute_beats = [time.monotonic()] * config.streams
        self._compute: List[threading.Thread] = []
        self.subscription = config.topics.cloud_subscription(config.group, self.task.topic_kind)
        self.client_id = f"cloud-{config.worker_id}-{os.getpid()}"
        self.watchdog = Watchdog(healthy=self._healthy)
        self.link = WorkerLink(
            config,
            self.client_id,
            self.subscription,
            self.receive_maximum,
            on_offload=self._on_offload,
            load_payload=lambda: encode_load(self.load()),
            beat=self.watchdog.beat,
        )
        self._subscribed = self.link.subscribed  # set while subscribed to the group
        self.observers: List[Callable[[BatchServed], None]] = []  # told of each batch, after its replies

    def _time_one_sample(self) -> float:
        images = np.zeros((1, *self.task.input_shape), dtype=self.task.input_dtype)
        start = time.perf_counter()
        self.task.run(images)
        return time.perf_counter() - start

    # -- lifecycle ---------------------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> CloudWorker:
        """Connect, subscribe to the group and serve; returns once subscribed (TimeoutError otherwise).

        The worker keeps (re)connecting in the background with backoff, so a broker that is not up yet
        only delays readiness."""
        self._compute = [
            threading.Thread(
                target=self._compute_loop, args=(k,), name=f"compute{k}-{self.client_id}", daemon=True
            )
            for k in range(self.config.streams)
        ]
        for thread in self._compute:
            thread.start()
        self.link.start()
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
            "worker %s serving %s with %s on %s (max batch %d, max wait %.1f ms, load every %.2f s)",
            self.config.worker_id,
            self.subscription,
            self.task.path,
            self.config.providers,
            self.config.max_batch,
            self.config.max_wait_ms,
            self.config.load_interval_s,
        )
        return self

    def stop(self, drain_s: float = 2.0) -> None:
        """Leave the group, answer what is already queued (at most `drain_s`), clear the published load,
        then disconnect."""
        self.watchdog.stopping()
        self._drain_deadline = time.monotonic() + drain_s
        self._stopping.set()
        self.link.leave()
        with self._ready:
            self._ready.notify_all()
        deadline = time.monotonic() + drain_s + 10.0
        for thread in self._compute:
            thread.join(max(0.0, deadline - time.monotonic()))
        self._compute = []
        self.link.close()
        self._energy.close()
        if hasattr(self.task, "close"):  # e.g. a gateway's connection to the cloud
            self.task.close()

    @property
    def fatal(self) -> Optional[str]:
        """Why the broker will never let this worker in (LoginRefused), else None."""
        return self.link.fatal

    @property
    def running(self) -> bool:
        """True while both threads are alive (they end only on `stop()`, a refused login or a bug, logged)."""
        return self.link.alive and bool(self._compute) and all(t.is_alive() for t in self._compute)

    def _healthy(self) -> bool:
        now = time.monotonic()
        stuck = any(now - beat >= STUCK_S for beat in self._compute_beats)
        return self.link.client.is_connected() and self.running and not stuck

    def __enter__(self) -> CloudWorker:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def stats(self) -> Dict[str, Any]:
        """Counters since start (STAT_KEYS: received, answered, the reasons for not answering, batches ...),
        mean_batch, queued, reply_refused and the busy totals: busy_s (seconds spent on batches), wall_s
        (seconds since the worker was made) and busy (their ratio)."""
        with self._stats_lock:
            out: Dict[str, Any] = dict(self._stats)
            out["mean_batch"] = self._batched_samples / out["batches"] if out["batches"] else 0.0
        out["queued"] = len(self._queue)
        out["reply_refused"] = self.link.replies_refused
        figures = self._load.figures()
        out.update(busy_s=round(figures["busy_s"], 3), wall_s=round(figures["wall_s"], 3))
        out.update(streams=self.config.streams, busy=round(figures["busy"], 4))
        return out

    def load_figures(self) -> Dict[str, float]:
        """service_ms, capacity_per_s and the busy totals since start, as `load()` has them but without its
        side effect (its `busy` covers the time since the previous call): for readers other than the load."""
        return self._load.figures()

    def load(self) -> WorkerLoad:
        """The figures published on `Topics.cloud_load`; `busy` covers the time since the previous call."""
        figures = self._load.figures()
        with self._stats_lock:
            answered = self._stats["answered"]
        return WorkerLoad(
            worker_id=self.config.worker_id,
            ts_unix=time.time(),
            queue=len(self._queue),
            service_ms=round(figures["service_ms"], 4),
            capacity_per_s=round(figures["capacity_per_s"], 2),
            busy=round(self._load.busy_since_last(), 4),
            answered_total=answered,
        )

    def _count(self, key: str, n: int = 1) -> None:
        with self._stats_lock:
            self._stats[key] += n

    # -- the network thread's part: each offload as it arrives ----------------------------------------
    def _on_offload(self, message: mqtt.MQTTMessage) -> None:
        self._count("received")
        if message.qos == 0:  # first and cheapest: a QoS 0 flood must cost as little as possible
            self._count("refused_qos0")
            return
        generation = self.link.generation
        now = time.monotonic()
        try:
            job = parse_offload(
                message,
                self.config.topics,
                self.task.input_shape,
                self.max_payload_bytes,
                self.config.max_expiry_s,
                now,
                generation,
                self.task.input_dtype,
            )
        except ProtocolError as exc:
            self._count("rejected")
            logger.warning("rejected offload on %s: %s", message.topic, exc)
            self.link.ack(message.mid, message.qos, generation)
            return
        capacity = self._load.capacity_per_s()
        with self._ready:
            # This one waits for what is served before it (fair turns: `ahead`), then its own turn.
            key = job.request.device_id
            wait_s = (self._queue.ahead(key) + 1) / capacity if capacity > 0 else 0.0
            busy = wait_s > REFUSE_ABOVE * (job.deadline - now)
            shed = None if busy else self._queue.put(job, now, key=key)
            self._ready.notify()
        if busy:
            self._refuse(job, "busy", wait_s)
        elif shed is not None:
            # Refused, and acknowledged: the broker may send us the next offload, which may be another
            # device's; the requester answers at the edge now.
            self._refuse(shed.pending.item, shed.reason, wait_s)

    def _refuse(self, job: Job, reason: str, wait_s: float) -> None:
        """Tell the requester at once that no answer will come (counted as refused_<reason>)."""
        self._count(f"refused_{reason}")
        request = job.request
        refusal = OffloadRefusal(
            request.run_id, request.device_id, request.seq, self.config.worker_id, reason, 1000.0 * wait_s
        )
        props = PublishProperties(
            content_type=CONTENT_TYPE_REFUSAL,
            correlation_data=job.correlation,
            expiry_s=max(1, math.ceil(job.deadline - time.monotonic())),
        )
        self.link.reply(job.reply_topic, encode_refusal(refusal), props, job.mid, job.qos, job.generation)

    # -- the compute thread ------------------------------------------------------------------------
    def _compute_loop(self, stream: int) -> None:
        name_os_thread(
            f"{COMPUTE_THREAD}{stream}"
        )  # `top -H` shows it; the fleet simulation's quota finds it
        try:
            while True:
                batch = self._next_batch(stream)
                if batch is None:
                    return
                self._serve(batch, stream)
        except Exception:  # a bug here must be loud; systemd's watchdog restarts the service
            logger.exception("compute thread of worker %s crashed", self.config.worker_id)

    def _next_batch(self, stream: int) -> Optional[List[Pending[Job]]]:
        """The next batch the rule lets go, or None once stopping and drained (or out of drain time)."""
        with self._ready:
            while True:
                now = time.monotonic()
                self._compute_beats[stream] = now
                if self._stopping.is_set() and (
                    now >= self._drain_deadline or (not len(self._queue) and self.link.left.is_set())
                ):
                    return None
                limit = self._batch_limit(now)
                wait = self._queue.wait_s(now, limit)
                if wait == 0:
                    self._load.begin(stream, now)
                    return self._queue.take(limit)
                self._ready.wait(IDLE_WAIT_S if wait is None else min(wait, IDLE_WAIT_S))

    def _batch_limit(self, now: float) -> int:
        """How many the next batch may take (`BATCH_SHARE`); called under `_ready`."""
        service_s = self._load.service_s()
        heads = self._queue.heads()
        if service_s <= 0 or not heads:
            return self.config.max_batch
        left_s = min(job.deadline for job in heads) - now
        return max(1, min(self.config.max_batch, int(BATCH_SHARE * left_s / service_s)))

    def _serve(self, batch: List[Pending[Job]], stream: int) -> None:
        now = time.monotonic()
        live: List[Pending[Job]] = []
        for pending in batch:
            job = pending.item
            if now >= job.deadline:
                self._count("expired")
                logger.info("dropped expired offload %s/%d", job.request.device_id, job.request.seq)
                self.link.ack(job.mid, job.qos, job.generation)
            else:
                live.append(pending)
        if not live:
            self._load.end(0, stream)
            return
        if hasattr(self.task, "run_jobs"):  # a task that needs its requests, not only their tensors
            requests = [p.item.request for p in live]
            compute: Callable[[], Any] = lambda: self.task.run_jobs(requests)  # noqa: E731
        else:
            images = np.stack([p.item.request.tensor for p in live])
            compute = lambda: self.task.run(images)  # noqa: E731
        try:
            outputs, seconds, joules = self._energy.run(compute, len(live))
        except Exception:
            logger.exception("cloud model failed on a batch of %d; requesters will fall back", len(live))
            self._count("failed", len(live))
            for p in live:
                self.link.ack(p.item.mid, p.item.qos, p.item.generation)
            self._load.end(0, stream)
            return
        with self._ready:
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
            payload = self.task.reply(job.request, outputs, i, served)
            self.link.reply(job.reply_topic, payload, props, job.mid, job.qos, job.generation)
        self._load.end(len(live), stream)
        if self.observers:
            served_batch = BatchServed(
                len(live),
                seconds,
                [now - p.arrived for p in live],
                None if joules is None else list(joules),
                self._energy.source if joules is not None else "none",
                [p.item.request for p in live],
                outputs,
            )
            for observe in self.observers:
                try:
                    observe(served_batch)
                except Exception:  # an observer's bug must not stop the compute thread
                    logger.exception("batch observer failed")
