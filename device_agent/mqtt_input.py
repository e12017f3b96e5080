"""An MQTT input source: images that cameras and sensors publish to the device's `input` topic.

`MqttInput(agent)` before `agent.start()` subscribes the agent's own connection to `Topics.input(device)` (QoS
0: a frame the broker got while the agent was away is not worth keeping, and the broker does not pile them
up for us). Who may publish there: the device's account and its sensor account `sensor-<device>` (the
broker's ACL, broker/edgecascade.acl and `broker.dynsec.sensor_role`).

Back-pressure. paho's thread only appends the payload to a bounded queue (`queue_size` messages and
`queue_bytes` bytes, each message at most `sources.MAX_FILE_BYTES`): memory stays bounded whatever the
publishers do. When the queue is full the oldest waiting image is dropped, counted and logged (a live source
wants its freshest picture answered); a slower device thus keeps up by dropping, never by growing. `serve`
takes images off the queue, decodes them with Pillow (`sources.decode_image`: the header is checked against
the model's size before a pixel is decoded; a `.npy` payload is a raw sample of the card's dtype and shape,
e.g. a sensor's int16 window) and submits each to the agent, which blocks while its own queue
is full: each accepted image gets exactly one result record; one that cannot be decoded is counted by reason.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from typing import Any, Deque, Dict, Optional

from device_agent.runs import LiveTally, RunSummary
from device_agent.sources import MAX_FILE_BYTES, ImageError, ImageSizeError, decode_image

logger = logging.getLogger(__name__)

QUEUE_SIZE = 64  # images waiting at most; ~0.1 s of a small model's work on a Jetson
QUEUE_BYTES = 16 * 1024 * 1024
DROP_LOG_S = 10.0  # drops are logged at most this often (with their count since)


class MqttInput:
    """The device's `input` topic as a source of samples; `stats` counts what came and what became of it."""

    kind = "mqtt"

    def __init__(self, agent: Any, *, queue_size: int = QUEUE_SIZE, queue_bytes: int = QUEUE_BYTES) -> None:
        if queue_size < 1 or queue_bytes < 1:
            raise ValueError(
                f"queue_size and queue_bytes must be at least 1, got {queue_size}, {queue_bytes}"
            )
        self.agent = agent
        self.queue_size = queue_size
        self.queue_bytes = queue_bytes
        self.topic = agent.config.topics.input(agent.device_id)
        self._queue: Deque[bytes] = collections.deque()
        self._bytes = 0
        self._ready = threading.Condition()
        self.stats: Dict[str, int] = {
            "received": 0,  # messages that reached us
            "accepted": 0,  # decoded and submitted: each gets one result record
            "dropped": 0,  # dropped from a full queue (the device was slower than its publishers)
            "high_water": 0,  # most messages ever waiting at once (<= queue_size)
            "high_water_bytes": 0,
        }
        self._bad: Dict[str, int] = {"too_large": 0, "undecodable": 0, "shape": 0}
        self._dropped_logged = 0
        self._drop_logged_at = 0.0
        self._bad_unlogged = 0
        self._bad_logged_at = -DROP_LOG_S
        agent.listen(self.topic, self._on_message)

    # -- paho's thread: never blocks ---------------------------------------------------------------------
    def _on_message(self, topic: str, payload: bytes) -> None:
        with self._ready:
            self.stats["received"] += 1
            if len(payload) > MAX_FILE_BYTES:
                self._bad["too_large"] += 1
                return
            while self._queue and (
                len(self._queue) >= self.queue_size or self._bytes + len(payload) > self.queue_bytes
            ):
                self._bytes -= len(self._queue.popleft())
                self.stats["dropped"] += 1
            self._queue.append(payload)
            self._bytes += len(payload)
            self.stats["high_water"] = max(self.stats["high_water"], len(self._queue))
            self.stats["high_water_bytes"] = max(self.stats["high_water_bytes"], self._bytes)
            self._ready.notify()

    def depth(self) -> int:
        """Messages waiting now."""
        with self._ready:
            return len(self._queue)

    def bad_by_reason(self) -> Dict[str, int]:
        """Messages refused, by reason: too_large, undecodable (not PNG/PGM/JPEG, corrupt), shape (another
        size than the model's)."""
        with self._ready:
            return dict(self._bad)

    # -- the consumer ------------------------------------------------------------------------------------
    def _take(self, stop: threading.Event) -> Optional[bytes]:
        with self._ready:
            while not self._queue:
                if stop.is_set():
                    return None
                self._ready.wait(0.2)
            payload = self._queue.popleft()
            self._bytes -= len(payload)
            return payload

    def serve(self, stop: threading.Event) -> RunSummary:
        """Run each image that arrives until `stop` is set; a summary of them once their records are on disk
        (what is still queued at the stop is left: a live source's backlog)."""
        agent = self.agent
        tally = LiveTally(agent.new_summary())
        while True:
            self._log_drops()
            payload = self._take(stop)
            if payload is None:
                break
            try:
                decoded = decode_image(
                    payload, agent.input_shape, f"message on {self.topic}", dtype=agent.input_dtype
                )
            except ImageError as exc:
                reason = "shape" if isinstance(exc, ImageSizeError) else "undecodable"
                with self._ready:
                    self._bad[reason] += 1
                self._log_bad(exc)
                continue
            tally.track(agent.submit(decoded.image, decoded.label))
            with self._ready:
                self.stats["accepted"] += 1
        summary = tally.wait()
        self._log_drops(force=True)
        agent.report_into(summary)
        return summary

    def _log_bad(self, exc: ImageError) -> None:
        """The first bad message, then one line every DROP_LOG_S with the count since: a sensor sending junk
        must not flood the journal."""
        self._bad_unlogged += 1
        now = time.monotonic()
        if now - self._bad_logged_at >= DROP_LOG_S:
            logger.warning("%s (%d bad messages since the last report)", exc, self._bad_unlogged)
            self._bad_unlogged, self._bad_logged_at = 0, now

    def _log_drops(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._drop_logged_at < DROP_LOG_S:
            return
        with self._ready:
            dropped = self.stats["dropped"]
        if dropped > self._dropped_logged:
            logger.warning(
                "input %s: dropped %d images since the last report (%d in all): they came faster than "
                "this device answers them (queue of %d)",
                self.topic,
                dropped - self._dropped_logged,
                dropped,
                self.queue_size,
            )
            self._dropped_logged = dropped
        self._drop_logged_at = now
