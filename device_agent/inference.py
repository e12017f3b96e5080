"""The inference thread: samples off one queue, batch 1, in order, through the edge cascade and the policy.

For each sample: run what the policy needs of the edge cascade, ask the policy, then exit at the edge or
offload, if the capacity rule (`capacity`) lets it go, else shed it: the edge's answer, flagged `shed`.
Inferences are grouped in meter windows whose joules are split over them by compute time; a window closes
after `window_size` inferences, after `window_max_s` seconds, or when the queue runs dry, and hands its
members to `Settlement`. Items on the queue are single samples (`submit`) or a whole `Stream` (`run_dataset`),
which this thread pulls itself: a thread hand-off per sample costs as much as a small model.

A new model version (`device_agent.rollout`, built whole on another thread) is `offer`ed here and swapped in
by this thread before the next sample (or while idle): no sample sees half of one model and half of another,
and each sample names the version that answered it.
"""

from __future__ import annotations

import logging
import queue
import sys
import threading
import time
from concurrent.futures import Future
from typing import Any, Callable, List, Optional, Tuple

import numpy as np

from device_agent.durable import Counter, Origin, mark_done
from device_agent.energy import OpenWindow
from device_agent.policies import Action, Decision
from device_agent.runs import Stream
from device_agent.samples import Sample, edge_view
from device_agent.sink import READY_BACKLOG
from protocol import InferenceRecord, OffloadRequest, encode_offload

logger = logging.getLogger(__name__)

STOP = object()  # put on the queue to end the loop
Item = Tuple[np.ndarray, Optional[int], Optional[Future], Optional[Origin]]


