"""The operator's MQTT client: model files and manifests out, a group's history and the devices' status in.

One connection as the broker's `operator` account (the only role that may publish under `@models` and
`@model-files`: broker/edgecascade-roles.json). Everything it publishes is retained, QoS 1, and waited for
until the broker has acknowledged it; a PUBACK that refuses (not the operator account) is an error.

A group's history (`Topics.model_history`) is the operator's retained list of the last `HISTORY` signed
manifests it published there, newest last: `rollback` goes back to the one before the newest. It also lists
every file ever published for the group and not pruned yet: `prune` clears the retained chunks of those no
manifest in the histories uses any more (the broker would otherwise keep every version's files forever).
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Tuple

import paho.mqtt.client as mqtt

from edgecascade.rollout.bundles import Bundle
from protocol import ProtocolError
from protocol.bundle import CONTENT_TYPE_MANIFEST, SignedManifest, parse_unverified
from protocol.mqtt import (
    BrokerAddress,
    BrokerUnusable,
    new_client,
    permanent_connack_refusal,
    publish_properties,
)
from protocol.status import DeviceStatus, decode_status
from protocol.topics import Topics

logger = logging.getLogger(__name__)

HISTORY = 10
HISTORY_VERSION = 1


@dataclass
class History:
    """A group's history: its last signed manifests (oldest first) and its files' chunk counts (by sha256)."""

    manifests: List[bytes] = field(default_factory=list)
    files: Dict[str, int] = field(default_factory=dict)


class RolloutError(RuntimeError):
    """What an operator's command cannot do (nothing to roll back to, a refused publish...), in one line."""


