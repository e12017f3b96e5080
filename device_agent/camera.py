"""The REACT camera agent: frames on the real clock through the device loop, late cloud answers fused in.

For every frame, paced at the source's fps: cloud answers that have arrived (and whose injected delay has
passed) go to the loop; the loop runs the edge detector (every k frames) or the tracker, and fusion
(`video.pipeline`); when the loop wants one, the frame is offloaded on the device's `frames` topic (MQTT 5,
QoS 1, ResponseTopic + CorrelationData, an expiry) and answered by a cloud detector worker
(`edgecascade cloud --task detect`). Every frame ends as one `frame` record (`protocol.records.FrameRecord`)
through the same outbox, receipts and energy windows as the classification agent (`device_agent.sink`,
`device_agent.energy`), so a cloud worker or broker that dies loses no frame row; what it costs is a cloud
answer, and the device carries on at the edge.

Frame offloads are not kept in the outbox: an answer that comes late is worth nothing, so a frame whose answer
misses `deadline_s` (plus the injected delay) is given up (`on_cloud_lost`) and the next frame goes instead.
`extra_delay_ms` holds every answer back until that long after its frame was sent: a slower link, for
sweeping the effect of cloud latency (bench/video_bench.py).
"""

from __future__ import annotations

import heapq
import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any, Dict, Iterable, List, Optional, Tuple

import numpy as np

from device_agent.camera_config import CameraConfig, CameraSummary
from device_agent.energy import DeviceEnergy, OpenWindow, baseline_record, window_record
from device_agent.keys import correlation, entry_key
from device_agent.runs import run_record
from device_agent.session import RunSession
from device_agent.sink import Finished
from protocol import (
    CONTENT_TYPE_OFFLOAD,
    OffloadRequest,
    ProtocolError,
    decode_detections,
    encode_offload,
    is_refusal,
)
from protocol.mqtt import publish_properties
from protocol.records import FrameRecord, RunEndRecord
from video.detector import Detections, Detector
from video.pipeline import CloudOnlyLoop, DeviceLoop, LoopConfig

logger = logging.getLogger(__name__)

Clip = Tuple[
    int, Iterable[np.ndarray]
]  # (clip index, uint8 frames [H, W]: an array [T, H, W] or an iterator)


@dataclass
class _Sent:
    clip: int
    frame: int
    sent_mono: float
    due_mono: float  # given up after this


@dataclass
class _FrameState:
    record: Dict[str, Any]
    compute_s: float


