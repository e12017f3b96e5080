"""Result records: what devices publish on `results` and the collector writes to SQL.

Each record kind is declared once, as a dataclass below (`RECORD_TYPES`); everything else is derived from
those declarations: the accepted types per field (`RECORD_FIELDS`, which `validate_record` checks a decoded
map against), the map that travels (`Record.to_record`), and — tested in tests/test_results_db_schema.py —
the columns of the result tables (the ORM models and the migrations). A record is a plain map with a `type`.
Keys are idempotent: an inference is identified by (run_id, device_id, seq), a run by run_id, a window by
(run_id, device_id, window_seq), a baseline by (run_id, device_id, source, measured_unix), a video frame by
(run_id, device_id, seq), a drift test by (run_id, device_id, seq) of its window's last sample.
"""

from __future__ import annotations

import functools
import math
import typing
from dataclasses import dataclass, fields
from typing import Any, ClassVar, Dict, List, Optional, Tuple, Type, TypeVar

from protocol.codec import ProtocolError
from protocol.ids import InvalidId, check_device_id, check_run_id

# Where a sample's answer came from: the main or extension block, the cloud; the edge's answer after an
# offload missed its deadline (fallback), or instead of an offload the device predicted would (shed:
# `device_agent.capacity`; no bytes sent, an edge exit in every account), or at a gateway between a sensor
# and the cloud (the fault-detection hierarchy: it left the sensor). The results schema checks it.
EXIT_STAGES = ("main", "extension", "cloud", "fallback", "shed", "gateway")
R = TypeVar("R", bound="Record")


class Record:
    """Base of the record kinds: `kind` names the `type` the map carries."""

    kind: ClassVar[str] = ""

    def to_record(self) -> Dict[str, Any]:
        """The validated map that travels."""
        return validate_record(self.to_map())

    def to_map(self) -> Dict[str, Any]:
        """The map that travels, unchecked (the hot path: the collector validates every record anyway)."""
        out: Dict[str, Any] = {"type": self.kind}
        out.update(vars(self))
        return out

    @classmethod
    def from_record(cls: Type[R], record: Dict[str, Any]) -> R:
        validate_record(record)
        return cls(**{f.name: record[f.name] for f in fields(cls)})  # type: ignore[arg-type]


@dataclass
class RunRecord(Record):
    """Opens a run (again, when a run is resumed: the latest announcement wins, the first start stays)."""

    kind: ClassVar[str] = "run"
    run_id: str
    device_id: str
    policy: str
    policy_params: Dict[str, Any]
    profile: str
    dataset: str
    split: str
    model_sha256: str
    code_revision: str
    host: Dict[str, Any]
    started_unix: float


@dataclass
class RunEndRecord(Record):
    """Closes a process's part of a run; `samples` counts the run's records over all its processes."""

    kind: ClassVar[str] = "run_end"
    run_id: str
    device_id: str
    ended_unix: float
    samples: int


@dataclass
class InferenceRecord(Record):
    """One sample's outcome, as the device agent reports it."""

    kind: ClassVar[str] = "inference"
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
    model_version: Optional[str] = None  # what answered it (`device_agent.rollout`); a run may span two
    # the fault hierarchy's gateway (sensor -> gateway -> cloud): its max-softmax, model time and joules
    p_gateway: Optional[float] = None
    gateway_ms: Optional[float] = None
    gateway_j: Optional[float] = None


@dataclass
class EnergyWindowRecord(Record):
    """A meter window as the device measured it: joules per rail, duration, sample counts."""

    kind: ClassVar[str] = "energy_window"
    run_id: str
    device_id: str
    window_seq: int
    source: str
    rails: Dict[str, Any]
    start_unix: float
    end_unix: float
    samples: int
    meter_samples: int
    idle_w: Optional[float]
    gross_j: float
    net_j: Optional[float]


@dataclass
class IdleBaselineRecord(Record):
    """The idle power a device measured before a run (per rail, watts)."""

    kind: ClassVar[str] = "idle_baseline"
    run_id: str
    device_id: str
    source: str
    rails: Dict[str, Any]
    duration_s: float
    idle_w: float
    measured_unix: float


