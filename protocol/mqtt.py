"""paho-mqtt 2.x clients configured the one way every edgecascade service needs.

MQTT 5, `CallbackAPIVersion.VERSION2`, credentials, optional TLS, and TCP_NODELAY on every socket:
Nagle's algorithm against delayed ACKs costs 44-88 ms per QoS 1 round trip on loopback; without it 0.6 ms.
It is set in `on_connect` because every reconnect makes a new socket.
"""

from __future__ import annotations

import logging
import os
import socket
import ssl
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers

from protocol.capabilities import BrokerOffer, clamp_inflight

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BrokerAddress:
    """Where and as whom to connect."""

    host: str
    port: int
    username: str
    password: str
    tls_ca: Optional[str] = None

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise ValueError(f"broker port must be 1-65535, got {self.port}")
        if self.tls_ca is not None and not os.access(self.tls_ca, os.R_OK):
            raise ValueError(f"TLS CA certificate {self.tls_ca} does not exist or cannot be read")

    @classmethod
    def parse(
        cls, hostport: str, username: str, password: str, tls_ca: Optional[str] = None
    ) -> BrokerAddress:
        host, _, port = hostport.rpartition(":")
        if not host or not port.isdigit():
            raise ValueError(f"broker address must be host:port, got {hostport!r}")
        return cls(host, int(port), username, password, tls_ca)


class BrokerUnusable(RuntimeError):
    """A broker that retrying cannot make usable: a TLS handshake that fails, a login it refuses for good.
    Services exit with its message (status 2) instead of spinning on reconnects."""


