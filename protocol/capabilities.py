"""What a broker offers (the properties of its CONNACK) against what an edgecascade role needs from it.

An MQTT 5 broker says in its CONNACK (MQTT 5.0, 3.2.2.3) what it does not do: shared subscriptions,
retained messages, wildcard subscriptions, QoS above some level, packets above some size, more than so many
unacknowledged QoS 1 messages at once. A role that goes on regardless fails later and obscurely: ejabberd
23.01 answers a cloud worker's `$share/` subscription by closing the connection, so the worker reconnects
forever; a broker without retain drops the devices' status and the workers' load; a packet over the
broker's limit is a protocol error that costs the connection. So every role reads the CONNACK and refuses,
at start and with one line, a broker that lacks what it needs (`refusal`); where the broker only asks for
less (ReceiveMaximum, a shorter session expiry) the role adapts or warns (`clamp_inflight`, `session_note`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

# What a packet carries besides the payload's bulk (a sample's raw bytes): the envelope's msgpack header,
# fixed header, topic (< 200 bytes in protocol.topics), packet id and the properties we send.
PACKET_OVERHEAD_BYTES = 1024
# A CONNACK without these properties means the MQTT 5 defaults (3.2.2.3): everything available, no limit.
_RECEIVE_MAXIMUM_DEFAULT = 65535


@dataclass(frozen=True)
class BrokerOffer:
    """What the broker said it supports, with the specification's defaults for what it left out."""

    maximum_qos: int = 2
    retain: bool = True
    wildcard_subscriptions: bool = True
    shared_subscriptions: bool = True
    maximum_packet_bytes: Optional[int] = None  # None: only the protocol's limit (256 MiB)
    receive_maximum: int = _RECEIVE_MAXIMUM_DEFAULT  # QoS 1/2 publishes it takes unacknowledged at once
    session_expiry_s: Optional[int] = None  # set only when the broker overrides what the client asked for

    @classmethod
    def from_connack(cls, properties: Any) -> BrokerOffer:
        """From paho's CONNACK `Properties` (or None: an MQTT 3.1.1 broker, or one that sent none)."""

        def get(name: str, default: Any) -> Any:
            value = getattr(properties, name, None) if properties is not None else None
            return default if value is None else value

        packet = get("MaximumPacketSize", None)
        expiry = get("SessionExpiryInterval", None)
        return cls(
            maximum_qos=int(get("MaximumQoS", 2)),
            retain=bool(get("RetainAvailable", 1)),
            wildcard_subscriptions=bool(get("WildcardSubscriptionAvailable", 1)),
            shared_subscriptions=bool(get("SharedSubscriptionAvailable", 1)),
            maximum_packet_bytes=None if packet is None else int(packet),
            receive_maximum=int(get("ReceiveMaximum", _RECEIVE_MAXIMUM_DEFAULT)),
            session_expiry_s=None if expiry is None else int(expiry),
        )


@dataclass(frozen=True)
class RoleNeeds:
    """What one role (`device`, `cloud worker`, `collector`) needs of the broker."""

    role: str
    qos: int = 1
    retain: bool = False  # publishes retained messages (device status, worker load) or a retained will
    wildcards: bool = False  # subscribes to a filter with + or #
    shared_subscriptions: bool = False  # joins a `$share/` group
    largest_payload_bytes: int = 0  # the largest payload it publishes

    def unmet(self, offer: BrokerOffer) -> List[str]:
        """What `offer` lacks for this role, one short phrase each; empty when it has everything."""
        missing = []
        if self.shared_subscriptions and not offer.shared_subscriptions:
            missing.append(
                "no shared subscriptions (SharedSubscriptionAvailable=0): workers join $share/ groups"
            )
        if self.retain and not offer.retain:
            missing.append("no retained messages (RetainAvailable=0): status and load are retained")
        if self.wildcards and not offer.wildcard_subscriptions:
            missing.append("no wildcard subscriptions (WildcardSubscriptionAvailable=0)")
        if offer.maximum_qos < self.qos:
            missing.append(f"QoS at most {offer.maximum_qos} (MaximumQoS), QoS {self.qos} needed")
        limit = offer.maximum_packet_bytes
        packet = self.largest_payload_bytes + PACKET_OVERHEAD_BYTES
        if limit is not None and self.largest_payload_bytes and packet > limit:
            missing.append(
                f"packets up to {limit} bytes (MaximumPacketSize), this {self.role} sends up to {packet}"
            )
        return missing


def refusal(offer: BrokerOffer, needs: RoleNeeds, broker: str) -> Optional[str]:
    """One line saying why the broker at `broker` (host:port) cannot serve `needs.role`, or None."""
    missing = needs.unmet(offer)
    if not missing:
        return None
    return f"the broker at {broker} cannot serve a {needs.role}: {'; '.join(missing)}"


def clamp_inflight(client: Any, offer: BrokerOffer, ours: int) -> int:
    """Keep at most the broker's ReceiveMaximum of our QoS 1 publishes unacknowledged (paho 2.2 ignores
    it; a broker that gets more may close the connection, 0x93); returns the window in force."""
    window = max(1, min(ours, offer.receive_maximum))
    # paho's setter refuses an open connection (its doubt is a change between 0, no limit, and a limit;
    # this is always one positive limit for another), and the CONNACK is the first moment the broker's
    # figure is known: set the attribute its flow control reads before it sends anything more.
    client._max_inflight_messages = window
    return window


def session_note(offer: BrokerOffer, asked_s: int) -> Optional[str]:
    """A warning when the broker keeps our session for less than we asked, else None."""
    granted = offer.session_expiry_s
    if granted is None or granted >= asked_s:
        return None
    return (
        f"the broker keeps this session {granted} s after a disconnect, not the {asked_s} s asked: "
        "what it would queue for us meanwhile is lost after that (the outbox and receipts cover results)"
    )
