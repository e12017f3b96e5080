"""The device agent: samples in, edge cascade, policy, offload, one result record per sample out.

Every source (`submit`, `run_dataset`, `watch`) puts samples on one queue that a single inference thread
drains, batch 1, in order: run what the policy needs of the edge cascade, ask the policy, exit or offload.
Inferences are grouped in meter windows of `window_size` (or fewer when the queue runs dry) whose joules
are split over them by compute time. A sample's record is complete once its window is closed and its outcome
known (exit, the cloud's reply, or the deadline's fallback); it then goes to the outbox, which the link
empties to the broker in batches.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple

import msgpack
import numpy as np

from device_agent.cascade import EdgeCascade, load_card
from device_agent.config import AgentConfig
from device_agent.energy import DeviceEnergy, OpenWindow
from device_agent.link import Link
from device_agent.offloads import OffloadTracker, Settled
from device_agent.outbox import NewEntry, Outbox, OutboxFull
from device_agent.policies import Action, Outcome, PolicyError, make_policy
from device_agent.runs import RunSummary, Stream, plain, run_record
from device_agent.samples import Sample, edge_view, extend_view, record_map, record_of
from device_agent.sources import watch_directory
from edgecascade.systemd import Watchdog
from protocol import InferenceRecord, OffloadRequest, encode_offload, validate_record

logger = logging.getLogger(__name__)

_STOP = object()
SEQ_BLOCK = 1024  # sequence numbers reserved on disk at a time, so a restarted run never reuses one
READY_BACKLOG = 4096  # finished records held in memory before the inference loop writes them itself


class DeviceAgent:
    """`DeviceAgent(AgentConfig(...))`; `start()`, feed it samples, `close()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.run_id = (
            config.run_id or f"{config.device_id}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"
        )
        self.stats: Dict[str, int] = {"bad_inputs": 0, "failed": 0, "windows": 0, "records": 0}
        self._queue: queue.Queue = queue.Queue(maxsize=max(4 * config.window_size, 64))
        self._lock = threading.Lock()
        # finished records: (idempotent key, record map, outbox id of the offload it settles)
        self._ready: List[Tuple[str, Dict[str, Any], Optional[int]]] = []
        self._summary = RunSummary(self.run_id, self.device_id, str(config.policy.get("name")))
        self._started_mono = 0.0
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.watchdog = Watchdog(healthy=lambda: self._thread is not None and self._thread.is_alive())

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> DeviceAgent:
        cfg = self.config
        self.card = load_card(cfg.model_dir)
        self.policy = make_policy(cfg.policy, self.card)
        self.cascade = EdgeCascade(cfg.model_dir, cfg.providers, cfg.model_cache_dir, cfg.threads)
        self.input_shape = tuple(self.card.input_shape)
        cfg.state_dir.mkdir(parents=True, exist_ok=True)
        self.outbox = Outbox(
            cfg.state_dir / f"outbox-{self.device_id}.sqlite",
            max_entries=cfg.outbox_max_entries,
            max_bytes=cfg.outbox_max_bytes,
        )
        self._next_seq = int(self.outbox.get_state(f"seq/{self.run_id}") or 0)
        self._reserved_seq = self._next_seq
        self.energy = DeviceEnergy(cfg.meters, cfg.meter_options, self.card.raw)
        self._summary.energy_source = self.energy.source
        self.link = Link(
            cfg.broker,
            cfg.topics,
            self.device_id,
            self.outbox,
            self._on_reply,
            session_expiry_s=cfg.session_expiry_s,
            results_batch=cfg.results_batch,
            flush_s=cfg.flush_s,
            receipts=cfg.results_receipts,
            receipt_timeout_s=cfg.receipt_timeout_s,
            # Deadlines are swept each tick: within 5 % of the deadline is precise enough.
            tick_s=max(0.005, min(cfg.flush_s, cfg.offload_deadline_s / 20)),
        )
        self.offloads = OffloadTracker(
            self.link,
            self.outbox,
            cfg.topics,
            self.device_id,
            self.run_id,
            self._on_settled,
            max_inflight=cfg.max_inflight,
            deadline_s=cfg.offload_deadline_s,
        )
        self._recover()
        self._emit(run_record(self))
        self.link.hooks.append(self._housekeeping)
        self.link.start()
        if not self.link.wait_connected(cfg.connect_timeout_s):
            logger.warning(
                "broker %s:%d not reachable yet: running from the outbox", cfg.broker.host, cfg.broker.port
            )
        idle = self.energy.measure_idle(cfg.idle_seconds)
        if idle is not None:
            self._emit({"type": "idle_baseline", "run_id": self.run_id, "device_id": self.device_id, **idle})
        self._window_seq = 0
        self._started_mono = time.monotonic()
        self._thread = threading.Thread(target=self._loop, name=f"agent-{self.device_id}", daemon=True)
        self._thread.start()
        self.watchdog.ready(f"run {self.run_id}, policy {self.policy.name}")
        logger.info("agent %s started run %s with policy %s", self.device_id, self.run_id, self.policy.name)
        return self

    def __enter__(self) -> DeviceAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> RunSummary:
        """Finish the queue, wait (bounded) for offloads and records, publish `run_end`, disconnect."""
        if self._closed:
            return self._summary
        self._closed = True
        cfg = self.config
        self._queue.put(_STOP)
        if self._thread is not None:
            self._thread.join()
        self.offloads.wait_idle(cfg.offload_deadline_s + 1.0)
        self._flush(block=True)
        self._summary.seconds = time.monotonic() - self._started_mono
        self._summary.late_replies = self.offloads.stats["late_replies"]
        self._summary.policy_report = self.policy.report()
        self._emit(
            {
                "type": "run_end",
                "run_id": self.run_id,
                "device_id": self.device_id,
                "ended_unix": time.time(),
                "samples": self._summary.samples,
                # Extra to the schema (the collector ignores it): what the policy learned, e.g. regret.
                "policy_report": plain(self._summary.policy_report),
            }
        )
        drained = self.link.drain(cfg.close_timeout_s)
        left = self._summary.outbox_left = self.outbox.counts()
        if not drained:
            logger.warning(
                "closing with %s entries still in the outbox %s (sent next start)", left, self.outbox.path
            )
        self.watchdog.stopping()
        self.link.close()
        self.energy.close()
        self.outbox.close()
        return self._summary

    # -- sources --------------------------------------------------------------------------------------
    def submit(self, image: np.ndarray, label: Optional[int] = None) -> Future:
        """Queue one uint8 CHW image (blocks while the queue is full); the future yields its record."""
        future: Future = Future()
        arr = np.asarray(image)
        problem = self._check_image(arr)
        if problem is not None:
            future.set_exception(ValueError(problem))
            return future
        if self._closed:
            raise RuntimeError("agent is closed")
        self._queue.put((np.ascontiguousarray(arr), None if label is None else int(label), future))
        return future

    def run_dataset(
        self, samples: Iterable[Tuple[np.ndarray, Optional[int]]], progress: bool = False
    ) -> RunSummary:
        """Run every (image, label) through the agent; a summary of these samples once all are settled.

        The inference thread pulls the samples from the iterable itself (submits wait meanwhile): the same
        processing as `submit`, without a thread hand-off per sample, which costs as much as a small model.
        """
        summary = RunSummary(self.run_id, self.device_id, self.policy.name, energy_source=self.energy.source)
        stream = Stream(iter(samples), summary, progress)
        started = time.monotonic()
        self._queue.put(stream)
        while not stream.done.wait(0.5):
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the agent's inference thread is gone")
        if stream.error is not None:
            raise stream.error
        summary.seconds = time.monotonic() - started
        summary.late_replies = self.offloads.stats["late_replies"]
        summary.policy_report = self.policy.report()
        return summary

    def watch(self, directory: Path, stop: threading.Event, poll_s: float = 0.2) -> RunSummary:
        """Run each PNG/PGM file that appears in `directory` (label from a `label<N>` in its name) until
        `stop` is set; unreadable files are logged and counted (`bad_inputs`)."""

        # Files arrive now and then: each is submitted, so a window closes whenever the directory is quiet.
        def images() -> Iterator[Tuple[np.ndarray, Optional[int]]]:
            for _, image, label in watch_directory(directory, self.input_shape, stop, poll_s):
                if image is None:
                    self.stats["bad_inputs"] += 1
                    continue
                yield image, label

        return self._drive(images())

    def _drive(self, samples: Iterator[Tuple[np.ndarray, Optional[int]]]) -> RunSummary:
        summary = RunSummary(self.run_id, self.device_id, self.policy.name, energy_source=self.energy.source)
        lock = threading.Lock()
        outstanding = threading.Semaphore(0)
        submitted = 0

        def done(future: Future) -> None:
            # Tallied as they finish, so a long watch keeps no futures around.
            with lock:
                if future.exception() is None:
                    summary.add(future.result())
                else:
                    summary.failed += 1
            outstanding.release()

        started = time.monotonic()
        for image, label in samples:
            self.submit(image, label).add_done_callback(done)
            submitted += 1
        for _ in range(submitted):
            outstanding.acquire()
        summary.seconds = time.monotonic() - started
        summary.late_replies = self.offloads.stats["late_replies"]
        summary.policy_report = self.policy.report()
        return summary

    # -- the inference thread -------------------------------------------------------------------------
    def _loop(self) -> None:
        window: Optional[OpenWindow] = None
        members: List[Sample] = []
        while True:
            try:
                item = self._queue.get(timeout=0.5)
            except queue.Empty:
                self.watchdog.beat()
                continue
            if item is _STOP:
                break
            if isinstance(item, Stream):
                if window is not None:
                    self._close_window(window, members)
                    window = None
                self._pull(item)
                continue
            if window is None:
                window, members = self.energy.open_window(), []
            sample = self._process(*item)
            if sample is not None:
                window.add(sample.compute_s)
                members.append(sample)
            if window.count >= self.config.window_size or self._queue.empty():
                self._close_window(window, members)
                window = None
            self.watchdog.beat()
        if window is not None:
            self._close_window(window, members)

    def _pull(self, stream: Stream) -> None:
        """Run a `run_dataset` iterable on this thread, in windows of `window_size`."""
        window: Optional[OpenWindow] = None
        members: List[Sample] = []
        count = 0
        started = time.monotonic()
        try:
            for image, label in stream.samples:
                arr = np.asarray(image)
                problem = self._check_image(arr)
                if problem is not None:
                    stream.rejected()
                    continue
                stream.started()
                if window is None:
                    window, members = self.energy.open_window(), []
                sample = self._process(np.ascontiguousarray(arr), label, None, stream.finished)
                if sample is not None:
                    window.add(sample.compute_s)
                    members.append(sample)
                if window.count >= self.config.window_size:
                    self._close_window(window, members)
                    window = None
                self.watchdog.beat()
                count += 1
                if stream.progress and count % 1000 == 0:
                    rate = count / (time.monotonic() - started)
                    print(f"{count} samples, {rate:.0f}/s", file=sys.stderr, flush=True)
        except Exception as exc:  # the caller's iterable failed: its run_dataset raises it
            logger.exception("sample source failed")
            stream.error = exc
        finally:
            if window is not None:
                self._close_window(window, members)
            stream.exhaust()

    def _check_image(self, arr: np.ndarray) -> Optional[str]:
        """Why `arr` cannot be a sample (counted and logged), or None."""
        if arr.dtype == np.uint8 and tuple(arr.shape) == self.input_shape:
            return None
        self.stats["bad_inputs"] += 1
        logger.warning(
            "rejected input of dtype %s shape %s (want uint8 %s)", arr.dtype, arr.shape, self.input_shape
        )
        return f"image must be uint8 {self.input_shape}, got {arr.dtype} {arr.shape}"

    def _process(
        self,
        image: np.ndarray,
        label: Optional[int],
        future: Optional[Future],
        sink: Optional[Callable[[Optional[InferenceRecord]], None]] = None,
    ) -> Optional[Sample]:
        try:
            seq = self._take_seq()
            sample = Sample(seq, image, label, future, time.time())
            sample.sink = sink
            started = time.perf_counter()
            view, blocks, features = edge_view(self.cascade, self.policy.edge, image, seq)
            decision = self.policy.decide(view)
            if decision.action is Action.EXTEND:
                if features is None:
                    raise PolicyError(f"policy {self.policy.name} asked for the extension after it ran")
                view = extend_view(self.cascade, image, features, view)
                blocks.append("extension")
                decision = self.policy.decide(view)
                if decision.action is Action.EXTEND:
                    raise PolicyError(f"policy {self.policy.name} asked for the extension twice")
            sample.view, sample.decision, sample.blocks = view, decision, blocks
            sample.edge_ms = (time.perf_counter() - started) * 1000.0
            if decision.action is Action.OFFLOAD:
                request = OffloadRequest(self.run_id, self.device_id, seq, image, time.time_ns())
                payload = encode_offload(request)
                sample.bytes_up = len(payload)
                sample.compute_s = time.perf_counter() - started
                partial = record_map(self._record(sample, "fallback"))
                self.offloads.offload(sample, seq, payload, partial)
            else:
                sample.compute_s = time.perf_counter() - started
                self._settle(sample, view.exit_stage or "main")
            return sample
        except Exception as exc:  # one bad sample must not stop the agent
            self.stats["failed"] += 1
            logger.exception("sample failed")
            if future is not None and not future.done():
                future.set_exception(exc)
            if sink is not None:
                sink(None)
            return None

    def _take_seq(self) -> int:
        seq = self._next_seq
        self._next_seq += 1
        if self._next_seq > self._reserved_seq:
            self._reserved_seq = seq + SEQ_BLOCK
            self.outbox.set_state(f"seq/{self.run_id}", str(self._reserved_seq))
        return seq

    def _close_window(self, window: OpenWindow, members: List[Sample]) -> None:
        energy = window.close()
        if energy.record is not None:
            record = {
                "type": "energy_window",
                "run_id": self.run_id,
                "device_id": self.device_id,
                "window_seq": self._window_seq,
                **energy.record,
            }
            key = f"energy_window/{self.run_id}/{self.device_id}/{self._window_seq}"
            with self._lock:
                self._ready.append((key, validate_record(record), None))
        self._window_seq += 1
        self.stats["windows"] += 1
        for sample, (gross_j, net_j) in zip(members, energy.per_inference):
            with self._lock:
                sample.device_j_gross, sample.device_j_net, sample.energy_done = gross_j, net_j, True
            self._maybe_finish(sample)
        # Records reach the outbox from the link thread's housekeeping (every tick): a SQLite commit costs
        # ~1 ms here, which this thread should spend on inferences. Only a backlog (a full outbox) makes
        # the inference loop write, and wait for room: backpressure instead of unbounded memory.
        if len(self._ready) >= READY_BACKLOG:
            self._flush(block=True)

    # -- outcomes -------------------------------------------------------------------------------------
    def _on_reply(self, corr: Optional[bytes], payload: bytes) -> None:
        self.offloads.on_reply(corr, payload)

    def _on_settled(self, settled: Settled) -> None:
        sample: Sample = settled.sample
        sample.offload_outbox_id = settled.outbox_id
        reply = settled.reply
        if reply is None:
            self._settle(sample, "fallback")
            return
        sample.reply = reply
        sample.bytes_down = settled.bytes_down
        if settled.round_trip_ms is not None:
            sample.network_ms = max(0.0, settled.round_trip_ms - reply.cloud_ms)
        self._settle(sample, "cloud")

    def _settle(self, sample: Sample, exit_stage: str) -> None:
        cloud_prediction = sample.reply.prediction if sample.reply is not None else None
        try:
            assert sample.decision is not None
            self.policy.observe(Outcome(sample.view, sample.decision, cloud_prediction, sample.label))
        except Exception:
            logger.exception("policy %s failed to learn from sample %d", self.policy.name, sample.seq)
        with self._lock:
            sample.exit_stage = exit_stage
        self._maybe_finish(sample)

    def _maybe_finish(self, sample: Sample) -> None:
        with self._lock:
            if not sample.energy_done or sample.exit_stage is None or sample.finished:
                return
            sample.finished = True
        record = self._record(sample, sample.exit_stage)
        key = f"inference/{self.run_id}/{self.device_id}/{sample.seq}"
        with self._lock:
            self._ready.append((key, record_map(record), sample.offload_outbox_id))
            self._summary.add(record)
            self.stats["records"] += 1
        sample.image = None  # the record is all we keep
        if sample.future is not None:
            sample.future.set_result(record)
        if sample.sink is not None:
            sample.sink(record)

    def _record(self, sample: Sample, exit_stage: str) -> InferenceRecord:
        return record_of(
            sample,
            exit_stage,
            run_id=self.run_id,
            device_id=self.device_id,
            energy_source=self.energy.source,
            analytic_j=self.energy.analytic_j(sample.blocks),
        )

    # -- records to the outbox ------------------------------------------------------------------------
    def _emit(self, record: Dict[str, Any]) -> None:
        """A run / run_end / baseline record straight to the outbox, as an entry of its own."""
        validate_record(record)
        kind = record["type"]
        suffix = f"/{record['measured_unix']}" if kind == "idle_baseline" else ""
        self.outbox.put(
            f"{kind}/{self.run_id}/{self.device_id}{suffix}",
            "record",
            self.config.topics.results(self.device_id),
            msgpack.packb([record], use_bin_type=True),
            timeout=self.config.outbox_wait_s,
        )

    def _flush(self, block: bool) -> None:
        """Finished records go to the outbox as one entry, in the transaction that removes the offloads they
        settle: a record never exists beside its still-pending offload, nor is it lost between the two."""
        with self._lock:
            ready, self._ready = self._ready, []
        if not ready:
            return
        # Each record is in exactly one flush, so the first record's key names this entry for good.
        entry = NewEntry(
            f"batch/{ready[0][0]}",
            "record",
            self.config.topics.results(self.device_id),
            msgpack.packb([r for _, r, _ in ready], use_bin_type=True),
            meta={"keys": [k for k, _, _ in ready]},
            items=len(ready),
        )
        offloads = [oid for _, _, oid in ready if oid is not None]
        try:
            self.outbox.commit(offloads, [entry], timeout=self.config.outbox_wait_s if block else 0)
        except OutboxFull:
            if block:
                raise
            with self._lock:  # the housekeeping thread never waits for room: try again next tick
                self._ready[:0] = ready

    def _housekeeping(self, connected: bool) -> None:
        self.offloads.tick(connected)
        self._flush(block=False)

    def _recover(self) -> None:
        """Offloads a previous process left unanswered become fallback records now."""
        for entry in self.outbox.all_of("offload"):
            record = dict(entry.meta or {})
            try:
                validate_record(record)
            except ValueError:
                logger.error("dropping unreadable leftover offload %s", entry.key)
                self.outbox.ack([entry.id])
                continue
            key = f"inference/{record['run_id']}/{record['device_id']}/{record['seq']}"
            topic = entry.topic.rsplit("/", 1)[0] + "/results"
            self.outbox.commit(
                [entry.id],
                [NewEntry(f"batch/{key}", "record", topic, msgpack.packb([record], use_bin_type=True))],
            )
            logger.warning("offload %s of an earlier process recorded as fallback", entry.key)