@dataclass
class FrameRecord(Record):
    """One video frame's output on the device (REACT): its boxes and where they came from.

    `source` is edge (the detector ran), tracked (boxes carried by the tracker), fused (a cloud answer was
    merged in on this frame), cloud (cloud-only: the latest answer) or none (nothing to show yet). `boxes`
    holds [x1, y1, x2, y2, score, label] per box. A cloud answer applied on this frame names the frame it
    was for (`answer_frame`) and how long it took to come back (`answer_ms`, injected delay included)."""

    kind: ClassVar[str] = "frame"
    run_id: str
    device_id: str
    seq: int  # frame number within the run (never reused: durable)
    sequence: int  # which clip of the source
    frame: int  # index within that clip
    source: str
    boxes: List[Any]
    edge_ms: float  # device compute for this frame (detector or tracker, and fusion)
    sent: int  # 1 when this frame was offloaded
    bytes_up: int
    bytes_down: int
    answer_frame: Optional[int]
    answer_ms: Optional[float]
    cloud_ms: Optional[float]
    device_j_gross: Optional[float]
    device_j_net: Optional[float]
    device_j_analytic: Optional[float]
    energy_source: str
    ts_unix: float


FRAME_SOURCES = ("edge", "tracked", "fused", "cloud", "none")


@dataclass
class DriftRecord(Record):
    """One test of the device's drift monitor (`device_agent.drift`): the window of its last `window_size`
    samples, ending at sample `seq`, against the model card's calibration profile. `statistic`, `feature` and
    `p_value` are those of the most significant feature; `drift` is 1 when `p_value` < `level` (the per-test
    level that bounds the false alarms of repeated testing)."""

    kind: ClassVar[str] = "drift"
    run_id: str
    device_id: str
    seq: int  # the window's last sample (a sample's seq: never reused within a run)
    samples: int  # samples the monitor had seen in this process
    window_size: int
    statistic: float  # Kolmogorov-Smirnov D
    feature: str
    p_value: float
    level: float
    drift: int  # 0 or 1
    ts_unix: float


MAX_FEATURE_LEN = 32

RECORD_TYPES: Dict[str, Type[Record]] = {
    cls.kind: cls
    for cls in (
        RunRecord,
        RunEndRecord,
        InferenceRecord,
        EnergyWindowRecord,
        IdleBaselineRecord,
        FrameRecord,
        DriftRecord,
    )
}


