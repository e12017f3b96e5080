"""The cloud worker's MQTT connection, and the one thread that does all of its socket I/O.

The network thread reads every offload the moment it arrives, also while a batch computes (onnxruntime
releases the GIL, so reading costs the batch little): the offload's arrival time, its deadline and the
queue depth are then true, and the next batch is formed the instant the last one ends. It hands each
offload to the worker (`on_offload`, inside paho's callback). paho is driven by hand (`select` over its
socket and a wake-up socket, then `loop_read`/`loop_write`/`loop_misc`), and one lock admits one thread
into paho at a time: paho is not thread-safe outside its own `loop_start` mode, and a TLS socket must not
be read and written from two threads at once. The network thread holds it except while it waits in
`select`; a compute thread's `reply` or `ack` takes it when it is free and writes at once (no hand-off:
~0.3 ms less per reply on 2 cores, cloud_worker/worker.py), else leaves the item in a deque and wakes
the network thread, which sends it before it waits again.

The worker's load (`protocol.load`) is published from here every `load_interval_s`: retained, QoS 1,
expiring after three intervals; a will with an empty retained payload clears it if the worker dies, and a
clean stop clears it itself.

Sessions are clean (session expiry 0) on purpose. Mosquitto 2.0 round-robins a shared subscription over every
session in the group, connected or not: a crashed worker with a persistent session would keep being handed
a share of the offloads, to be delivered only if it ever came back. With a clean session the dead worker
leaves the group the moment its socket closes and the survivors get everything published after that; the
few requests that were in flight to it are lost with its session (Mosquitto 2.0 does not re-dispatch them
to the group), which the requester covers with its per-offload deadline (re-send, or fall back to the edge
answer). Measured on Mosquitto 2.0.11: see tests/test_cloud_worker_failover.py.

Connecting: a refused login that cannot heal (`protocol.mqtt.permanent_connack_refusal`) or a refused cloud
subscription stops the link with `fatal` set; every other failure is retried with exponential backoff
(0.5 s doubling to 8 s), also when the broker accepts the TCP connection and drops it before a CONNACK.
"""

from __future__ import annotations

import contextlib
import logging
import math
import select
import socket
import ssl
import threading
import time
from collections import deque
from typing import Any, Callable, Deque, Optional, Set, Tuple

import paho.mqtt.client as mqtt

from cloud_worker.config import BACKOFF_MAX_S, BACKOFF_MIN_S, WorkerConfig
from protocol.capabilities import BrokerOffer, RoleNeeds, refusal
from protocol.load import CONTENT_TYPE_LOAD
from protocol.mqtt import PublishProperties, connect_properties, new_client, permanent_connack_refusal

logger = logging.getLogger(__name__)

# Packets read before the outbox is looked at again: under a flood, replies still leave every few ms.
READ_BURST = 64
IDLE_TIMEOUT_S = 0.25
CLOSE_TIMEOUT_S = 2.0
# (topic or None for an acknowledgement alone, payload, properties, mid, qos, generation)
Outgoing = Tuple[Optional[str], bytes, Optional[PublishProperties], int, int, int]


