"""Offloads in flight: a bounded window, replies matched by CorrelationData, a deadline for each.

An offload is written to the outbox, then published at once when the broker is there (else when it comes
back). It is settled exactly once: by the first reply carrying its CorrelationData (`<run_id>/<seq>`), or by
its deadline, after which the agent answers with the edge and flags the sample `fallback`, or by a worker's
refusal (`OffloadRefusal`: its queue would answer too late), after which the agent answers with the edge at
once, flagged `shed`. A reply that arrives after that is counted as late and dropped; so is a second copy of
a reply (QoS 1 may deliver twice).
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
import typing
from dataclasses import dataclass
from typing import Any, Callable, Dict, Optional, Tuple

from device_agent.keys import correlation, entry_key
from device_agent.link import Link
from device_agent.outbox import Also, Outbox
from protocol import (
    CONTENT_TYPE_OFFLOAD,
    OffloadRefusal,
    OffloadReply,
    ProtocolError,
    Topics,
    decode_refusal,
    decode_reply,
    is_refusal,
)
from protocol.mqtt import publish_properties

logger = logging.getLogger(__name__)

# Correlation ids are remembered after settling, to tell late and repeated replies from strangers, for as
# long as a reply can still come: the broker drops an offload (and the worker its answer) at the expiry, so
# a few deadlines' worth is enough. At most SETTLED_MEMORY of them: the state stays bounded at any rate.
SETTLED_MEMORY = 10_000
REMEMBER_DEADLINES = 4


@dataclass
class Settled:
    """How an offload ended, handed to the agent."""

    sample: Any
    outbox_id: int
    reply: Optional[OffloadReply]  # None: the deadline passed first, or a worker refused it
    round_trip_ms: Optional[float] = None
    bytes_down: int = 0
    refusal: Optional[OffloadRefusal] = None


@dataclass
class _Pending:
    sample: Any
    outbox_id: int
    seq: int
    payload: bytes
    deadline_mono: float
    sent_mono: Optional[float] = None  # first send (round trips are measured from it)
    resent: bool = False
    spared: bool = False  # its re-send held back once: a live worker has it (counted once)


class OffloadTracker:
    """The device's offloads awaiting an answer. `on_settled` runs on the link's or paho's thread."""

    def __init__(
        self,
        link: Link,
        outbox: Outbox,
        topics: Topics,
        device_id: str,
        run_id: str,
        on_settled: Callable[[Settled], None],
        *,
        max_inflight: int = 64,
        deadline_s: float = 2.0,
        resend_s: Optional[float] = None,
        outbox_wait_s: Optional[float] = None,
        held_since: Optional[Callable[[float], float]] = None,
    ) -> None:
        self.link = link
        self.outbox = outbox
        self.run_id = run_id
        self.deadline_s = deadline_s
        self.outbox_wait_s = outbox_wait_s  # waiting for room in a full outbox, then OutboxFull
        # Sent once more when unanswered this long: a cloud worker that died with our request in flight
        # takes it with its clean session (see cloud_worker.worker); a survivor in the group answers the copy.
        self.resend_s = deadline_s / 2 if resend_s is None else resend_s
        # ... unless it was sent after `held_since(resend_s)`, which vouches that a live worker still holds it
        # (from the workers' loads: `CapacityRule.held_since`): a copy sent to workers that are merely busy
        # doubles their work and lengthens the queue every offload waits in.
        self._held_since = held_since
        self._topic = topics.offload(device_id)
        self._reply_topic = topics.reply(device_id)
        self._on_settled = on_settled
        self.max_inflight = max_inflight
        self._window = threading.BoundedSemaphore(max_inflight)
        self._lock = threading.Lock()
        self._pending: typing.OrderedDict[bytes, _Pending] = collections.OrderedDict()
        self._settling = 0  # out of `_pending`, their `on_settled` still running: not idle yet
        self._settled: typing.OrderedDict[bytes, Tuple[str, float]] = collections.OrderedDict()
        self._remember_s = REMEMBER_DEADLINES * deadline_s
        self.stats: Dict[str, int] = {
            "offloaded": 0,
            "answered": 0,
            "fallbacks": 0,
            "refused": 0,
            "late_replies": 0,
            "duplicate_replies": 0,
            "unknown_replies": 0,
            "bad_replies": 0,
            "window_waits": 0,
            "sent_on_reconnect": 0,
            "resent": 0,
            "resends_spared": 0,
        }

    def correlation(self, seq: int) -> bytes:
        return correlation(self.run_id, seq)

    def offload(
        self, sample: Any, seq: int, payload: bytes, partial_record: Dict[str, Any], also: Also = None
    ) -> None:
        """Queue one offload (blocks while the in-flight window is full) and send it if connected.

        On disk it is its fallback record (`meta`), which the next start records if this process dies
        first; the image stays in memory only, for the re-sends (nothing ever reads it back from disk)."""
        if not self._window.acquire(blocking=False):
            self.stats["window_waits"] += 1
            self._window.acquire()
        deadline_mono = time.monotonic() + self.deadline_s
        try:
            outbox_id = self.outbox.put(
                entry_key("offload", self.run_id, partial_record["device_id"], seq),
                "offload",
                self._topic,
                b"",
                meta=partial_record,
                deadline_unix=time.time() + self.deadline_s,
                timeout=self.outbox_wait_s,
                also=also,
            )
        except BaseException:  # not queued: its slot in the window is free again
            self._window.release()
            raise
        if outbox_id is None:  # this key was offloaded before: never twice
            self._window.release()
            raise ValueError(f"sample {seq} of run {self.run_id} was already offloaded")
        corr = self.correlation(seq)
        pending = _Pending(sample, outbox_id, seq, payload, deadline_mono)
        with self._lock:
            self._pending[corr] = pending
            self.stats["offloaded"] += 1
            # Claimed for sending under the lock, so the housekeeping thread never sends it a second time.
            send_now = self.link.connected.is_set()
            if send_now:
                pending.sent_mono = time.monotonic()
        if send_now:
            self._send(corr, pending)

    def _send(self, corr: bytes, pending: _Pending) -> None:
        """Publish a pending offload its caller has claimed (sent_mono set)."""
        left_s = pending.deadline_mono - time.monotonic()
        props = publish_properties(
            content_type=CONTENT_TYPE_OFFLOAD,
            response_topic=self._reply_topic,
            correlation_data=corr,
            expiry_s=max(1, math.ceil(left_s)),  # the broker drops it once nobody would use the answer
        )
        if self.link.publish(self._topic, pending.payload, props) is None:
            with self._lock:
                if not pending.resent:
                    pending.sent_mono = None  # the connection went in between: sent on the next connect

    # -- replies (paho's thread) ----------------------------------------------------------------------
    def on_reply(self, corr: Optional[bytes], payload: bytes) -> None:
        reply: Optional[OffloadReply] = None
        refusal: Optional[OffloadRefusal] = None
        try:
            if is_refusal(payload):
                refusal = decode_refusal(payload)
            else:
                reply = decode_reply(payload)
        except ProtocolError as exc:
            self.stats["bad_replies"] += 1
            logger.warning("bad reply on %s: %s", self._reply_topic, exc)
            return
        answer: Any = reply if reply is not None else refusal
        key = corr if corr is not None else self.correlation(answer.seq)
        with self._lock:
            pending = self._pending.pop(key, None)
            if pending is None:
                how = self._settled.get(key, ("", 0.0))[0]
                if how in ("fallback", "refused"):
                    self.stats["late_replies"] += 1  # the edge answer stands; this one is only counted
                elif how == "answered":
                    self.stats["duplicate_replies"] += 1  # QoS 1: at least once
                else:
                    self.stats["unknown_replies"] += 1
                return
            if answer.seq != pending.seq or answer.run_id != self.run_id:
                self._pending[key] = pending  # not this request's answer: keep waiting
                self.stats["bad_replies"] += 1
                logger.warning("reply for %s/%d came with correlation %r", answer.run_id, answer.seq, key)
                return
            how = "answered" if reply is not None else "refused"
            self._remember(key, how)
            self.stats[how] += 1
            self._settling += 1
        self._window.release()
        rtt_ms = None if pending.sent_mono is None else (time.monotonic() - pending.sent_mono) * 1000.0
        self._settle([Settled(pending.sample, pending.outbox_id, reply, rtt_ms, len(payload), refusal)])

    def _settle(self, outcomes: typing.List[Settled]) -> None:
        """Hand outcomes (counted in `_settling` by the caller, under the lock) to the agent."""
        try:
            for settled in outcomes:
                self._on_settled(settled)
        finally:
            with self._lock:
                self._settling -= len(outcomes)

    def _remember(self, key: bytes, how: str) -> None:
        now = time.monotonic()
        self._settled[key] = (how, now)
        while self._settled and (
            len(self._settled) > SETTLED_MEMORY
            or next(iter(self._settled.values()))[1] < now - self._remember_s
        ):
            self._settled.popitem(last=False)

    # -- housekeeping (the link's thread) -------------------------------------------------------------
    def tick(self, connected: bool) -> None:
        """Fall back where the deadline passed; send what waited for the broker."""
        held_since = math.inf if self._held_since is None else self._held_since(self.resend_s)
        now = time.monotonic()
        expired = []
        to_send = []
        with self._lock:
            for key, pending in list(self._pending.items()):
                if pending.deadline_mono <= now:
                    del self._pending[key]
                    self._remember(key, "fallback")
                    self.stats["fallbacks"] += 1
                    self._settling += 1
                    expired.append(pending)
                elif not connected:
                    continue
                elif pending.sent_mono is None:
                    pending.sent_mono = now
                    self.stats["sent_on_reconnect"] += 1
                    to_send.append((key, pending))
                elif not pending.resent and now - pending.sent_mono >= self.resend_s:
                    if pending.sent_mono > held_since:  # asked again each tick: a worker may go later
                        if not pending.spared:
                            pending.spared = True
                            self.stats["resends_spared"] += 1
                        continue
                    pending.resent = True
                    self.stats["resent"] += 1
                    to_send.append((key, pending))
        for _ in expired:
            self._window.release()
        self._settle([Settled(pending.sample, pending.outbox_id, None) for pending in expired])
        for key, pending in to_send:
            self._send(key, pending)

    def window_full(self) -> bool:
        """Whether an offload now would wait for a place in the in-flight window."""
        with self._lock:
            return len(self._pending) >= self.max_inflight

    def in_flight(self) -> int:
        """Offloads not yet settled: awaiting an answer, or being settled right now."""
        with self._lock:
            return len(self._pending) + self._settling

    def wait_idle(self, timeout: float) -> bool:
        """Wait until every offload is settled (answered or fallen back) and its record is with the sink."""
        deadline = time.monotonic() + timeout
        while self.in_flight():
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.01)
        return True
