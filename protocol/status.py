"""A device's retained status on `Topics.status(device_id)`: online or offline, and whether it sees drift.

JSON, like the workers' load (`protocol.load`): tiny and read by people (`mosquitto_sub -t
'edgecascade/v1/+/status' -v`). Retained, QoS 1; `offline` is also the connection's Last Will. `drift` is
the device's latest verdict on its inputs (`device_agent.drift`), republished when it changes and on every
connect: None when the device does not watch (no reference in its card, or a policy that runs no edge).
Agents before this format published the bare words `online` / `offline`: they still decode.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any, Dict, Optional

from protocol.codec import ProtocolError

STATUS_VERSION = 1
CONTENT_TYPE_STATUS = "application/vnd.edgecascade.status+json;v=1"
STATES = ("online", "offline")
MAX_STATUS_BYTES = 4096


@dataclass(frozen=True)
class DriftStatus:
    """The device's drift verdict, from its latest test (`device_agent.drift.DriftCheck`)."""

    drifting: bool
    since_seq: Optional[int]  # the sample of the test that started the current state of drift (None: clean)
    seq: int  # the last sample of the latest test
    p_value: float
    feature: str
    checked_unix: float
    alarms: int  # tests that found drift in this run so far


@dataclass(frozen=True)
class DeviceStatus:
    state: str
    drift: Optional[DriftStatus] = None


def encode_status(status: DeviceStatus) -> bytes:
    body: Dict[str, Any] = {"v": STATUS_VERSION, "state": status.state}
    if status.drift is not None:
        body["drift"] = dict(vars(status.drift))
    return json.dumps(body, separators=(",", ":")).encode()


def decode_status(payload: bytes) -> DeviceStatus:
    """Strict: ProtocolError for anything but a known state and, if present, a well-formed drift verdict."""
    if payload in (b"online", b"offline"):
        return DeviceStatus(payload.decode())
    if len(payload) > MAX_STATUS_BYTES:
        raise ProtocolError(f"status of {len(payload)} bytes, at most {MAX_STATUS_BYTES}")
    try:
        data = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"status is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != STATUS_VERSION:
        raise ProtocolError(f"status version is not {STATUS_VERSION}")
    if data.get("state") not in STATES:
        raise ProtocolError(f"status state {data.get('state')!r} is not one of {STATES}")
    drift = data.get("drift")
    if drift is None:
        return DeviceStatus(data["state"])
    try:
        since = drift["since_seq"]
        verdict = DriftStatus(
            drifting=_boolean(drift["drifting"]),
            since_seq=None if since is None else int(since),
            seq=int(drift["seq"]),
            p_value=float(drift["p_value"]),
            feature=str(drift["feature"]),
            checked_unix=float(drift["checked_unix"]),
            alarms=int(drift["alarms"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"status drift field missing or of the wrong type: {exc}") from None
    if not (0.0 <= verdict.p_value <= 1.0 and math.isfinite(verdict.checked_unix) and verdict.alarms >= 0):
        raise ProtocolError(f"status drift figures out of range: {verdict}")
    return DeviceStatus(data["state"], verdict)


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value
