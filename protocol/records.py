"""Result records: what devices publish on `results` and the collector writes to SQL.

A record is a plain map with a `type`. The types and their fields are declared once here; `validate_record`
checks a decoded map against its declaration and raises `ProtocolError`. Keys are idempotent: an inference is
identified by (run_id, device_id, seq), a run by run_id, a window by (run_id, device_id, window_seq).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, Optional, Tuple

from protocol.codec import ProtocolError
from protocol.ids import InvalidId, check_device_id, check_run_id

EXIT_STAGES = ("main", "extension", "cloud", "fallback")

_NUM = (int, float)
_OPT_NUM = (int, float, type(None))
_OPT_INT = (int, type(None))
_OPT_STR = (str, type(None))

# type -> {field: accepted python types}; every field listed is required (None allowed where typed so).
RECORD_FIELDS: Dict[str, Dict[str, Tuple[type, ...]]] = {
    "run": {
        "run_id": (str,),
        "device_id": (str,),
        "policy": (str,),
        "policy_params": (dict,),
        "profile": (str,),
        "dataset": (str,),
        "split": (str,),
        "model_sha256": (str,),
        "code_revision": (str,),
        "host": (dict,),
        "started_unix": _NUM,
    },
    "run_end": {"run_id": (str,), "device_id": (str,), "ended_unix": _NUM, "samples": (int,)},
    "inference": {
        "run_id": (str,),
        "device_id": (str,),
        "seq": (int,),
        "label": _OPT_INT,
        "prediction": (int,),
        "exit_stage": (str,),
        "p_main": _OPT_NUM,
        "p_ext": _OPT_NUM,
        "p_cloud": _OPT_NUM,
        "edge_ms": _NUM,
        "network_ms": _OPT_NUM,
        "cloud_ms": _OPT_NUM,
        "bytes_up": (int,),
        "bytes_down": (int,),
        "device_j_gross": _OPT_NUM,
        "device_j_net": _OPT_NUM,
        "device_j_analytic": _OPT_NUM,
        "cloud_j": _OPT_NUM,
        "energy_source": (str,),
        "ts_unix": _NUM,
    },
    "energy_window": {
        "run_id": (str,),
        "device_id": (str,),
        "window_seq": (int,),
        "source": (str,),
        "rails": (dict,),
        "start_unix": _NUM,
        "end_unix": _NUM,
        "samples": (int,),
        "meter_samples": (int,),
        "idle_w": _OPT_NUM,
        "gross_j": _NUM,
        "net_j": _OPT_NUM,
    },
    "idle_baseline": {
        "run_id": (str,),
        "device_id": (str,),
        "source": (str,),
        "rails": (dict,),
        "duration_s": _NUM,
        "idle_w": _NUM,
        "measured_unix": _NUM,
    },
}


def validate_record(record: Any) -> Dict[str, Any]:
    """Return `record` if it is a well-formed result record, else raise `ProtocolError`.

    Beyond the declared types: ids follow `protocol.ids`, numbers are finite (NaN and infinity would turn
    the run summary into NaN or Infinity, or silently into NULL on SQLite), integers fit 64 bits (SQL)."""
    if not isinstance(record, dict):
        raise ProtocolError(f"record must be a map, got {type(record).__name__}")
    kind = record.get("type")
    spec = RECORD_FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ProtocolError(f"unknown record type {kind!r}")
    for name, types in spec.items():
        if name not in record:
            raise ProtocolError(f"{kind} record lacks {name!r}")
        value = record[name]
        if isinstance(value, bool) or not isinstance(value, types):
            raise ProtocolError(f"{kind} record field {name!r} has type {type(value).__name__}")
        if not _finite(value):
            raise ProtocolError(f"{kind} record field {name!r} holds a non-finite or out-of-range number")
    try:
        check_run_id(record["run_id"])
        check_device_id(record["device_id"])
    except InvalidId as exc:
        raise ProtocolError(f"{kind} record: {exc}") from None
    if kind == "inference" and record["exit_stage"] not in EXIT_STAGES:
        raise ProtocolError(f"exit_stage {record['exit_stage']!r} is not one of {EXIT_STAGES}")
    return record


_INT64 = 2**63


def _finite(value: Any, depth: int = 0) -> bool:
    """No NaN, no infinity, no integer beyond 64 bits, also inside maps and lists (rails, host, params)."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, int):
        return -_INT64 <= value < _INT64
    if depth < 8 and isinstance(value, dict):
        return all(_finite(v, depth + 1) for v in value.values())
    if depth < 8 and isinstance(value, list):
        return all(_finite(v, depth + 1) for v in value)
    return True


@dataclass
class InferenceRecord:
    """One sample's outcome, as the device agent reports it."""

    run_id: str
    device_id: str
    seq: int
    prediction: int
    exit_stage: str
    edge_ms: float
    label: Optional[int] = None
    p_main: Optional[float] = None
    p_ext: Optional[float] = None
    p_cloud: Optional[float] = None
    network_ms: Optional[float] = None
    cloud_ms: Optional[float] = None
    bytes_up: int = 0
    bytes_down: int = 0
    device_j_gross: Optional[float] = None
    device_j_net: Optional[float] = None
    device_j_analytic: Optional[float] = None
    cloud_j: Optional[float] = None
    energy_source: str = "none"
    ts_unix: float = 0.0

    def to_record(self) -> Dict[str, Any]:
        return validate_record({"type": "inference", **asdict(self)})

    @classmethod
    def from_record(cls, record: Dict[str, Any]) -> InferenceRecord:
        validate_record(record)
        return cls(**{f.name: record[f.name] for f in fields(cls)})