def read_secret(path: Union[str, Path], what: str = "password") -> str:
    """The first line of a secret file (a password, a database URL), stripped; ValueError saying what is
    wrong with the file otherwise. The one reader of secret files: CLIs and systemd credentials use it."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ValueError(f"cannot read the {what} file {path}: {exc.strerror or exc}") from None
    lines = text.splitlines()
    secret = lines[0].strip() if lines else ""
    if not secret:
        raise ValueError(f"the {what} file {path} is empty: its first line must hold the {what}")
    return secret


# CONNACK reason codes (MQTT 5.0, 3.2.2.2) that no retry can turn into a session: the broker will give the
# same answer until someone changes its accounts or this client's configuration. Everything else (server
# unavailable or busy, quota or rate exceeded, an unspecified error) may heal by itself and is worth a retry
# with backoff. Mosquitto 2.0 answers a wrong password with 0x86 or 0x87, an unknown user or a client id the
# account is not bound to with 0x87.
_PERMANENT_CONNACK = {
    0x84: "the broker does not speak this MQTT version",
    0x85: "the broker refused the client id",
    0x86: "bad username or password",
    0x87: "not authorized (wrong password, unknown user, or a client id this account may not use)",
    0x8A: "this client is banned",
    0x8C: "the broker does not support this authentication method",
    # A broker without retain (Mosquitto's `retain_available false`) refuses a retained Last Will this way.
    0x9A: "the broker does not support retained messages (this client's Last Will is retained)",
    0x9B: "the broker does not support the QoS this client asked for",
}


def permanent_connack_refusal(reason: Any) -> Optional[str]:
    """Why a refused CONNACK cannot heal by retrying (a one-line explanation), or None when it may heal
    (or was no refusal at all). Takes paho's ReasonCode or a plain int. The one classification of CONNACK
    codes: every service decides on it whether to back off and retry or to exit with a clear message."""
    value = getattr(reason, "value", reason)
    if not isinstance(value, int):
        return None
    return _PERMANENT_CONNACK.get(value)


def set_nodelay(client: mqtt.Client) -> None:
    sock = client.socket()
    if isinstance(sock, socket.socket) or sock is not None and hasattr(sock, "setsockopt"):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def new_client(
    address: BrokerAddress,
    client_id: str,
    *,
    on_connect: Optional[Callable[..., Any]] = None,
    manual_ack: bool = False,
    max_inflight: int = 1000,
    max_queued: int = 0,
) -> mqtt.Client:
    """A configured, not yet connected MQTT 5 client; `on_connect` runs after TCP_NODELAY is set and our
    in-flight window is cut to the broker's ReceiveMaximum (`protocol.capabilities`)."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=manual_ack,
    )
    client.username_pw_set(address.username, address.password)
    if address.tls_ca:
        client.tls_set(ca_certs=address.tls_ca, tls_version=ssl.PROTOCOL_TLS_CLIENT)
    client.max_inflight_messages_set(max_inflight)
    client.max_queued_messages_set(max_queued)
    client.reconnect_delay_set(min_delay=1, max_delay=8)

    def _on_connect(c: mqtt.Client, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        set_nodelay(c)
        if reason.is_failure:
            logger.warning("%s: broker refused connection: %s", client_id, reason)
        else:
            clamp_inflight(c, BrokerOffer.from_connack(props), max_inflight)
        if on_connect is not None:
            on_connect(c, userdata, flags, reason, props)

    client.on_connect = _on_connect
    return client


def connect_properties(session_expiry_s: int) -> Properties:
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = session_expiry_s
    return props


def publish_properties(
    *,
    content_type: Optional[str] = None,
    response_topic: Optional[str] = None,
    correlation_data: Optional[bytes] = None,
    expiry_s: Optional[int] = None,
) -> PublishProperties:
    """The PUBLISH properties of the protocol (see `PublishProperties`): the one builder every client uses."""
    return PublishProperties(
        content_type=content_type,
        response_topic=response_topic,
        correlation_data=correlation_data,
        expiry_s=expiry_s,
    )


# -- PUBLISH properties that cost microseconds, not tens of them ---------------------------------------------
# paho's `Properties` validates every attribute against a 27-entry table by string munging and packs by
# walking that table; building and packing one costs ~70 us on a 2-core box, per message, on the request
# path of every offload and reply. paho only ever calls `.pack()` on the properties of a message it sends,
# so this subclass builds the four properties our protocol uses and packs them directly. Byte-for-byte the
# same wire format as paho's (tests/test_protocol_mqtt_properties.py).
_U16 = struct.Struct(">H")
_U32 = struct.Struct(">I")
# property identifiers (MQTT 5.0 section 2.2.2.2), in the order paho packs them
_EXPIRY, _CONTENT_TYPE, _RESPONSE_TOPIC, _CORRELATION = 2, 3, 8, 9


def _utf8(value: str) -> bytes:
    data = value.encode("utf-8")
    return _U16.pack(len(data)) + data


class PublishProperties(Properties):
    """ContentType, ResponseTopic, CorrelationData and MessageExpiryInterval of one PUBLISH."""

    _packed: bytes

    def __init__(
        self,
        *,
        content_type: Optional[str] = None,
        response_topic: Optional[str] = None,
        correlation_data: Optional[bytes] = None,
        expiry_s: Optional[int] = None,
    ) -> None:
        # Deliberately not calling Properties.__init__: its per-instance tables are what makes it slow.
        object.__setattr__(self, "packetType", PacketTypes.PUBLISH)
        parts = []
        if expiry_s is not None:
            if not 0 <= expiry_s < 2**32:
                raise ValueError(f"MessageExpiryInterval {expiry_s} out of range")
            object.__setattr__(self, "MessageExpiryInterval", expiry_s)
            parts.append(bytes([_EXPIRY]) + _U32.pack(expiry_s))
        if content_type is not None:
            object.__setattr__(self, "ContentType", content_type)
            parts.append(bytes([_CONTENT_TYPE]) + _utf8(content_type))
        if response_topic is not None:
            object.__setattr__(self, "ResponseTopic", response_topic)
            parts.append(bytes([_RESPONSE_TOPIC]) + _utf8(response_topic))
        if correlation_data is not None:
            correlation_data = bytes(correlation_data)
            if len(correlation_data) > 65535:
                raise ValueError("CorrelationData longer than 65535 bytes")
            object.__setattr__(self, "CorrelationData", correlation_data)
            parts.append(bytes([_CORRELATION]) + _U16.pack(len(correlation_data)) + correlation_data)
        body = b"".join(parts)
        object.__setattr__(self, "_packed", VariableByteIntegers.encode(len(body)) + body)

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError("PublishProperties are immutable; build a new one")

    def pack(self) -> bytes:
        return self._packed

    def isEmpty(self) -> bool:
        return len(self._packed) == 1

    def json(self) -> dict:
        keys = ("MessageExpiryInterval", "ContentType", "ResponseTopic", "CorrelationData")
        out = {k: getattr(self, k) for k in keys if k in self.__dict__}
        if "CorrelationData" in out:
            out["CorrelationData"] = out["CorrelationData"].hex()
        return out

    def __str__(self) -> str:
        return "[" + ", ".join(f"{k} : {v}" for k, v in self.json().items()) + "]"