class InferenceLoop:
    """Runs on its own thread (`run`); `agent` gives it the parts (cascade, policy, energy, offloads...)."""

    def __init__(self, agent: Any, samples: Counter, windows: Counter) -> None:
        self.agent = agent
        self.config = agent.config
        self.queue: queue.Queue = queue.Queue(maxsize=max(4 * self.config.window_size, 64))
        self.samples = samples
        self.windows = windows
        self._offered: Any = None  # a model built to be served next (`offer`), swapped in by this thread
        self._offer_lock = threading.Lock()

    def offer(self, model: Any) -> None:
        """Any thread: serve `model` from the next sample on (a newer offer replaces one not yet taken)."""
        with self._offer_lock:
            self._offered = model

    def _maybe_swap(self) -> None:
        if self._offered is None:
            return
        with self._offer_lock:
            model, self._offered = self._offered, None
        try:
            self.agent.serve(model)
        except Exception:  # the thread must go on answering, with whichever model it still has
            self.agent.stats["swap_failed"] += 1
            logger.exception(
                "could not swap in model %s; still serving %s", model.version, self.agent.model_version
            )

    def check(self, arr: np.ndarray) -> Optional[str]:
        """Why `arr` cannot be a sample (counted and logged), or None."""
        shape, dtype = self.agent.input_shape, self.agent.input_dtype  # the card's: an image, a window...
        if arr.dtype == dtype and tuple(arr.shape) == shape:
            return None
        self.agent.stats["bad_inputs"] += 1
        logger.warning("rejected input of dtype %s shape %s (want %s %s)", arr.dtype, arr.shape, dtype, shape)
        return f"sample must be {dtype} {shape}, got {arr.dtype} {arr.shape}"

    # -- the thread -----------------------------------------------------------------------------------
    def run(self) -> None:
        window: Optional[OpenWindow] = None
        members: List[Sample] = []
        watchdog = self.agent.watchdog
        while True:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                self._maybe_swap()
                watchdog.beat()
                continue
            if item is STOP:
                break
            if isinstance(item, Stream):
                if window is not None:
                    closing = window
                    window = None
                    self._close(closing, members)
                self._pull(item)
                continue
            if window is None:
                window, members = self.agent.energy.open_window(), []
            image, label, future, origin = item
            sample = self._process(image, label, future, None, origin)
            if sample is not None:
                window.add(sample.compute_s)
                members.append(sample)
            if self._due(window) or self.queue.empty():
                closing = window
                window = None
                self._close(closing, members)
                if self.queue.empty():
                    self.agent.link.wake()  # idle: flush now, so that waiting callers hear back soon
                try:
                    self._backpressure()
                except Exception:  # e.g. OutboxFull: the records stay in memory; the next window tries again
                    logger.exception("the backlog of records could not be written to the outbox")
            watchdog.beat()
        if window is not None:
            self._close(window, members)

    def _due(self, window: OpenWindow) -> bool:
        cfg = self.config
        return window.count >= cfg.window_size or time.monotonic() - window.opened >= cfg.window_max_s

    def _pull(self, stream: Stream) -> None:
        """Run a `run_dataset` stream on this thread, skipping the items a resumed pass has done."""
        window: Optional[OpenWindow] = None
        members: List[Sample] = []
        count = 0
        started = time.monotonic()
        try:
            for index, (image, label) in enumerate(stream.samples):
                if stream.done_before(index):
                    continue  # a resumed pass: this item's record is already on disk
                origin = stream.origin(index)
                arr = np.asarray(image)
                if self.check(arr) is not None:
                    stream.rejected()
                    continue
                stream.started()
                if window is None:
                    window, members = self.agent.energy.open_window(), []
                sample = self._process(np.ascontiguousarray(arr), label, None, stream.finished, origin)
                if sample is not None:
                    window.add(sample.compute_s)
                    members.append(sample)
                if self._due(window):
                    closing = window
                    window = None
                    self._close(closing, members)
                    self._backpressure()
                self.agent.watchdog.beat()
                count += 1
                if stream.progress and count % 1000 == 0:
                    rate = count / (time.monotonic() - started)
                    print(f"{count} samples, {rate:.0f}/s", file=sys.stderr, flush=True)
        except Exception as exc:  # the iterable failed, or the outbox had no room: run_dataset raises it
            logger.exception("the stream of samples stopped")
            stream.error = exc
        finally:
            if window is not None:
                self._close(window, members)
            stream.exhaust()
            if stream.error is not None:
                stream.done.set()  # its started samples are recorded later (or at close): nothing waits
            self.agent.link.wake()

    def _process(
        self,
        image: np.ndarray,
        label: Optional[int],
        future: Optional[Future],
        sink: Optional[Callable[[Optional[InferenceRecord]], None]],
        origin: Optional[Origin],
    ) -> Optional[Sample]:
        agent = self.agent
        try:
            self._maybe_swap()  # between two samples
            seq = self.samples.take()
            sample = Sample(seq, image, label, future, time.time())
            sample.sink, sample.origin, sample.model_version = sink, origin, agent.model_version
            started = time.perf_counter()
            policy = agent.policy
            view, blocks = edge_view(agent.cascade, policy.edge, image, seq)
            decision = policy.decide(view)
            sample.view, sample.decision, sample.blocks = view, decision, blocks
            sample.edge_ms = (time.perf_counter() - started) * 1000.0
            if agent.drift is not None:  # after edge_ms: a drift test is the device's cost, not the sample's
                agent.drift.observe(view, seq, image)
            offload = decision.action is Action.OFFLOAD
            watch = agent.cloud_watch
            if not offload and watch is not None and view.prediction is not None:
                # Drifting, and the cloud is the better tier: it answers this one too.
                offload = watch.escalates(agent.drift is not None and agent.drift.drifting)
                if offload:
                    sample.decision = decision = Decision(Action.OFFLOAD, offload_prob=1.0)
            if offload and agent.capacity is not None:
                # Asked before the request is encoded: a shed sample costs no bytes at all.
                full, answer = agent.offloads.window_full(), view.prediction is not None
                offload = agent.capacity.admit(
                    window_full=full, edge_answer=answer, in_flight=agent.offloads.in_flight()
                ).admitted
            if offload and watch is not None and view.prediction is not None:
                offload = watch.admit()  # backed off: the edge answers (shed), but probes
            if offload:
                request = OffloadRequest(agent.run_id, agent.device_id, seq, image, time.time_ns())
                payload = encode_offload(request)
                sample.bytes_up = len(payload)
                sample.compute_s = time.perf_counter() - started
                partial = agent.settlement.record(sample, "fallback").to_map()
                agent.offloads.offload(sample, seq, payload, partial, also=mark_done([origin]))
            else:
                sample.compute_s = time.perf_counter() - started
                if decision.action is Action.OFFLOAD:
                    agent.settlement.shed(sample)
                else:
                    agent.settlement.edge_exit(sample)
            return sample
        except Exception as exc:  # one bad sample must not stop the agent
            agent.stats["failed"] += 1
            logger.exception("sample failed")
            if future is not None and not future.done():
                future.set_exception(exc)
            if sink is not None:
                sink(None)
            return None

    def _close(self, window: OpenWindow, members: List[Sample]) -> None:
        energy = window.close()
        self.agent.stats["windows"] += 1
        self.agent.settlement.window_closed(energy, self.windows.take(), members)

    def _backpressure(self) -> None:
        """Records reach the outbox from the link thread's housekeeping (every tick): a SQLite commit costs
        ~1 ms here, which this thread should spend on inferences. Only a backlog (a full outbox) makes this
        thread write, and wait for room (OutboxFull after `outbox_wait_s`): backpressure instead of
        unbounded memory."""
        if self.agent.settlement.backlog >= READY_BACKLOG:
            self.agent.settlement.flush(block=True)
