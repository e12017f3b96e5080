"""What the collector holds of one results message: decoded, validated, and what its receipt will say.

`decode_message` is the collector's intake, kept apart from its threads: it never raises. A payload that is
not a records envelope, or a topic that names no device, is one rejected item (the payload kept as it came);
otherwise each record is validated (`protocol.records.validate_record`) and checked against the topic's
device, and refused records are set aside for `rejected_records` with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from protocol.codec import ProtocolError, Receipt, decode_records
from protocol.records import validate_record
from protocol.topics import Topics
from results_db.ingest import Rejected


@dataclass
class Message:
    """An MQTT message as the collector took it from paho."""

    generation: int  # which connection delivered it; acks for an older one are dropped
    mid: int
    qos: int
    topic: str
    payload: bytes
    receipt_to: Optional[str] = None  # the device's receipts topic, when it asked for a receipt
    correlation: Optional[bytes] = None


@dataclass
class Inbound:
    """One message on its way to the database."""

    message: Message
    records: List[Dict[str, Any]]  # valid, to write
    rejected: List[Rejected] = field(default_factory=list)  # refused already, for rejected_records
    received: int = 0  # records the message held
    stored: int = 0  # set once written: how many of `records` are in the result tables
    reasons: List[str] = field(default_factory=list)  # why the database side refused some of `records`

    def receipt(self) -> Receipt:
        """What the device hears once this is settled: stored and refused, never one taken for the other."""
        refused = len(self.rejected) + len(self.records) - self.stored
        reasons = [r.reason for r in self.rejected] + self.reasons
        return Receipt(stored=self.stored, refused=refused, reason=reasons[0] if reasons else "")


def decode_message(message: Message, topics: Topics) -> Inbound:
    """The message's valid records and its refused ones (see the module docstring)."""
    device_id: Optional[str] = None
    try:
        device_id = topics.device_of(message.topic)
        raw = decode_records(message.payload)
    except (ProtocolError, ValueError) as exc:
        return Inbound(message, [], [Rejected(message.topic, device_id, None, str(exc), message.payload)])
    item = Inbound(message, [], received=len(raw))
    for record in raw:
        try:
            validate_record(record)
            if record["device_id"] != device_id:
                raise ProtocolError(f"record for device {record['device_id']!r} on {device_id!r}'s topic")
        except ProtocolError as exc:
            item.rejected.append(Rejected.of(message.topic, device_id, record, str(exc)))
            continue
        item.records.append(record)
    return item
