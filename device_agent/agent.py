"""The device agent: samples in, edge cascade, policy, offload, one result record per sample out.

`DeviceAgent` wires the parts and owns their lifecycle; each part lives in its own module:

- intake (here): `submit` (one image), `run_dataset` (an iterable; resumable), `watch` (a directory);
- `inference.InferenceLoop`: the one thread that runs the cascade and the policy, in energy windows;
- `offloads.OffloadTracker`: offloads in flight, their replies and deadlines;
- `capacity.CapacityRule`: whether an offload can come back in time (the workers' load, which the agent reads
  from their retained load topic, and the device's own round trips), else it is shed: answered at the edge;
- `settlement.Settlement`: outcomes become records, records reach the outbox (and only then are resolved);
- `drift_watch.DriftWatch`: the main block's outputs against the card's profile, on records and the status;
- `rollout.ModelRollout`: new model versions from the operator, verified and installed, then swapped in
  here (`serve`) between two samples; `rollout.AgreementTracker`: the cloud's answers against the edge's;
- `link.Link`: the MQTT connection that empties the outbox; `outbox.Outbox` + `durable`: what is on disk.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import numpy as np

from device_agent.capacity import CapacityRule
from device_agent.card import ModelCard, ModelCardError, load_card
from device_agent.cascade import EdgeCascade
from device_agent.config import AgentConfig
from device_agent.drift_watch import DriftWatch
from device_agent.durable import Origin, SourceProgress
from device_agent.energy import DeviceEnergy, baseline_record
from device_agent.inference import STOP, InferenceLoop
from device_agent.keys import source_stream
from device_agent.model_store import model_version_of
from device_agent.offloads import OffloadTracker, Settled
from device_agent.policies import Policy, make_policy
from device_agent.rollout import AgreementTracker, ModelRollout
from device_agent.rule import softmax_row
from device_agent.runs import LiveTally, RunSummary, Stream, plain, run_record
from device_agent.safety import CloudWatch
from device_agent.session import RunSession
from device_agent.settlement import Settlement
from device_agent.sources import watch_directory
from edgecascade.systemd import Watchdog
from protocol import InferenceRecord, ProtocolError
from protocol.load import decode_load
from protocol.records import RunEndRecord
from protocol.status import ModelStatus

logger = logging.getLogger(__name__)

STATUS_EVERY_S = 1.0  # the model status (agreement) is republished at most this often


@dataclass
class ServedModel:
    """What the agent serves from one model directory, built whole before it is swapped in."""

    version: str
    model_dir: Path
    card: ModelCard
    policy: Policy
    cascade: EdgeCascade
    drift: Optional[DriftWatch]


class DeviceAgent:
    """`DeviceAgent(AgentConfig(...))`; `start()`, feed it samples, `close()`."""

    def __init__(self, config: AgentConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.session = RunSession(config)
        self.run_id = self.session.run_id
        self.stats: Dict[str, int] = {
            "bad_inputs": 0,
            "failed": 0,
            "windows": 0,
            "bad_loads": 0,
            "swap_failed": 0,
        }
        self.capacity: Optional[CapacityRule] = None  # None: capacity-awareness is off, every offload goes
        self.drift: Optional[DriftWatch] = None  # None: drift is not watched (off, no reference, no edge)
        self.cloud_watch = CloudWatch() if config.cloud_watch else None  # None: no back-off
        self._summary = RunSummary(self.run_id, self.device_id, str(config.policy.get("name")))
        self._started_mono = 0.0
        self._thread: Optional[threading.Thread] = None
        self._closed = False
        self.watchdog = Watchdog(healthy=lambda: self._thread is not None and self._thread.is_alive())
        # Each stored record, as it is stored (the metrics: `device_agent.metrics`); set before start().
        self.record_observers: List[Callable[[InferenceRecord], None]] = []
        self._listening: List[Tuple[str, Callable[[str, bytes], None]]] = []
        self.rollout: Optional[ModelRollout] = None  # None: the config follows no device group
        self._status_sent: Tuple[Any, float] = ((), 0.0)  # (what changed, monotonic time) of the last status

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> DeviceAgent:
        cfg = self.config
        if cfg.rollout is not None:
            self.rollout = ModelRollout(cfg.rollout, cfg.state_dir, cfg.topics)
        # A version installed by a rollout is served again after a restart (once it verifies again).
        self.model_dir = self.rollout.startup_dir(cfg.model_dir) if self.rollout else Path(cfg.model_dir)
        self.model_version = model_version_of(self.model_dir)
        self.agreement = AgreementTracker(self.model_version)
        self.card = load_card(self.model_dir)
        self.policy = make_policy(cfg.policy, self.card)
        self.cascade = EdgeCascade(self.model_dir, cfg.providers, cfg.model_cache_dir, cfg.threads)
        self.input_shape = tuple(self.card.input_shape)
        self.input_dtype = np.dtype(self.card.input_dtype)  # what `submit` and the sources must deliver
        self.energy = DeviceEnergy(cfg.meters, cfg.meter_options, self.card.raw)
        try:
            self._start_parts()
        except BaseException:
            self._teardown()
            raise
        self._thread = threading.Thread(target=self.loop.run, name=f"agent-{self.device_id}", daemon=True)
        self._thread.start()
        self.watchdog.ready(f"run {self.run_id}, policy {self.policy.name}")
        logger.info("agent %s started run %s with policy %s", self.device_id, self.run_id, self.policy.name)
        return self

    def _start_parts(self) -> None:
        cfg = self.config
        self._summary.energy_source = self.energy.source
        # Deadlines are swept each tick: within 5 % of the deadline is precise enough.
        tick_s = max(0.005, min(cfg.flush_s, cfg.offload_deadline_s / 20))
        self.session.open(self._on_reply, tick_s)
        self.outbox, self.link = self.session.outbox, self.session.link
        # an offload: one raw sample
        self.link.largest_payload_bytes = int(np.prod(self.input_shape)) * self.input_dtype.itemsize
        self.settlement = Settlement(
            run_id=self.run_id,
            device_id=self.device_id,
            outbox=self.outbox,
            sink=self.session.sink,
            policy=self.policy,
            energy=self.energy,
            summary=self._summary,
            observers=self.record_observers,
        )
        if cfg.capacity_aware:
            self.capacity = CapacityRule(
                cfg.offload_deadline_s,
                shed_above=cfg.shed_above,
                budget_per_s=cfg.offload_budget_per_s,
                budget_burst=cfg.offload_budget_burst,
            )
        self.offloads = OffloadTracker(
            self.link,
            self.outbox,
            cfg.topics,
            self.device_id,
            self.run_id,
            self._offload_settled,
            max_inflight=cfg.max_inflight,
            deadline_s=cfg.offload_deadline_s,
            outbox_wait_s=cfg.outbox_wait_s,
            held_since=self.capacity.held_since if self.capacity is not None else None,
        )
        # Every kind of number that names a record survives a restart (`durable`): a resumed run continues.
        self.loop = InferenceLoop(self, self.session.counter("sample"), self.session.counter("window"))
        self._summary.recovered_offloads = self.settlement.recover()
        self.drift = DriftWatch.for_agent(
            cfg.drift,
            self.card,
            self.policy,
            run_id=self.run_id,
            device_id=self.device_id,
            sink=self.session.sink,
            link=self.link,
        )
        if self.capacity is not None:
            self.link.listen(cfg.topics.all_cloud_load, self._on_load)  # subscribed once connected
        for topic_filter, handler in self._listening:
            self.link.listen(topic_filter, handler)
        if self.rollout is not None:
            self.rollout.attach(
                self.link, self.agreement, self.model_version, self.prepare_model, self.loop.offer
            )
        self.link.set_model(self.model_status())  # in the first `online` already
        self.link.hooks.append(self._housekeeping)
        self.session.connect(
            lambda: run_record(
                dataclasses.replace(cfg, model_dir=self.model_dir),
                self.run_id,
                policy=self.policy.name,
                params=self.policy.params(),
                meter=self.energy.source,
                providers=cfg.providers,
            ).to_map()
        )
        idle = self.energy.measure_idle(cfg.idle_seconds)
        if idle is not None:
            self.session.emit_once(
                "idle_baseline", baseline_record(idle, self.run_id, self.device_id).to_map()
            )
        self._started_mono = time.monotonic()

    def __enter__(self) -> DeviceAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> RunSummary:
        """Finish the queue, wait (bounded) for offloads and records, publish `run_end`, disconnect.
        The link, meter and outbox are closed even when an earlier step fails (its error is raised)."""
        if self._closed:
            return self._summary
        self._closed = True
        cfg = self.config
        try:
            if self._thread is not None and self._thread.is_alive():
                # A loop that died cannot take STOP from a full queue: put only to a live one, which
                # empties it (bounded, should it die meanwhile, by its longest wait for the outbox).
                wait = None if cfg.outbox_wait_s is None else cfg.outbox_wait_s + 60.0
                self.loop.queue.put(STOP, timeout=wait)
                self._thread.join()
            self.offloads.wait_idle(cfg.offload_deadline_s + 1.0)
            self._summary.seconds = time.monotonic() - self._started_mono
            self.report_into(self._summary)
            self.link.set_model(self.model_status())  # what the goodbye on the status topic names
            # `samples` in run_end: the run's records on disk over every process that took part in it.
            # Extra to the schema (the collector ignores them): what the policy learned, e.g. regret, and
            # what capacity-awareness did (sheds by reason, its estimates).
            report, capacity = plain(self._summary.policy_report), plain(self._summary.capacity)
            drift = plain(self._summary.drift)
            self._summary.outbox_left = self.session.finish(
                lambda count: {
                    **RunEndRecord(self.run_id, self.device_id, time.time(), count).to_map(),
                    "policy_report": report,
                    "capacity": capacity,
                    "drift": drift,
                }
            )
            self._summary.refused_records = self.session.refused_records
        finally:
            self.watchdog.stopping()
            self._teardown()
        return self._summary

    def _teardown(self) -> None:
        try:
            if self.rollout is not None:
                self.rollout.close()
            self.session.close()
        finally:
            self.energy.close()

    def listen(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Before `start`: also read `topic_filter` on the agent's connection, at QoS 0 (an input source:
        `device_agent.mqtt_input`); `handler(topic, payload)` runs on paho's thread and must not block."""
        if self._thread is not None:
            raise RuntimeError("listen() comes before start()")
        self._listening.append((topic_filter, handler))

    # -- intake ---------------------------------------------------------------------------------------
    def submit(
        self, image: np.ndarray, label: Optional[int] = None, origin: Optional[Origin] = None
    ) -> Future:
        """Queue one uint8 CHW image (blocks while the queue is full); the future yields its record once
        the record is on disk."""
        future: Future = Future()
        arr = np.asarray(image)
        problem = self.loop.check(arr)
        if problem is not None:
            future.set_exception(ValueError(problem))
            return future
        item = (np.ascontiguousarray(arr), None if label is None else int(label), future, origin)
        while True:
            if self._closed:
                raise RuntimeError("agent is closed")
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the agent's inference thread is gone (see the log)")
            try:
                self.loop.queue.put(item, timeout=0.5)
                return future
            except queue.Full:
                continue

    def run_dataset(
        self,
        samples: Iterable[Tuple[np.ndarray, Optional[int]]],
        progress: bool = False,
        source: Optional[str] = None,
    ) -> RunSummary:
        """Run every (image, label) through the agent; a summary of these samples once all are on disk.

        `source` names a replayable source (e.g. `dataset:fashion-mnist:test:1000`): its items are then
        tracked, and a run resumed with the same run id after a kill skips the ones already recorded (see
        `durable`); `SourceProgress.finish_pass` (the CLI calls it) ends the pass. The inference thread
        pulls the samples from the iterable itself (submits wait meanwhile).
        """
        summary = self.new_summary()
        progress_of = self.source_progress(source) if source else None
        stream = Stream(iter(samples), summary, progress, progress_of)
        if summary.resumed_done:
            logger.warning(
                "resuming pass %d of %s in run %s: %d samples already recorded are skipped",
                summary.pass_number,
                source,
                self.run_id,
                summary.resumed_done,
            )
        started = time.monotonic()
        self.loop.queue.put(stream)
        while not stream.done.wait(0.5):
            if self._thread is None or not self._thread.is_alive():
                raise RuntimeError("the agent's inference thread is gone")
        if stream.error is not None:
            raise stream.error
        summary.seconds = time.monotonic() - started
        self.report_into(summary)
        return summary

    def source_progress(self, source: str) -> SourceProgress:
        """The progress of a replayable source within this run."""
        return SourceProgress(self.outbox, source_stream(self.run_id, source))

    def watch(self, directory: Path, stop: threading.Event, poll_s: float = 0.2) -> RunSummary:
        """Run each image file that appears in `directory` (label from a `label<N>` in its name) until
        `stop` is set. A file is read once, across restarts too (see `durable`); unreadable files are
        logged, counted (`skipped_files`) and never read again."""
        progress = SourceProgress(self.outbox, f"dir:{Path(directory).resolve()}")
        tally = LiveTally(self.new_summary())
        for found in watch_directory(directory, self.input_shape, stop, progress, poll_s):
            if found.image is None:
                tally.summary.skipped_files += 1
                continue
            tally.track(self.submit(found.image, found.label, found.origin))
        summary = tally.wait()
        self.report_into(summary)
        return summary

    # -- the rest -------------------------------------------------------------------------------------
    def new_summary(self) -> RunSummary:
        """An empty summary of this run's samples, for one span of them (a dataset pass, a live source)."""
        return RunSummary(self.run_id, self.device_id, self.policy.name, energy_source=self.energy.source)

    def report_into(self, summary: RunSummary) -> None:
        """What the parts have to say at the end of a summary's span (they count over the whole run)."""
        summary.late_replies = self.offloads.stats["late_replies"]
        summary.policy_report = self.policy.report()
        summary.capacity = self.capacity.report() if self.capacity is not None else {}
        summary.drift = self.drift.report() if self.drift is not None else {}
        summary.cloud_watch = self.cloud_watch.report() if self.cloud_watch is not None else {}
        if self.rollout is not None:
            summary.rollout = {**self.rollout.stats, "refusals": dict(self.rollout.refusals)}

    def _on_reply(self, corr: Optional[bytes], payload: bytes) -> None:
        self.offloads.on_reply(corr, payload)

    # -- model versions -------------------------------------------------------------------------------
    def prepare_model(self, model_dir: Path) -> ServedModel:
        """Everything the agent serves, built from `model_dir` on the caller's thread (the rollout's) and
        tried on one image: a model that cannot load or run raises here, never on a sample."""
        cfg = self.config
        card = load_card(model_dir)
        same_input = (list(card.input_shape), card.input_dtype) == (
            list(self.card.input_shape),
            self.card.input_dtype,
        )
        if not same_input or card.num_classes != self.card.num_classes:
            raise ModelCardError(
                f"{model_dir}: input {card.input_dtype} {card.input_shape} with {card.num_classes} classes, "
                f"but the agent serves {self.card.input_dtype} {self.card.input_shape} with "
                f"{self.card.num_classes} (a swap cannot change samples)"
            )
        policy = make_policy(cfg.policy, card)
        cascade = EdgeCascade(model_dir, cfg.providers, cfg.model_cache_dir, cfg.threads)
        cascade.decide(np.zeros(tuple(card.input_shape), dtype=card.input_dtype))
        drift = DriftWatch.for_agent(
            cfg.drift,
            card,
            policy,
            run_id=self.run_id,
            device_id=self.device_id,
            sink=self.session.sink,
            link=self.link,
        )
        return ServedModel(model_version_of(model_dir), Path(model_dir), card, policy, cascade, drift)

    def serve(self, model: ServedModel) -> None:
        """The inference thread, between two samples: the next sample is answered by `model`."""
        was = self.model_version
        self.energy.use_card(model.card.raw)  # first: what may fail, before anything was swapped
        self.card, self.policy, self.cascade, self.drift = (
            model.card,
            model.policy,
            model.cascade,
            model.drift,
        )
        self.settlement.policy = (
            model.policy
        )  # offloads still in flight teach the new policy (its thresholds)
        self.model_dir, self.model_version = model.model_dir, model.version
        if self.cloud_watch is not None:  # its window judged the old model's answers
            self.cloud_watch = CloudWatch()
        self.agreement.swapped(model.version)
        if self.rollout is not None:
            self.rollout.swapped(model.version)
        logger.info("agent %s swapped model %s for %s", self.device_id, was, model.version)

    def model_status(self) -> ModelStatus:
        if self.rollout is not None:
            return self.rollout.status()
        return ModelStatus(None, self.agreement.current(), self.agreement.previous, 0)

    def _offload_settled(self, settled: Settled) -> None:
        reply, sample = settled.reply, settled.sample
        if reply is not None and sample.view.prediction is not None:
            # The device's one view of its model's quality: does the cloud agree with the edge's answer?
            self.agreement.observe(sample.model_version, int(reply.prediction) == int(sample.view.prediction))
            if self.cloud_watch is not None and sample.view.probs is not None:
                cloud = softmax_row(np.asarray(reply.logits, dtype=np.float32))
                self.cloud_watch.answered(float(sample.view.probs.max()), float(cloud.max()))
        if self.capacity is not None:
            if settled.refusal is not None:
                self.capacity.refused()
            elif settled.reply is None:
                self.capacity.fell_back()
            else:
                self.capacity.answered(settled.round_trip_ms, settled.reply)
        self.settlement.offload_settled(settled)

    def _on_load(self, topic: str, payload: bytes) -> None:
        """A worker's retained load (paho's thread); an empty one: its will cleared it, the worker is gone."""
        assert self.capacity is not None
        if not payload:
            self.capacity.worker_load(topic, None)
            return
        try:
            load = decode_load(payload)
        except ProtocolError as exc:  # counted and logged; the rule goes on with what it knows
            self.stats["bad_loads"] += 1
            logger.warning("bad worker load on %s: %s", topic, exc)
            return
        self.capacity.worker_load(topic, load)

    def _housekeeping(self, connected: bool) -> None:
        self.offloads.tick(connected)
        self.settlement.flush(block=False)
        rollout = self.rollout.stats if self.rollout is not None else {}
        changes = (self.agreement.changes, rollout.get("refused"), rollout.get("swaps"))
        if changes != self._status_sent[0] and time.monotonic() - self._status_sent[1] >= STATUS_EVERY_S:
            self._status_sent = (changes, time.monotonic())
            self.link.set_model(self.model_status())
