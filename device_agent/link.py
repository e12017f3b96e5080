"""The agent's MQTT connection: persistent session, status with Last Will, reply subscription, results pump.

- Client id = device id, MQTT 5, clean_start=False with a session expiry: the broker keeps the reply
  subscription (and replies queued for it) across reconnects of the agent.
- Status (`protocol.status`, JSON): the Last Will is a retained `offline`; a retained `online`, with the
  device's latest drift verdict (`set_drift`) and model status (`set_model`), is published on every connect
  and whenever either changes.
- Result records leave the outbox in batches (`encode_records`, QoS 1). With receipts (the default) each
  batch carries a token (CorrelationData) and our `receipts` topic (ResponseTopic); the collector answers
  once the batch is committed, and only then are its records deleted. A receipt says how many records were
  stored and how many refused (the collector keeps those in its `rejected_records` table, with the reason):
  refusals are logged as errors and counted (`refused_records`), never taken for stored. A broker PUBACK
  alone is not enough: a broker killed before its autosave forgets what it acknowledged. A batch with no
  receipt within `receipt_timeout_s` after its PUBACK is sent again (the timeout doubles while receipts stay
  away, so a collector that is down does not make us flood the broker); the collector's unique keys make a
  second copy write nothing. Without receipts (no collector in the loop) records are deleted on PUBACK.
- A batch on the wire when the connection drops is retransmitted by paho on reconnect (same packet id); after
  a reconnect without session every unsettled batch goes back to the outbox; a new process starts from the
  outbox (entries reset to pending).
- A background thread ticks every `tick_s` (or when woken): the agent's housekeeping hook (deadlines,
  flushing records into the outbox), then sending. Each tick takes the GIL and a SQLite transaction from
  the inference loop, so it is no more frequent than the deadlines' precision needs.
"""

from __future__ import annotations

import collections
import contextlib
import itertools
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Deque, Dict, List, Optional, Tuple

import msgpack
import paho.mqtt.client as mqtt

from device_agent.outbox import Outbox
from protocol import CONTENT_TYPE_RESULTS, ProtocolError, Topics, decode_receipt, encode_records
from protocol.capabilities import BrokerOffer, RoleNeeds, refusal, session_note
from protocol.mqtt import (
    BrokerAddress,
    BrokerUnusable,
    connect_properties,
    new_client,
    permanent_connack_refusal,
    publish_properties,
)
from protocol.status import CONTENT_TYPE_STATUS, DeviceStatus, DriftStatus, ModelStatus, encode_status

logger = logging.getLogger(__name__)

ReplyHandler = Callable[[Optional[bytes], bytes], None]
MAX_RECEIPT_TIMEOUT_S = 600.0


@dataclass
class _Batch:
    """A results message sent and not yet settled."""

    info: mqtt.MQTTMessageInfo  # paho's handle: is_published() once the broker PUBACKed it
    ids: List[int]  # outbox ids of its entries
    records: int
    acked_at: Optional[float] = None  # monotonic time of the PUBACK (receipt mode: the receipt is still due)


