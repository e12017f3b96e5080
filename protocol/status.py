"""A device's retained status on `Topics.status(device_id)`: online or offline, and whether it sees drift.

JSON, like the workers' load (`protocol.load`): tiny and read by people (`mosquitto_sub -t
'edgecascade/v1/+/status' -v`). Retained, QoS 1; `offline` is also the connection's Last Will. `drift` is
the device's latest verdict on its inputs (`device_agent.drift`), republished when it changes and on every
connect: None when the device does not watch (no reference in its card, or a policy that runs no edge).
`model` is the model version the device serves (`device_agent.rollout`), its device group, the rolling
agreement of its edge answers with the cloud's on its offloads (and that of the version it served before),
and how many bundles it refused: what the operator's canary watch reads (`edgecascade models`).
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
class Agreement:
    """How often the cloud's answer equalled the device's edge answer, over its last `compared` offloads
    answered by one model version."""

    version: str
    agreement: Optional[float]  # None: nothing compared yet
    compared: int


@dataclass(frozen=True)
class ModelStatus:
    """The model version a device serves (`current.version`) and what it knows of it."""

    group: Optional[str]  # the device group whose manifest it follows (None: it follows none)
    current: Agreement
    previous: Optional[Agreement]  # the version it served before the last swap, as it stood then
    refused: int  # bundles refused since the agent started (bad signature, tampered, truncated...)


@dataclass(frozen=True)
class DeviceStatus:
    state: str
    drift: Optional[DriftStatus] = None
    model: Optional[ModelStatus] = None


def encode_status(status: DeviceStatus) -> bytes:
    body: Dict[str, Any] = {"v": STATUS_VERSION, "state": status.state}
    if status.drift is not None:
        body["drift"] = dict(vars(status.drift))
    if status.model is not None:
        model = status.model
        body["model"] = {
            "group": model.group,
            "current": dict(vars(model.current)),
            "previous": None if model.previous is None else dict(vars(model.previous)),
            "refused": model.refused,
        }
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
    model = _model(data.get("model"))
    drift = data.get("drift")
    if drift is None:
        return DeviceStatus(data["state"], model=model)
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
    return DeviceStatus(data["state"], verdict, model)


def _model(model: Any) -> Optional[ModelStatus]:
    if model is None:
        return None
    try:
        group = model["group"]
        previous = model["previous"]
        status = ModelStatus(
            group=None if group is None else str(group),
            current=_agreement(model["current"]),
            previous=None if previous is None else _agreement(previous),
            refused=int(model["refused"]),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"status model field missing or of the wrong type: {exc}") from None
    if status.refused < 0:
        raise ProtocolError(f"status model figures out of range: {status}")
    return status


def _agreement(data: Any) -> Agreement:
    value = data["agreement"]
    agreement = Agreement(
        str(data["version"]), None if value is None else float(value), int(data["compared"])
    )
    if agreement.compared < 0 or value is not None and not 0.0 <= agreement.agreement <= 1.0:  # type: ignore[operator]
        raise ValueError(f"agreement out of range: {agreement}")
    return agreement


def _boolean(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value