class CameraAgent:
    """`CameraAgent(CameraConfig(...)).start()`, `run(clips)`, `close()`."""

    def __init__(self, config: CameraConfig) -> None:
        self.config = config
        self.device_id = config.device_id
        self.session = RunSession(config)
        self.run_id = self.session.run_id
        self._lock = threading.Lock()
        self._sent: Dict[bytes, _Sent] = {}
        # answers held for their injected delay: (available, arrival no, frame, dets, sent, cloud_ms, bytes)
        self._arrived: List[Tuple[float, int, int, Detections, float, float, int]] = []
        self._arrival_no = 0
        self.summary = CameraSummary(self.run_id, config.method)
        self.outbox_left: Dict[str, int] = {}
        self._closed = False

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> CameraAgent:
        cfg = self.config
        self.card: Dict[str, Any] = json.loads((cfg.model_dir / "card.json").read_text())
        self.detector = Detector.from_card(cfg.model_dir, "edge", threads=cfg.threads)
        edge = self.card["models"]["edge"]
        height, width = self.detector.input_hw
        # Per detector run: its MACs and, as the bytes it moves, its weights (float32) and the frame.
        costs = {
            "blocks": {"edge": {"macs": edge["macs"], "bytes_moved": 4 * edge["params"] + height * width}}
        }
        self.energy = DeviceEnergy(cfg.meters, cfg.meter_options, costs)
        try:
            self._start_parts()
        except BaseException:
            self._teardown()
            raise
        return self

    def _start_parts(self) -> None:
        cfg = self.config
        self.session.open(self._on_reply, tick_s=0.05)
        if self.session.has_run_before():
            # Frames are not tracked like a dataset's items: a second start would record every frame again.
            raise ValueError(
                f"run id {self.run_id!r} has run on this device before: a camera run is not resumed"
            )
        self.outbox, self.link, self.sink = self.session.outbox, self.session.link, self.session.sink
        self._frames = self.session.counter("sample")
        self._windows = self.session.counter("window")
        self.link.hooks.append(lambda connected: self.sink.flush(block=False))
        self.session.connect(
            lambda: run_record(
                cfg,
                self.run_id,
                policy=cfg.method,
                params={
                    "detect_every": cfg.detect_every,
                    "cloud_every": cfg.cloud_every,
                    "extra_delay_ms": cfg.extra_delay_ms,
                    "fps": cfg.fps,
                },
                meter=self.energy.source,
                providers=self.detector.session.get_providers(),
                task="video",
            ).to_map()
        )
        idle = self.energy.measure_idle(cfg.idle_seconds)
        if idle is not None:
            self.session.emit_once(
                "idle_baseline", baseline_record(idle, self.run_id, self.device_id).to_map()
            )

    def close(self) -> CameraSummary:
        """Records to the outbox, `run_end`, the outbox drained (bounded); closed even when that fails."""
        if self._closed:
            return self.summary
        self._closed = True
        try:
            self.outbox_left = self.session.finish(
                lambda count: RunEndRecord(self.run_id, self.device_id, time.time(), count).to_map()
            )
        finally:
            self._teardown()
        return self.summary

    def _teardown(self) -> None:
        try:
            self.session.close()
        finally:
            self.energy.close()

    def __enter__(self) -> CameraAgent:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the frames -----------------------------------------------------------------------------------
    def run(self, clips: Iterable[Clip], stop: Optional[threading.Event] = None) -> CameraSummary:
        """Every frame of every clip through the loop, paced at `fps`; a new loop (fresh state) per clip."""
        stop = stop or threading.Event()
        started = time.monotonic()
        for clip, frames in clips:
            loop = self._new_loop()
            clip_start = time.monotonic()
            window: Optional[OpenWindow] = None
            members: List[_FrameState] = []
            for index, frame in enumerate(frames):
                if stop.is_set():
                    break
                if self.config.fps > 0:
                    due = clip_start + index / self.config.fps
                    wait = due - time.monotonic()
                    if wait > 0:
                        stop.wait(wait)
                    else:
                        self.summary.behind_s = max(self.summary.behind_s, -wait)
                if window is None:
                    window, members = self.energy.open_window(), []
                state = self._frame(loop, clip, index, np.ascontiguousarray(frame))
                window.add(state.compute_s)
                members.append(state)
                if self._due(window):
                    closing = window
                    window = None
                    self._close_window(closing, members)
            if window is not None:
                self._close_window(window, members)
            if stop.is_set():
                break
        self.summary.seconds = time.monotonic() - started
        self.sink.flush(block=True)
        return self.summary

    def _due(self, window: OpenWindow) -> bool:
        cfg = self.config
        return window.count >= cfg.window_size or time.monotonic() - window.opened >= cfg.window_max_s

    def _new_loop(self) -> Any:
        cfg = self.config
        loop_config = LoopConfig(
            detect_every=1 if cfg.method == "edge-only" else cfg.detect_every, cloud_every=cfg.cloud_every
        )
        with self._lock:  # answers of an earlier clip are for frames that no longer exist
            self.summary.late += len(self._arrived)
            self._arrived = []
            self._sent.clear()
        if cfg.method == "cloud-only":
            return CloudOnlyLoop(config=loop_config)
        return DeviceLoop(lambda _i, f: self.detector.detect(f), config=loop_config)

    def _frame(self, loop: Any, clip: int, index: int, frame: np.ndarray) -> _FrameState:
        now = time.monotonic()
        answer_frame = answer_ms = cloud_ms = None
        bytes_down = 0
        for sent_frame, dets, latency_ms, cloud, size in self._answers_due(now):
            loop.on_cloud_answer(sent_frame, dets)
            answer_frame, answer_ms, cloud_ms, bytes_down = sent_frame, latency_ms, cloud, bytes_down + size
        for sent_frame in self._given_up(now):
            loop.on_cloud_lost(sent_frame)
        t0 = time.perf_counter()
        output = loop.process(index, frame)
        compute_s = time.perf_counter() - t0
        seq = self._frames.take()
        bytes_up = 0
        if self.config.uses_cloud and loop.want_offload(index):
            bytes_up = self._offload(clip, index, seq, frame)
            if bytes_up:
                loop.mark_sent(index)
        self.summary.add_frame(compute_s * 1000.0)
        dets = output.detections
        boxes = [
            [round(float(v), 2) for v in box] + [round(float(score), 4), int(label)]
            for box, score, label in zip(dets.boxes, dets.scores, dets.labels)
        ]
        record = FrameRecord(
            run_id=self.run_id,
            device_id=self.device_id,
            seq=seq,
            sequence=clip,
            frame=index,
            source=output.source,
            boxes=boxes,
            edge_ms=compute_s * 1000.0,
            sent=1 if bytes_up else 0,
            bytes_up=bytes_up,
            bytes_down=bytes_down,
            answer_frame=answer_frame,
            answer_ms=answer_ms,
            cloud_ms=cloud_ms,
            device_j_gross=None,
            device_j_net=None,
            device_j_analytic=self.energy.analytic_j(["edge"]) if loop.ran_detector else 0.0,
            energy_source=self.energy.source,
            ts_unix=time.time(),
        ).to_map()
        return _FrameState(record, compute_s)

    def _close_window(self, window: OpenWindow, members: List[_FrameState]) -> None:
        energy = window.close()
        seq = self._windows.take()
        if energy.window is not None:
            record = window_record(energy.window, self.run_id, self.device_id, seq).to_map()
            self.sink.add(Finished(entry_key("energy_window", self.run_id, self.device_id, seq), record))
        for state, (gross_j, net_j) in zip(members, energy.per_inference):
            state.record["device_j_gross"], state.record["device_j_net"] = gross_j, net_j
            key = entry_key("frame", self.run_id, self.device_id, state.record["seq"])
            self.sink.add(Finished(key, state.record, counted=True))

    # -- the cloud ------------------------------------------------------------------------------------
    def _offload(self, clip: int, index: int, seq: int, frame: np.ndarray) -> int:
        """Publish the frame; its size in bytes, or 0 when there is no connection now."""
        cfg = self.config
        payload = encode_offload(
            OffloadRequest(self.run_id, self.device_id, seq, frame[None], time.time_ns())
        )
        corr = correlation(self.run_id, seq)
        wait_s = cfg.deadline_s + cfg.extra_delay_ms / 1000.0
        props = publish_properties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=cfg.topics.reply(self.device_id),
            correlation_data=corr,
            expiry_s=max(1, math.ceil(cfg.deadline_s)),
        )
        now = time.monotonic()
        with self._lock:
            self._sent[corr] = _Sent(clip, index, now, now + wait_s)
        if self.link.publish(cfg.topics.frames(self.device_id), payload, props) is None:
            with self._lock:
                self._sent.pop(corr, None)
            return 0
        self.summary.sent += 1
        return len(payload)

    def _on_reply(self, corr: Optional[bytes], payload: bytes) -> None:
        """A cloud answer (paho's thread): held until its injected delay has passed. A worker's refusal
        gives its frame up now (the next frame may go), rather than at the deadline."""
        if is_refusal(payload):
            with self._lock:
                sent = self._sent.get(corr or b"")
                if sent is not None:
                    sent.due_mono = 0.0  # `_given_up` takes it on the next turn
                    self.summary.refused += 1
            return
        try:
            reply = decode_detections(payload)
        except ProtocolError as exc:
            logger.warning("bad detections reply: %s", exc)
            return
        with self._lock:
            sent = self._sent.pop(corr or b"", None)
            if sent is None:
                self.summary.late += 1
                return
            self.summary.answered += 1
            available = max(time.monotonic(), sent.sent_mono + self.config.extra_delay_ms / 1000.0)
            dets = Detections(reply.boxes, reply.scores, reply.labels, [])
            self._arrival_no += 1
            heapq.heappush(
                self._arrived,
                (available, self._arrival_no, sent.frame, dets, sent.sent_mono, reply.cloud_ms, len(payload)),
            )

    def _answers_due(self, now: float) -> List[Tuple[int, Detections, float, float, int]]:
        out = []
        with self._lock:
            while self._arrived and self._arrived[0][0] <= now:
                _, _, frame, dets, sent_mono, cloud_ms, size = heapq.heappop(self._arrived)
                out.append((frame, dets, (now - sent_mono) * 1000.0, cloud_ms, size))
        return out

    def _given_up(self, now: float) -> List[int]:
        with self._lock:
            late = [corr for corr, s in self._sent.items() if s.due_mono <= now]
            frames = [self._sent.pop(corr).frame for corr in late]
        self.summary.lost += len(frames)
        return frames