class Link:
    """One device's connection to the broker. `on_reply(correlation_data, payload)` runs on paho's thread."""

    def __init__(
        self,
        address: BrokerAddress,
        topics: Topics,
        device_id: str,
        outbox: Outbox,
        on_reply: ReplyHandler,
        *,
        session_expiry_s: int = 3600,
        results_batch: int = 100,
        flush_s: float = 0.2,
        tick_s: float = 0.1,
        max_batches_inflight: int = 16,
        receipts: bool = True,
        receipt_timeout_s: float = 30.0,
    ) -> None:
        self.address = address
        self.topics = topics
        self.device_id = device_id
        self.outbox = outbox
        self.results_batch = results_batch
        self.flush_s = flush_s
        self.tick_s = tick_s
        self.max_batches_inflight = max_batches_inflight
        self.receipts = receipts
        self.receipt_timeout_s = receipt_timeout_s
        self.connected = threading.Event()
        self.hooks: List[Callable[[bool], None]] = []  # called each tick with the connected flag
        self._listening: List[str] = []  # topic filters read besides our own (`listen`)
        self._subscribed: Dict[str, int] = {}  # filters subscribed while running (`subscribe`), with QoS
        self._on_reply = on_reply
        self._session_expiry_s = session_expiry_s
        self._reply_topic = topics.reply(device_id)
        self._receipts_topic = topics.receipts(device_id)
        # Unsettled batches by token. PUBACKs are polled, not matched in on_publish: that callback runs under
        # paho's own lock, which publish() also takes. Receipts arrive on paho's thread into a deque.
        self._batches: Dict[bytes, _Batch] = {}
        self._token_prefix = os.urandom(8)  # so that receipts meant for an earlier process match nothing
        self._token_seq = itertools.count()
        self._receipts_in: Deque[Tuple[bytes, bytes]] = collections.deque()  # (token, payload)
        self.last_error: Optional[str] = None  # why the last connection attempt failed
        self.refused: Optional[str] = None  # set while the broker refuses our login for good (CONNACK)
        # The largest payload we publish (an offload: the sample's bytes), set by the agent before `start`:
        # a broker whose MaximumPacketSize is smaller is refused at connect.
        self.largest_payload_bytes = 0
        self._receipt_wait_s = receipt_timeout_s  # current timeout: doubles while receipts stay away
        self._backed_off_at = 0.0  # when it last doubled: at most once per timeout period
        self._warned_no_receipts = False
        self._requeue_batches = False  # set on a reconnect without session (paho thread), read by ours
        self._refused: Dict[int, float] = {}  # packet id -> when the broker refused it (PUBACK >= 0x80)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_all = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = {
            "connects": 0,
            "disconnects": 0,
            "batches": 0,
            "records_sent": 0,  # settled: receipted (or PUBACKed without receipts)
            "rejected_batches": 0,
            "resent_batches": 0,  # no receipt in time: sent again
            "stray_receipts": 0,  # receipts for batches already settled or from an earlier process
            "refused_records": 0,  # records the collector could not store (see its rejected_records)
            "bad_receipts": 0,
        }
        self.client = new_client(address, device_id, on_connect=self._on_connect)
        self._drift: Optional[DriftStatus] = None  # the latest verdict, for the status of every connect
        self._model: Optional[ModelStatus] = None  # the model served and its agreement (`set_model`)
        self._status_props = publish_properties(content_type=CONTENT_TYPE_STATUS)
        self.client.will_set(
            topics.status(device_id), encode_status(DeviceStatus("offline")), qos=1, retain=True
        )
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.message_callback_add(self._reply_topic, self._on_message)
        self.client.message_callback_add(self._receipts_topic, self._on_receipt)

    @classmethod
    def for_config(cls, config: Any, outbox: Outbox, on_reply: ReplyHandler, tick_s: float) -> Link:
        """The link of an agent's config (`AgentConfig` or `CameraConfig`: the same names)."""
        return cls(
            config.broker,
            config.topics,
            config.device_id,
            outbox,
            on_reply,
            session_expiry_s=config.session_expiry_s,
            results_batch=config.results_batch,
            flush_s=config.flush_s,
            receipts=config.results_receipts,
            receipt_timeout_s=config.receipt_timeout_s,
            tick_s=tick_s,
        )

    def listen(self, topic_filter: str, handler: Callable[[str, bytes], None]) -> None:
        """Before `start`: also read `topic_filter` (the workers' load), at QoS 0: news our session kept while
        we were away would be old. `handler(topic, payload)` runs on paho's thread."""
        self._listening.append(topic_filter)
        self.client.message_callback_add(topic_filter, lambda c, u, m: handler(m.topic, bytes(m.payload)))

    def subscribe(self, topic_filter: str, handler: Callable[[str, bytes], None], qos: int = 1) -> None:
        """While running too: read `topic_filter` at `qos` until `unsubscribe` (e.g. a model file's chunks,
        `device_agent.rollout`), again after every reconnect; `handler` runs on paho's thread."""
        self.client.message_callback_add(topic_filter, lambda c, u, m: handler(m.topic, bytes(m.payload)))
        self._subscribed[topic_filter] = qos
        if self.connected.is_set():
            self.client.subscribe(topic_filter, qos)

    def unsubscribe(self, topic_filter: str) -> None:
        if self._subscribed.pop(topic_filter, None) is None:
            return
        self.client.message_callback_remove(topic_filter)
        if self.connected.is_set():
            self.client.unsubscribe(topic_filter)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect; a broker that is down now is retried in the background (the outbox holds the data).

        BrokerUnusable at once for what no retry heals: a failing TLS handshake (wrong CA, no TLS there)."""
        host, port = self.address.host, self.address.port
        try:
            # A first attempt in the foreground, to tell a broker that is down from one that cannot work.
            self.client.connect(
                host,
                port,
                keepalive=15,
                clean_start=False,
                properties=connect_properties(self._session_expiry_s),
            )
        except ssl.SSLError as exc:
            raise BrokerUnusable(f"TLS with {host}:{port} failed: {exc.reason or exc}") from None
        except socket.gaierror as exc:
            self.last_error = f"cannot resolve {host!r}: {exc.strerror}"
        except OSError as exc:
            self.last_error = f"{host}:{port}: {exc.strerror or exc}"
        self.client.loop_start()  # reconnects (with back-off) whether or not that first attempt worked
        self._thread = threading.Thread(target=self._run, name=f"link-{self.device_id}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        """True once connected; False after `timeout`, or as soon as the broker refuses our login for good."""
        deadline = time.monotonic() + timeout
        while not self.connected.wait(min(0.05, max(0.0, deadline - time.monotonic()))):
            if self.refused is not None or time.monotonic() >= deadline:
                return False
        return True

    def drain(self, timeout: float) -> bool:
        """Send every waiting record, partial batches included; True once the outbox holds no records."""
        self._flush_all.set()
        self._wake.set()
        return self.outbox.wait_empty("record", timeout)

    def close(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(5)
        if self.connected.is_set():
            # A clean disconnect does not fire the Will: say it ourselves.
            info = self._publish_status("offline")
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()

    def wake(self) -> None:
        self._wake.set()

    def set_drift(self, drift: Optional[DriftStatus]) -> None:
        """A new drift verdict: on the retained status now (when connected) and on each connect."""
        self._drift = drift
        if self.connected.is_set():
            self._publish_status("online")

    def set_model(self, model: Optional[ModelStatus]) -> None:
        """The model served and its agreement with the cloud: on the retained status now and each connect."""
        self._model = model
        if self.connected.is_set():
            self._publish_status("online")

    def _publish_status(self, state: str) -> mqtt.MQTTMessageInfo:
        # A clean goodbye still says which model it served (the Will, set at connect, cannot).
        payload = encode_status(DeviceStatus(state, self._drift if state == "online" else None, self._model))
        return self.client.publish(
            self.topics.status(self.device_id), payload, qos=1, retain=True, properties=self._status_props
        )

    def needs(self) -> RoleNeeds:
        """What this device needs of the broker: QoS 1, retain (its status and Last Will), wildcards when it
        listens to a filter (the workers' load), packets that hold its largest payload."""
        wildcards = any("+" in f or "#" in f for f in self._listening)
        return RoleNeeds(
            "device", retain=True, wildcards=wildcards, largest_payload_bytes=self.largest_payload_bytes
        )

    # -- paho callbacks (network thread) --------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        address = self.address
        if reason.is_failure:
            why = permanent_connack_refusal(reason)
            if why is not None and self.refused is None:
                self.refused = f"broker {address.host}:{address.port} refused {address.username!r}: {why}"
                logger.error("%s (retrying with back-off; the outbox keeps everything)", self.refused)
            self.last_error = str(reason)
            return
        offer = BrokerOffer.from_connack(props)
        unfit = refusal(offer, self.needs(), f"{address.host}:{address.port}")
        if unfit is not None:  # no retry makes it fit: say so once and leave (start() raises BrokerUnusable)
            if self.refused != unfit:
                logger.error("%s", unfit)
            self.refused = self.last_error = unfit
            client.disconnect()
            return
        note = session_note(offer, self._session_expiry_s)
        if note is not None:
            logger.warning("%s: %s", self.device_id, note)
        self.refused = None
        self.stats["connects"] += 1
        logger.info("%s connected (session present: %s)", self.device_id, flags.session_present)
        # Subscribe even when the session is present: a broker that lost its state (SIGKILL before its
        # autosave) reports no session, and re-subscribing an existing subscription is harmless.
        ours = [(self._reply_topic, 1)] + ([(self._receipts_topic, 1)] if self.receipts else [])
        client.subscribe(
            ours
            + [(topic_filter, 0) for topic_filter in self._listening]
            + list(dict(self._subscribed).items())
        )
        if not flags.session_present:
            # A broker that lost our session may never acknowledge (or deliver) batches sent before: send them
            # again from the outbox (the collector's unique key makes a second copy harmless).
            self._requeue_batches = True
        self._publish_status("online")
        self.connected.set()
        self._wake.set()

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if self.connected.is_set() and not self._stop.is_set():
            self.stats["disconnects"] += 1
            logger.warning("%s lost the broker (%s); keeping data in the outbox", self.device_id, reason)
        self.connected.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        # No wake-up here: acknowledged batches are settled on the next tick, which keeps this thread (and
        # its SQLite transactions) off the GIL while the inference loop runs flat out.
        if reason.is_failure:
            self._refused[mid] = time.monotonic()

    def _on_message(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        corr = getattr(message.properties, "CorrelationData", None)
        self._on_reply(corr, bytes(message.payload))

    def _on_receipt(self, client: mqtt.Client, userdata: Any, message: mqtt.MQTTMessage) -> None:
        token = getattr(message.properties, "CorrelationData", None)
        if token:
            self._receipts_in.append((bytes(token), bytes(message.payload)))

    # -- sending --------------------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes, properties: Any = None) -> Optional[int]:
        """QoS 1 publish while connected; the packet id, or None when there is no connection now."""
        if not self.connected.is_set():
            return None
        info = self.client.publish(topic, payload, qos=1, properties=properties)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            # paho keeps and resends it once reconnected, so this is still in flight.
            logger.debug("publish on %s while the connection dropped (rc %s)", topic, info.rc)
        return int(info.mid)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.tick_s)
            self._wake.clear()
            connected = self.connected.is_set()
            for hook in self.hooks:
                try:
                    hook(connected)
                except Exception:  # housekeeping must survive one bad turn; the error is logged
                    logger.exception("agent housekeeping failed")
            if connected:
                try:
                    self._send_records()
                except Exception:
                    logger.exception("sending records failed")

    def _take_receipts(self) -> None:
        while self._receipts_in:
            token, payload = self._receipts_in.popleft()
            if token not in self._batches:
                self.stats["stray_receipts"] += 1
                continue
            try:
                receipt = decode_receipt(payload)
            except ProtocolError as exc:  # not a receipt we can read: the batch goes again
                self.stats["bad_receipts"] += 1
                logger.warning("%s: unreadable receipt (%s)", self.device_id, exc)
                continue
            batch = self._batches.pop(token)
            if receipt.refused:
                self.stats["refused_records"] += receipt.refused
                logger.error(
                    "%s: the collector could not store %d of %d records (kept in its rejected_records "
                    "table): %s",
                    self.device_id,
                    receipt.refused,
                    batch.records,
                    receipt.reason,
                )
            self._settled(batch)
            self._receipt_wait_s = self.receipt_timeout_s

    def _settle_batches(self) -> None:
        """Delete the records of settled batches; put refused and unreceipted ones back in line."""
        now = time.monotonic()
        self._take_receipts()
        overdue = 0
        for token, batch in list(self._batches.items()):
            if batch.acked_at is None:
                if not batch.info.is_published():
                    continue
                if self._refused.pop(batch.info.mid, None) is not None:
                    self.stats["rejected_batches"] += 1
                    logger.error("broker refused a batch of %d records; will retry", batch.records)
                    self._unsend(token)
                elif self.receipts:
                    batch.acked_at = now
                else:
                    self._settled(self._batches.pop(token))
            elif now - batch.acked_at > self._receipt_wait_s:
                self._unsend(token)
                overdue += 1
        if overdue:
            self.stats["resent_batches"] += overdue
            logger.warning(
                "%s: no receipt for %d result batches in %.0fs (collector down, or the broker lost them); "
                "sending them again",
                self.device_id,
                overdue,
                self._receipt_wait_s,
            )
            if not self._warned_no_receipts and self.stats["records_sent"] == 0:
                self._warned_no_receipts = True
                logger.error(
                    "%s: the broker takes our result batches but no receipt has ever come back: is the "
                    "collector running, with receipts (and the broker's ACL allowing them)? "
                    "--no-receipts runs without",
                    self.device_id,
                )
            if now - self._backed_off_at >= self._receipt_wait_s:
                self._backed_off_at = now
                self._receipt_wait_s = min(2 * self._receipt_wait_s, MAX_RECEIPT_TIMEOUT_S)
        for mid, when in list(self._refused.items()):
            if now - when > 10.0:  # refusals of offloads/status: nothing waits for them
                self._refused.pop(mid, None)

    def _settled(self, batch: _Batch) -> None:
        self.stats["records_sent"] += batch.records
        self.outbox.ack(batch.ids)

    def _unsend(self, token: bytes) -> None:
        self.outbox.release(self._batches.pop(token).ids)

    def _send_records(self) -> None:
        if self._requeue_batches:
            self._requeue_batches = False
            self._take_receipts()  # what is already stored need not go again
            for token in list(self._batches):
                self._unsend(token)
        self._settle_batches()
        while len(self._batches) < self.max_batches_inflight:
            waiting = self.outbox.counts()["record"] - sum(b.records for b in self._batches.values())
            if waiting <= 0:
                return
            if waiting < self.results_batch and not self._flush_all.is_set():
                oldest = self.outbox.oldest_pending("record")
                if oldest is None or time.time() - oldest < self.flush_s:
                    return
            entries = self.outbox.take("record", self.results_batch)
            if not entries:
                return
            try:
                records = [r for e in entries for r in msgpack.unpackb(e.payload, raw=False)]
                token = self._token_prefix + next(self._token_seq).to_bytes(8, "big")
                properties = publish_properties(
                    content_type=CONTENT_TYPE_RESULTS,
                    response_topic=self._receipts_topic if self.receipts else None,
                    correlation_data=token if self.receipts else None,
                )
                info = self.client.publish(
                    self.topics.results(self.device_id), encode_records(records), qos=1, properties=properties
                )
            except BaseException:  # not on the wire: back in line (the error is logged by the tick)
                self.outbox.release([e.id for e in entries])
                raise
            self._batches[token] = _Batch(info, [e.id for e in entries], len(records))
            self.stats["batches"] += 1