def _accepted(annotation: Any) -> Tuple[type, ...]:
    """The Python types a decoded map may hold for a field of this annotation (an int is a valid float)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) is typing.Union:  # Optional[X]
        return tuple(t for a in args for t in _accepted(a))
    if annotation is type(None):
        return (type(None),)
    if annotation is float:
        return (int, float)
    origin = typing.get_origin(annotation)
    return ((origin or annotation),)


# kind -> {field: accepted python types}; every field is required in the map (None allowed where typed so).
RECORD_FIELDS: Dict[str, Dict[str, Tuple[type, ...]]] = {
    kind: {name: _accepted(hint) for name, hint in typing.get_type_hints(cls).items() if name != "kind"}
    for kind, cls in RECORD_TYPES.items()
}

# kind -> [(field, the scalar types its values may have exactly: str, int, float, NoneType)], in field order.
_SCALARS = (str, int, float, type(None))
_EXACT_TYPES: Dict[str, List[Tuple[str, Tuple[type, ...]]]] = {
    kind: [(name, tuple(t for t in types if t in _SCALARS)) for name, types in spec.items()]
    for kind, spec in RECORD_FIELDS.items()
}
_MISSING = object()
# kind -> the fields a record may leave out, read as None: those whose default is None. An agent of an older
# release sends none of the fields added since (model_version, the gateway's columns); a collector upgraded
# first must still store its rows, not refuse them.
_MAY_BE_ABSENT: Dict[str, frozenset] = {
    kind: frozenset(f.name for f in fields(typing.cast(Any, cls)) if f.default is None)
    for kind, cls in RECORD_TYPES.items()
}


def validate_record(record: Any) -> Dict[str, Any]:
    """Return `record` if it is a well-formed result record, else raise `ProtocolError`.

    A field whose default is None may be absent (an older agent's record): it is set to None here.
    Beyond the declared types: ids follow `protocol.ids`, numbers are finite (NaN and infinity would turn
    the run summary into NaN or Infinity, or silently into NULL on SQLite), integers fit 64 bits (SQL)."""
    if not isinstance(record, dict):
        raise ProtocolError(f"record must be a map, got {type(record).__name__}")
    kind: Any = record.get("type")
    spec = RECORD_FIELDS.get(kind) if isinstance(kind, str) else None
    if spec is None:
        raise ProtocolError(f"unknown record type {kind!r}")
    for name, exact in _EXACT_TYPES[kind]:
        value = record.get(name, _MISSING)
        cls = type(value)
        # The collector's hot path (~24 fields a row): plain scalars of an accepted type are decided here,
        # without isinstance chains or a call; anything else (maps, lists, subclasses, errors) goes below.
        if cls in exact:
            if cls is str or value is None or (cls is float and value - value == 0.0):
                continue  # x - x is 0.0 for every finite float, NaN for NaN and both infinities
            if cls is int and -_INT64 <= value < _INT64:
                continue
        if value is _MISSING:
            if name in _MAY_BE_ABSENT[kind]:
                record[name] = None
                continue
            raise ProtocolError(f"{kind} record lacks {name!r}")
        if isinstance(value, bool) or not isinstance(value, spec[name]):
            raise ProtocolError(f"{kind} record field {name!r} has type {type(value).__name__}")
        if not _finite(value):
            raise ProtocolError(f"{kind} record field {name!r} holds a non-finite or out-of-range number")
    try:
        _check_ids(record["run_id"], record["device_id"])
    except InvalidId as exc:
        raise ProtocolError(f"{kind} record: {exc}") from None
    if kind == "inference" and record["exit_stage"] not in EXIT_STAGES:
        raise ProtocolError(f"exit_stage {record['exit_stage']!r} is not one of {EXIT_STAGES}")
    if kind == "frame":
        _check_frame(record)
    if kind == "drift":
        _check_drift(record)
    return record


@functools.lru_cache(maxsize=4096)
def _check_ids(run_id: str, device_id: str) -> None:
    """Both ids by `protocol.ids`; a pair once found valid is not checked again (a batch's records share
    them, and the checks were a third of the collector's validation). Invalid pairs raise, so never cached."""
    check_run_id(run_id)
    check_device_id(device_id)


def _check_drift(record: Dict[str, Any]) -> None:
    if record["drift"] not in (0, 1):
        raise ProtocolError(f"drift must be 0 or 1, got {record['drift']!r}")
    if not 0.0 <= record["p_value"] <= 1.0 or not 0.0 < record["level"] < 1.0:
        raise ProtocolError("drift p_value must be in [0, 1] and level in (0, 1)")
    if not 0.0 <= record["statistic"] <= 1.0 or record["window_size"] < 1:
        raise ProtocolError("drift statistic must be in [0, 1] and window_size at least 1")
    if not 0 < len(record["feature"]) <= MAX_FEATURE_LEN:
        raise ProtocolError(f"drift feature must be 1-{MAX_FEATURE_LEN} characters")


MAX_FRAME_BOXES = 200


def _check_frame(record: Dict[str, Any]) -> None:
    if record["source"] not in FRAME_SOURCES:
        raise ProtocolError(f"frame source {record['source']!r} is not one of {FRAME_SOURCES}")
    boxes = record["boxes"]
    if len(boxes) > MAX_FRAME_BOXES:
        raise ProtocolError(f"frame record with {len(boxes)} boxes, at most {MAX_FRAME_BOXES}")
    for box in boxes:
        if not isinstance(box, list) or len(box) != 6 or not all(isinstance(v, (int, float)) for v in box):
            raise ProtocolError("a frame box is [x1, y1, x2, y2, score, label] of numbers")


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
