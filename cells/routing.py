"""Which cell a device belongs to: one rule, computed here and by HAProxy from the CONNECT packet.

CRC-32 (zlib's, the one HAProxy's `crc32` converter implements: "the most common implementation as found in
Ethernet, Gzip, PNG") of the MQTT client id, through HAProxy's full-avalanche mix (`crc32(1)`: CRC-32 is
linear, so ids that differ in their last character, dev-000 and dev-001, share their low bits and would all
land in one cell), modulo the number of cells. A pure function of the client id and
the cell count, so a device lands in the same cell on every reconnect and after any HAProxy restart, and the
plan can create each device's account on the one cell that will see it. Not consistent hashing on purpose: a
device must never be moved to another cell while its own is down (its persistent session, queued replies and
receipts live there); changing the cell count is a re-plan, not a failover.
"""

from __future__ import annotations

import zlib

# The HAProxy sample expression of the same rule (`req.payload(0,0)` is the client's first packet, CONNECT).
HAPROXY_CLIENT_ID = "req.payload(0,0),mqtt_field_value(connect,client_identifier)"


_U32 = 0xFFFFFFFF


def full_hash(a: int) -> int:
    """HAProxy's `full_hash` (include/haproxy/hash.h; Bob Jenkins' 32-bit integer mix, then a multiply by a
    prime), which `crc32(1)` applies to the CRC."""
    a = ((a + 0x7ED55D16) + (a << 12)) & _U32
    a = ((a ^ 0xC761C23C) ^ (a >> 19)) & _U32
    a = ((a + 0x165667B1) + (a << 5)) & _U32
    a = ((a + 0xD3A2646C) ^ (a << 9)) & _U32
    a = ((a + 0xFD7046C5) + (a << 3)) & _U32
    a = ((a ^ 0xB55A4F09) ^ (a >> 16)) & _U32
    return (a * 3221225473) & _U32


def cell_of(client_id: str, cells: int) -> int:
    """The index (0..cells-1) of the cell that `client_id` is routed to."""
    if cells < 1:
        raise ValueError(f"cells must be >= 1, got {cells}")
    return full_hash(zlib.crc32(client_id.encode())) % cells


def haproxy_cell_expression(cells: int) -> str:
    """The HAProxy expression that yields `cell_of(<client id of this connection>, cells)`."""
    if cells < 1:
        raise ValueError(f"cells must be >= 1, got {cells}")
    return f"{HAPROXY_CLIENT_ID},crc32(1),mod({cells})"
