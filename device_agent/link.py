"""The agent's MQTT connection: persistent session, status with Last Will, reply subscription, results pump.

- Client id = device id, MQTT 5, clean_start=False with a session expiry: the broker keeps the reply
  subscription (and replies queued for it) across reconnects of the agent.
- Last Will: retained `offline` on `status`; a retained `online` is published on every connect.
- Result records leave the outbox in batches (`encode_records`, QoS 1) and are deleted from it on PUBACK only.
  A batch on the wire when the connection drops is retransmitted by paho on reconnect (same packet id), so the
  pump never sends it a second time itself; a new process starts from the outbox (entries reset to pending).
- A background thread ticks every `tick_s` (or when woken): the agent's housekeeping hook (deadlines,
  flushing records into the outbox), then sending. Each tick takes the GIL and a SQLite transaction from
  the inference loop, so it is no more frequent than the deadlines' precision needs.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import msgpack
import paho.mqtt.client as mqtt

from device_agent.outbox import Outbox
from protocol import CONTENT_TYPE_RESULTS, Topics, encode_records
from protocol.mqtt import BrokerAddress, connect_properties, new_client, publish_properties

logger = logging.getLogger(__name__)

ReplyHandler = Callable[[Optional[bytes], bytes], None]


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
        max_batches_inflight: int = 8,
    ) -> None:
        self.address = address
        self.topics = topics
        self.device_id = device_id
        self.outbox = outbox
        self.results_batch = results_batch
        self.flush_s = flush_s
        self.tick_s = tick_s
        self.max_batches_inflight = max_batches_inflight
        self.connected = threading.Event()
        self.hooks: List[Callable[[bool], None]] = []  # called each tick with the connected flag
        self._on_reply = on_reply
        self._session_expiry_s = session_expiry_s
        self._reply_topic = topics.reply(device_id)
        # Batches on the wire: (paho's message info, outbox ids of its records). Polled, not matched in
        # on_publish: that callback runs under paho's own lock, which publish() also takes.
        self._batches: List[Tuple[mqtt.MQTTMessageInfo, List[int], int]] = []  # info, outbox ids, records
        self._requeue_batches = False  # set on a reconnect without session (paho thread), read by ours
        self._refused: Dict[int, float] = {}  # packet id -> when the broker refused it (PUBACK >= 0x80)
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._flush_all = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self.stats = {"connects": 0, "disconnects": 0, "batches": 0, "records_sent": 0, "rejected_batches": 0}
        self.client = new_client(address, device_id, on_connect=self._on_connect)
        self.client.will_set(topics.status(device_id), b"offline", qos=1, retain=True)
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        self.client.message_callback_add(self._reply_topic, self._on_message)

    # -- lifecycle ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Connect in the background (a broker that is down now is retried: the outbox holds the data)."""
        self.client.connect_async(
            self.address.host,
            self.address.port,
            keepalive=15,
            clean_start=False,
            properties=connect_properties(self._session_expiry_s),
        )
        self.client.loop_start()
        self._thread = threading.Thread(target=self._run, name=f"link-{self.device_id}", daemon=True)
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

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
            info = self.client.publish(self.topics.status(self.device_id), b"offline", qos=1, retain=True)
            with contextlib.suppress(RuntimeError, ValueError):
                info.wait_for_publish(2)
        self.client.disconnect()
        self.client.loop_stop()

    def wake(self) -> None:
        self._wake.set()

    # -- paho callbacks (network thread) --------------------------------------------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            return
        self.stats["connects"] += 1
        logger.info("%s connected (session present: %s)", self.device_id, flags.session_present)
        # Subscribe even when the session is present: a broker that lost its state (SIGKILL before its
        # autosave) reports no session, and re-subscribing an existing subscription is harmless.
        client.subscribe(self._reply_topic, qos=1)
        if not flags.session_present:
            # A broker that lost our session may never acknowledge batches sent before: send them again from
            # the outbox (the collector's unique key makes a second copy harmless).
            self._requeue_batches = True
        client.publish(self.topics.status(self.device_id), b"online", qos=1, retain=True)
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

    def _settle_batches(self) -> None:
        """Acknowledge (delete) the records of batches the broker has PUBACKed; put refused ones back."""
        still = []
        for info, ids, count in self._batches:
            if not info.is_published():
                still.append((info, ids, count))
            elif self._refused.pop(info.mid, None) is not None:
                self.stats["rejected_batches"] += 1
                logger.error("broker refused a batch of %d records; will retry", len(ids))
                self.outbox.release(ids)
            else:
                self.stats["records_sent"] += count
                self.outbox.ack(ids)
        self._batches = still
        now = time.monotonic()
        for mid, when in list(self._refused.items()):
            if now - when > 10.0:  # refusals of offloads/status: nothing waits for them
                self._refused.pop(mid, None)

    def _send_records(self) -> None:
        if self._requeue_batches:
            self._requeue_batches = False
            for _, ids, _ in self._batches:
                self.outbox.release(ids)
            self._batches = []
        self._settle_batches()
        while len(self._batches) < self.max_batches_inflight:
            waiting = self.outbox.counts()["record"] - sum(count for _, _, count in self._batches)
            if waiting <= 0:
                return
            if waiting < self.results_batch and not self._flush_all.is_set():
                oldest = self.outbox.oldest_pending("record")
                if oldest is None or time.time() - oldest < self.flush_s:
                    return
            entries = self.outbox.take("record", self.results_batch)
            if not entries:
                return
            records = [r for e in entries for r in msgpack.unpackb(e.payload, raw=False)]
            payload = encode_records(records)
            info = self.client.publish(
                self.topics.results(self.device_id),
                payload,
                qos=1,
                properties=publish_properties(content_type=CONTENT_TYPE_RESULTS),
            )
            self._batches.append((info, [e.id for e in entries], len(records)))
            self.stats["batches"] += 1