class WorkerLink:
    """One worker's connection: `start()`, `reply()`/`ack()` from any thread, `leave()`, `close()`."""

    def __init__(
        self,
        config: WorkerConfig,
        client_id: str,
        subscription: str,
        receive_maximum: int,
        on_offload: Callable[[mqtt.MQTTMessage], None],
        load_payload: Callable[[], bytes],
        beat: Callable[[], None],
    ) -> None:
        self.config = config
        self.client_id = client_id
        self.subscription = subscription
        self.receive_maximum = receive_maximum
        self.load_topic = config.topics.cloud_load(config.worker_id)
        self._on_offload = on_offload
        self._load_payload = load_payload
        self._beat = beat
        self.generation = 0  # which connection delivered an offload: acks go only to that one
        self.subscribed = threading.Event()
        self.left = threading.Event()  # unsubscribed (or offline): no more offloads will come
        self.fatal: Optional[str] = None  # why the broker will never let this worker in
        self.loads_published = 0
        self.replies_refused = 0
        self.loads_refused = 0
        self._load_mids: Set[int] = set()
        self._connack_ok = False  # the current connection got a successful CONNACK
        self._leaving = False
        self._unsubscribe_sent = False
        self._closing = threading.Event()
        self._outbox: Deque[Outgoing] = deque()
        # Held by whichever thread is inside paho: the network thread except while it waits in select, or a
        # compute thread writing its replies. paho is then never entered by two threads at once.
        self._io = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._next_load = 0.0
        self._thread: Optional[threading.Thread] = None
        self.client = new_client(config.broker, client_id, on_connect=self._on_connect, manual_ack=True)
        self.client.on_message = lambda client, userdata, message: self._on_offload(message)
        self.client.on_subscribe = self._on_subscribe
        self.client.on_unsubscribe = lambda *args: self.left.set()
        self.client.on_disconnect = self._on_disconnect
        self.client.on_publish = self._on_publish
        if config.load_interval_s > 0:  # the broker clears the retained load if this connection dies
            self.client.will_set(self.load_topic, b"", qos=1, retain=True)

    # -- used by the worker (any thread) -------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"link-{self.client_id}", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def reply(
        self, topic: str, payload: bytes, props: PublishProperties, mid: int, qos: int, gen: int
    ) -> None:
        """Publish an answer (QoS 1), then acknowledge its offload: the broker sees the answer first."""
        self._hand_over((topic, payload, props, mid, qos, gen))

    def ack(self, mid: int, qos: int, generation: int) -> None:
        """Acknowledge an offload that gets no answer (refused, expired, failed)."""
        self._hand_over((None, b"", None, mid, qos, generation))

    def leave(self) -> None:
        """Unsubscribe from the group; `left` is set once the broker confirms (or the link is down)."""
        self._leaving = True
        self._wake()

    def close(self, timeout_s: float = CLOSE_TIMEOUT_S + 5.0) -> None:
        """Write what is handed over, clear the retained load, disconnect and end the thread."""
        self._closing.set()
        self._wake()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if not self.alive:
            self._wake_r.close()
            self._wake_w.close()

    def _hand_over(self, item: Outgoing) -> None:
        if threading.current_thread() is self._thread:
            self._send(item)  # inside paho's callback (the lock is held): paho queues it, the loop writes it
        elif self._io.acquire(blocking=False):
            try:  # the network thread is waiting in select: write it from here, no hand-off
                self._send(item)
                unwritten = self.client.want_write()
            finally:
                self._io.release()
            if unwritten:  # the socket was full: the network thread must wait for it to drain
                self._wake()
        else:  # the network thread is in paho: it sends this before it waits again
            self._outbox.append(item)
            self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):  # BlockingIOError: already awake (buffer full); or closed
            self._wake_w.send(b"\0")

    # -- the network thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self._serve_until_closed()
        except Exception:  # a bug here must be loud; systemd's watchdog restarts the service
            logger.exception("link of worker %s crashed", self.config.worker_id)
        finally:
            self.subscribed.clear()
            self.left.set()
            try:
                with self._io:
                    self.client.disconnect()
            except Exception:
                logger.debug("disconnect after stop failed", exc_info=True)

    def _serve_until_closed(self) -> None:
        connected, first, backoff_s = False, True, BACKOFF_MIN_S
        while True:
            self._beat()
            if self.fatal is not None:
                logger.error("worker %s stops: %s", self.config.worker_id, self.fatal)
                return
            if self._closing.is_set():
                if connected:
                    with self._io:
                        self._finish()
                return
            if not connected:
                if self._leaving:  # offline: nothing more will come
                    self.left.set()
                with self._io:
                    connected = self._connect(first)
                if connected:
                    first = False
                else:
                    self._closing.wait(backoff_s)
                    backoff_s = min(2 * backoff_s, BACKOFF_MAX_S)
                    continue
            rc = self._turn()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                connected = False
                self.subscribed.clear()
                if self.fatal is not None:
                    continue
                if self._connack_ok:  # a connection that worked: reconnect at once, backoff from the start
                    backoff_s = BACKOFF_MIN_S
                else:  # refused or dropped before CONNACK: the same would happen again right away
                    self._closing.wait(backoff_s)
                    backoff_s = min(2 * backoff_s, BACKOFF_MAX_S)
                if not self._closing.is_set():
                    logger.warning("worker %s lost the broker (%s); reconnecting", self.config.worker_id, rc)

    def _connect(self, first: bool) -> bool:
        props = connect_properties(0)  # clean session: see the module docstring
        props.ReceiveMaximum = self.receive_maximum
        self._connack_ok = False
        try:
            if first:
                self.client.connect(
                    self.config.broker.host,
                    self.config.broker.port,
                    keepalive=self.config.keepalive_s,
                    clean_start=True,
                    properties=props,
                )
            else:
                self.client.reconnect()
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

    def _turn(self) -> int:
        """One time round: hand paho the outbox, wait for traffic (or a wake-up) unlocked, then read,
        write and keep alive under the lock."""
        with self._io:
            self._drain_outbox()
            if self._leaving and not self._unsubscribe_sent and self.subscribed.is_set():
                self._unsubscribe_sent = True
                self.client.unsubscribe(self.subscription)
            now = time.monotonic()
            self._publish_load_if_due(now)
            sock = self.client.socket()
            if sock is None:
                return mqtt.MQTT_ERR_NO_CONN
            buffered = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            wlist = [sock] if self.client.want_write() else []
        timeout = 0.0 if buffered or self._outbox else IDLE_TIMEOUT_S
        if self.config.load_interval_s > 0 and self.subscribed.is_set():
            timeout = min(timeout, max(0.0, self._next_load - now))
        readable, writable, _ = select.select([sock, self._wake_r], wlist, [], timeout)
        if self._wake_r in readable:
            with contextlib.suppress(BlockingIOError):
                self._wake_r.recv(4096)
        rc: int = mqtt.MQTT_ERR_SUCCESS
        with self._io:
            if sock in readable or buffered:
                rc = self._read_burst()
            if rc == mqtt.MQTT_ERR_SUCCESS and self.client.want_write():
                rc = self.client.loop_write()  # acks queued inside callbacks, or a socket that was full
            if rc == mqtt.MQTT_ERR_SUCCESS:
                rc = self.client.loop_misc()
            if rc == mqtt.MQTT_ERR_SUCCESS:
                self._drain_outbox()  # what the compute threads handed over while this thread read
        return rc

    def _read_burst(self) -> int:
        """Read what the socket holds, at most READ_BURST packets, so that the outbox is not starved."""
        for _ in range(READ_BURST):
            rc: int = self.client.loop_read()
            if rc != mqtt.MQTT_ERR_SUCCESS:
                return rc
            sock = self.client.socket()
            if sock is None:
                return mqtt.MQTT_ERR_NO_CONN
            buffered = sock.pending() if isinstance(sock, ssl.SSLSocket) else 0
            if not buffered and not select.select([sock], [], [], 0)[0]:
                break
        return mqtt.MQTT_ERR_SUCCESS

    def _drain_outbox(self) -> None:
        while self._outbox:
            self._send(self._outbox.popleft())

    def _send(self, item: Outgoing) -> None:
        topic, payload, props, mid, qos, generation = item
        if topic is not None:
            self.client.publish(topic, payload, qos=1, properties=props)
        # A PUBACK for a message of an earlier connection would name a packet id the broker never sent here.
        if qos > 0 and generation == self.generation:
            self.client.ack(mid, qos)

    def _publish_load_if_due(self, now: float) -> None:
        interval = self.config.load_interval_s
        if interval <= 0 or not self.subscribed.is_set() or now < self._next_load:
            return
        self._next_load = now + interval
        # Stale figures must disappear: a load outlives three missed updates at most.
        props = PublishProperties(content_type=CONTENT_TYPE_LOAD, expiry_s=max(1, math.ceil(3 * interval)))
        info = self.client.publish(
            self.load_topic, self._load_payload(), qos=1, retain=True, properties=props
        )
        self._load_mids.add(info.mid)
        self.loads_published += 1

    def _finish(self) -> None:
        """Clean stop: what is handed over leaves, the retained load is cleared, then DISCONNECT."""
        self._drain_outbox()
        if self.config.load_interval_s > 0:
            self.client.publish(self.load_topic, b"", qos=1, retain=True)
        deadline = time.monotonic() + CLOSE_TIMEOUT_S
        while self.client.want_write() and time.monotonic() < deadline:  # a full socket: let it drain
            sock = self.client.socket()
            if sock is None or self.client.loop_write() != mqtt.MQTT_ERR_SUCCESS:
                return
            select.select([], [sock], [], 0.05)
        self.client.disconnect()

    def needs(self) -> RoleNeeds:
        """What this worker needs of the broker: its group's shared subscription (a wildcard filter),
        QoS 1, and retain when it publishes its load."""
        return RoleNeeds(
            "cloud worker",
            retain=self.config.load_interval_s > 0,
            wildcards="+" in self.subscription or "#" in self.subscription,
            shared_subscriptions=self.subscription.startswith("$share/"),
        )

    # -- MQTT callbacks (run inside paho's calls, on the network thread) ----------------------------
    def _on_connect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            why = permanent_connack_refusal(reason)
            if why is not None:
                self.fatal = (
                    f"the broker at {self.config.broker.host}:{self.config.broker.port} refused the login as "
                    f"{self.config.broker.username!r} with client id {self.client_id!r}: {why}"
                )
            return  # new_client logged it; otherwise the network thread retries with backoff
        broker = f"{self.config.broker.host}:{self.config.broker.port}"
        unfit = refusal(BrokerOffer.from_connack(props), self.needs(), broker)
        if unfit is not None:  # e.g. no $share/: ejabberd would close us on the SUBSCRIBE, again and again
            self.fatal = unfit
            return
        self._connack_ok = True
        self.generation += 1
        if self._leaving:  # stopping: do not join the group again
            self.left.set()
            return
        self._unsubscribe_sent = False
        # Clean session: the subscription must be made again on every connection.
        client.subscribe(self.subscription, qos=1)

    def _on_subscribe(self, client: mqtt.Client, userdata: Any, mid: int, reasons: Any, props: Any) -> None:
        if reasons and all(not r.is_failure for r in reasons):
            self._next_load = 0.0  # announce the load at once: devices see a new worker the moment it serves
            self.subscribed.set()
        else:
            # Only the cloud role may join the group: another account's subscription never succeeds.
            user = self.config.broker.username
            self.fatal = (
                f"the broker refused the subscription {self.subscription} to {user!r}: "
                f"{', '.join(str(r) for r in reasons or [])} (is it a cloud account?)"
            )

    def _on_disconnect(self, client: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        self.subscribed.clear()

    def _on_publish(self, client: mqtt.Client, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        was_load = mid in self._load_mids
        self._load_mids.discard(mid)
        if reason is None or not reason.is_failure:
            return
        if was_load:
            self.loads_refused += 1
            logger.warning("broker refused the load on %s: %s (the ACL?)", self.load_topic, reason)
        else:
            self.replies_refused += 1
            logger.warning("broker refused a reply (mid %d): %s", mid, reason)
