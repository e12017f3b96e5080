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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

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
    """A configured, not yet connected MQTT 5 client; `on_connect` runs after TCP_NODELAY is set."""
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
) -> Properties:
    props = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        props.ContentType = content_type
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if expiry_s is not None:
        props.MessageExpiryInterval = expiry_s
    return props