class Operator:
    """`with Operator(address, topics) as op: op.publish(bundle, "canary")`."""

    def __init__(
        self,
        address: BrokerAddress,
        topics: Topics,
        timeout_s: float = 30.0,
        client_id: Optional[str] = None,
        history_size: int = HISTORY,
    ) -> None:
        self.history_size = history_size
        self.address = address
        self.topics = topics
        self.timeout_s = timeout_s
        self._cond = threading.Condition()
        self.lock = self._cond  # held while reading `statuses`
        self._retained: Dict[str, bytes] = {}
        self.statuses: Dict[str, DeviceStatus] = {}  # device -> its latest status (once `watch_status`)
        self.status_changes = 0
        self._refused: Dict[int, str] = {}
        self._connected = threading.Event()
        self._refusal: Optional[str] = None
        client_id = client_id or f"{address.username}-{uuid.uuid4().hex[:12]}"
        self.client = new_client(address, client_id, on_connect=self._on_connect)
        self.client.on_message = self._on_message
        self.client.on_publish = self._on_publish
        try:
            self.client.connect(address.host, address.port, keepalive=30)
        except OSError as exc:
            raise BrokerUnusable(f"broker {address.host}:{address.port}: {exc.strerror or exc}") from None
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        while not self._connected.wait(0.05):
            if self._refusal is not None or time.monotonic() > deadline:
                self.close()
                raise BrokerUnusable(self._refusal or f"no answer from {address.host}:{address.port}")

    def __enter__(self) -> Operator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    # -- paho's thread ---------------------------------------------------------------------------------
    def _on_connect(self, client: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        if reason.is_failure:
            why = permanent_connack_refusal(reason) or str(reason)
            self._refusal = f"broker refused {self.address.username!r}: {why}"
            return
        self._connected.set()

    def _on_message(self, client: Any, userdata: Any, message: mqtt.MQTTMessage) -> None:
        topic, payload = message.topic, bytes(message.payload)
        with self._cond:
            if topic.endswith("/status"):
                try:
                    self.statuses[self.topics.device_of(topic)] = decode_status(payload)
                    self.status_changes += 1
                except (ProtocolError, ValueError) as exc:
                    logger.warning("unreadable status on %s: %s", topic, exc)
            else:
                self._retained[topic] = payload
            self._cond.notify_all()

    def _on_publish(self, client: Any, userdata: Any, mid: int, reason: Any, props: Any) -> None:
        if reason.is_failure:
            self._refused[mid] = str(reason)

    # -- publishing ------------------------------------------------------------------------------------
    def _publish_all(self, messages: List[Tuple[str, bytes, Any]]) -> None:
        """Publish retained, QoS 1; return once the broker has acknowledged each (RolloutError if not)."""
        infos = [self.client.publish(t, p, qos=1, retain=True, properties=props) for t, p, props in messages]
        deadline = time.monotonic() + self.timeout_s
        for info, (topic, _, _) in zip(infos, messages):
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            if not info.is_published():
                raise RolloutError(f"the broker did not acknowledge {topic} within {self.timeout_s:g} s")
            refused = self._refused.pop(info.mid, None)
            if refused is not None:
                raise RolloutError(
                    f"the broker refused {topic} ({refused}): only the operator account may publish models"
                )

    def publish_files(self, bundle: Bundle) -> int:
        """Every file's chunks (retained): bytes published."""
        chunk = bundle.signed.manifest.chunk_bytes
        messages = []
        for entry in bundle.signed.manifest.files:
            data = bundle.data[entry.name]
            for index in range(entry.chunks(chunk)):
                piece = data[index * chunk : (index + 1) * chunk]
                if piece:  # an empty file has no chunk (an empty retained message would clear the topic)
                    messages.append((self.topics.model_chunk(entry.sha256, index), piece, None))
        self._publish_all(messages)
        return sum(len(m[1]) for m in messages)

    def publish(self, signed: SignedManifest, group: str) -> None:
        """`signed` as the group's manifest, and at the end of its history (its files must be out first)."""
        history = self._history(group)
        if not history.manifests or history.manifests[-1] != signed.payload:
            history.manifests.append(signed.payload)
        history.manifests = history.manifests[-self.history_size :]
        chunk = signed.manifest.chunk_bytes
        history.files.update({f.sha256: f.chunks(chunk) for f in signed.manifest.files})
        self._set(group, history, signed.payload)

    def rollback(self, group: str) -> Tuple[str, str]:
        """The group's manifest back to the version before the newest: (from version, to version)."""
        history = self._history(group)
        if len(history.manifests) < 2:
            raise RolloutError(
                f"group {group!r} has no earlier version to roll back to (history: {len(history.manifests)})"
            )
        bad = history.manifests.pop()
        self._set(group, history, history.manifests[-1])
        return parse_unverified(bad).version, parse_unverified(history.manifests[-1]).version

    def prune(self, groups: Iterable[str]) -> int:
        """Clear the retained chunks of the files published for `groups` that no manifest in their histories
        uses any more; how many files. Name every group: a file only another group still uses would go too."""
        histories = {group: self._history(group) for group in groups}
        used = {
            entry.sha256
            for history in histories.values()
            for payload in history.manifests
            for entry in parse_unverified(payload).files
        }
        stale = {sha: n for h in histories.values() for sha, n in h.files.items() if sha not in used}
        # An empty retained message clears the topic (devices ignore empty chunks).
        self._publish_all(
            [(self.topics.model_chunk(sha, i), b"", None) for sha, n in stale.items() for i in range(n)]
        )
        for group, history in histories.items():
            if set(history.files) & set(stale):
                history.files = {sha: n for sha, n in history.files.items() if sha not in stale}
                self._set(group, history, None)
        return len(stale)

    def _set(self, group: str, history: History, manifest: Optional[bytes]) -> None:
        """The group's history and (unless None) its manifest, history first: `rollback` reads it."""
        body = {
            "v": HISTORY_VERSION,
            "manifests": [m.decode() for m in history.manifests],
            "files": history.files,
        }
        messages: List[Tuple[str, bytes, Any]] = [
            (self.topics.model_history(group), json.dumps(body).encode(), None)
        ]
        if manifest is not None:
            props = publish_properties(content_type=CONTENT_TYPE_MANIFEST)
            messages.append((self.topics.model_manifest(group), manifest, props))
        self._publish_all(messages)

    # -- reading ---------------------------------------------------------------------------------------
    def retained(self, topics: List[str]) -> Dict[str, bytes]:
        """The retained message of each topic (absent: none), read with a barrier: once our own probe comes
        back, every retained message of the subscriptions before it has arrived."""
        probe = self.topics.operator_probe(uuid.uuid4().hex[:12])
        token = uuid.uuid4().bytes
        with self._cond:
            for topic in topics:  # what an earlier read saw may since have been cleared
                self._retained.pop(topic, None)
        self.client.subscribe([(t, 1) for t in topics] + [(probe, 1)])
        # The broker handles one connection's packets in order: the retained messages of the SUBSCRIBE
        # are on their way to us before it reads the probe.
        info = self.client.publish(probe, token, qos=1)
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while self._retained.get(probe) != token:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise RolloutError(f"no answer from the broker within {self.timeout_s:g} s")
                self._cond.wait(left)
            found = {t: self._retained[t] for t in topics if self._retained.get(t)}
        info.wait_for_publish(1.0)
        self.client.unsubscribe([*topics, probe])
        return found

    def history(self, group: str) -> List[bytes]:
        """The group's last signed manifests, oldest first (empty: nothing published there yet)."""
        return self._history(group).manifests

    def _history(self, group: str) -> History:
        topic = self.topics.model_history(group)
        payload = self.retained([topic]).get(topic)
        if not payload:
            return History()
        try:
            body = json.loads(payload)
            if body.get("v") != HISTORY_VERSION:
                raise ValueError(f"history version {body.get('v')!r}")
            files = {str(sha): int(n) for sha, n in dict(body.get("files", {})).items()}
            return History([str(m).encode() for m in body["manifests"]], files)
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise RolloutError(f"the history of group {group!r} is unreadable: {exc}") from None

    def watch_status(self) -> None:
        """From now on keep every device's latest status (`statuses`); retained ones arrive at once."""
        self.client.subscribe(self.topics.all_status, qos=1)

    def wait_status_change(self, since: int, timeout_s: float) -> int:
        """Block until a status arrives after change number `since` (or the timeout); the current number."""
        with self._cond:
            self._cond.wait_for(lambda: self.status_changes != since, timeout_s)
            return self.status_changes
