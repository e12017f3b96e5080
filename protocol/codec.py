"""The binary envelope: `b"EC"`, version, kind, header length, msgpack header, raw tensor bytes.

Tensors travel as the bytes they were captured in (a 28x28 uint8 image is 784 bytes of body, a window of two
accelerometer axes x 2,048 int16 samples 8,192), never as float lists. Every decoder validates magic, version,
kind, header keys and types, dtype, shape x itemsize == body length and the size limit, and raises
`ProtocolError` (one error type) for anything else.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import msgpack
import numpy as np

PROTOCOL_VERSION = 1
MAX_MESSAGE_BYTES = 4 * 1024 * 1024
MAX_NDIM = 4
CONTENT_TYPE_OFFLOAD = "application/vnd.edgecascade.offload.v1"
CONTENT_TYPE_REPLY = "application/vnd.edgecascade.reply.v1"
CONTENT_TYPE_RESULTS = "application/vnd.edgecascade.results.v1+msgpack"
CONTENT_TYPE_DETECTIONS = "application/vnd.edgecascade.detections.v1"
CONTENT_TYPE_REFUSAL = "application/vnd.edgecascade.refusal.v1"
MAX_DETECTIONS = 1000  # boxes in one detections reply

_MAGIC = b"EC"
_PREAMBLE = struct.Struct(">2sBBI")  # magic, version, kind, header length
_KIND_OFFLOAD, _KIND_REPLY, _KIND_RECORDS, _KIND_RECEIPT, _KIND_DETECTIONS, _KIND_REFUSAL = 1, 2, 3, 4, 5, 6
# The dtypes a tensor may travel as: an image's uint8 pixels, a sensor's int16 ADC counts, float32 features...
TENSOR_DTYPES = frozenset(
    {"uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"}
)
_DTYPES = TENSOR_DTYPES


class ProtocolError(ValueError):
    """A message that does not follow the envelope. Services count, log and drop it."""


@dataclass
class OffloadRequest:
    """A sample the device could not settle, sent to the cloud workers."""

    run_id: str
    device_id: str
    seq: int
    tensor: np.ndarray
    sent_unix_ns: int = 0


@dataclass
class OffloadReply:
    """The cloud's answer to one `OffloadRequest`."""

    run_id: str
    device_id: str
    seq: int
    prediction: int
    logits: np.ndarray  # the cloud model's raw scores: the device applies its own softmax (device_agent.rule)
    cloud_ms: float
    worker_id: str
    cloud_j: Optional[float] = None
    energy_source: str = "none"
    extra: Dict[str, Any] = field(default_factory=dict)


def _frame(kind: int, header: Dict[str, Any], body: bytes) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    message = _PREAMBLE.pack(_MAGIC, PROTOCOL_VERSION, kind, len(packed)) + packed + body
    if len(message) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(message)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    return message


def _unframe(payload: bytes, kind: int) -> Tuple[Dict[str, Any], memoryview]:
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise ProtocolError(f"payload must be bytes, not {type(payload).__name__}")
    if len(payload) > MAX_MESSAGE_BYTES:
        raise ProtocolError(f"message of {len(payload)} bytes exceeds the {MAX_MESSAGE_BYTES}-byte limit")
    if len(payload) < _PREAMBLE.size:
        raise ProtocolError(
            f"message of {len(payload)} bytes is shorter than the {_PREAMBLE.size}-byte preamble"
        )
    magic, version, got_kind, header_len = _PREAMBLE.unpack_from(payload)
    if magic != _MAGIC:
        raise ProtocolError(f"bad magic {bytes(magic)!r}")
    if version != PROTOCOL_VERSION:
        raise ProtocolError(f"unsupported protocol version {version} (this side speaks {PROTOCOL_VERSION})")
    if got_kind != kind:
        raise ProtocolError(f"expected message kind {kind}, got {got_kind}")
    end = _PREAMBLE.size + header_len
    if end > len(payload):
        raise ProtocolError(f"header length {header_len} runs past the end of a {len(payload)}-byte message")
    view = memoryview(payload)
    try:
        header = msgpack.unpackb(view[_PREAMBLE.size : end], raw=False, strict_map_key=True)
    except Exception as exc:  # msgpack raises several unrelated types for corrupt input
        raise ProtocolError(f"undecodable header: {exc}") from exc
    if not isinstance(header, dict):
        raise ProtocolError(f"header must be a map, got {type(header).__name__}")
    return header, view[end:]


def _get(header: Dict[str, Any], key: str, types: Any) -> Any:
    if key not in header:
        raise ProtocolError(f"header lacks {key!r}")
    value = header[key]
    if isinstance(value, bool) or not isinstance(value, types):
        raise ProtocolError(f"header field {key!r} has type {type(value).__name__}")
    return value


def _finite(header: Dict[str, Any], key: str) -> float:
    value = float(_get(header, key, (int, float)))
    if not math.isfinite(value):
        raise ProtocolError(f"header field {key!r} is {value}, not a finite number")
    return value


def _finite_or_nil(header: Dict[str, Any], key: str) -> Optional[float]:
    return None if header.get(key) is None else _finite(header, key)


def _tensor_header(array: np.ndarray) -> Dict[str, Any]:
    dtype = array.dtype.name
    if dtype not in _DTYPES:
        raise ProtocolError(f"dtype {dtype} cannot travel; use one of {sorted(_DTYPES)}")
    if array.ndim > MAX_NDIM:
        raise ProtocolError(f"tensor has {array.ndim} dimensions, at most {MAX_NDIM} travel")
    return {"dtype": dtype, "shape": list(array.shape)}


def _tensor_from(header: Dict[str, Any], body: memoryview) -> np.ndarray:
    dtype = _get(header, "dtype", str)
    if dtype not in _DTYPES:
        raise ProtocolError(f"unknown dtype {dtype!r}")
    shape = _get(header, "shape", list)
    if len(shape) > MAX_NDIM or not all(
        isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape
    ):
        raise ProtocolError(f"bad shape {shape!r}")
    expected = np.dtype(dtype).itemsize
    for dim in shape:  # Python ints: np.prod in int64 wraps, and 2**32 x 2**32 would read as 0 bytes
        expected *= dim
    if expected != len(body):
        raise ProtocolError(f"shape {shape} x {dtype} needs {expected} bytes, body has {len(body)}")
    # Copy out of the MQTT buffer: callers keep tensors after paho reuses the message.
    return np.frombuffer(body, dtype=dtype).reshape(shape).copy()


def encode_offload(request: OffloadRequest) -> bytes:
    tensor = np.ascontiguousarray(request.tensor)
    header = {
        "run": request.run_id,
        "dev": request.device_id,
        "seq": int(request.seq),
        "t": int(request.sent_unix_ns),
        **_tensor_header(tensor),
    }
    return _frame(_KIND_OFFLOAD, header, tensor.tobytes())


def decode_offload(payload: bytes) -> OffloadRequest:
    header, body = _unframe(payload, _KIND_OFFLOAD)
    return OffloadRequest(
        run_id=_get(header, "run", str),
        device_id=_get(header, "dev", str),
        seq=_get(header, "seq", int),
        tensor=_tensor_from(header, body),
        sent_unix_ns=_get(header, "t", int),
    )


def encode_reply(reply: OffloadReply) -> bytes:
    logits = np.ascontiguousarray(reply.logits, dtype=np.float32)
    header = {
        "run": reply.run_id,
        "dev": reply.device_id,
        "seq": int(reply.seq),
        "pred": int(reply.prediction),
        "ms": float(reply.cloud_ms),
        "wk": reply.worker_id,
        "j": None if reply.cloud_j is None else float(reply.cloud_j),
        "src": reply.energy_source,
        "x": reply.extra,
        **_tensor_header(logits),
    }
    return _frame(_KIND_REPLY, header, logits.tobytes())


def decode_reply(payload: bytes) -> OffloadReply:
    header, body = _unframe(payload, _KIND_REPLY)
    logits = _tensor_from(header, body)
    if not np.isfinite(logits).all():
        raise ProtocolError("logits hold non-finite numbers")
    prediction = _get(header, "pred", int)
    if not 0 <= prediction < logits.size:
        raise ProtocolError(f"prediction {prediction} is not a class of the {logits.size} logits")
    cloud_j = _finite_or_nil(header, "j")
    return OffloadReply(
        run_id=_get(header, "run", str),
        device_id=_get(header, "dev", str),
        seq=_get(header, "seq", int),
        prediction=prediction,
        logits=logits,
        cloud_ms=_finite(header, "ms"),
        worker_id=_get(header, "wk", str),
        cloud_j=cloud_j,
        energy_source=_get(header, "src", str),
        extra=_get(header, "x", dict) if "x" in header else {},
    )


@dataclass
class OffloadRefusal:
    """A worker's "no" to one offload, sent at once on its reply topic: the device answers at the edge now
    instead of at its deadline. `reason`: busy (the queue's wait would come too close to the deadline),
    over_share (the device had its share of the queue), queue_full; `wait_ms`: the wait the worker saw."""

    run_id: str
    device_id: str
    seq: int
    worker_id: str
    reason: str
    wait_ms: Optional[float] = None


def encode_refusal(refusal: OffloadRefusal) -> bytes:
    header = {
        "run": refusal.run_id,
        "dev": refusal.device_id,
        "seq": int(refusal.seq),
        "wk": refusal.worker_id,
        "why": refusal.reason[:64],
        "wait": None if refusal.wait_ms is None else float(refusal.wait_ms),
    }
    return _frame(_KIND_REFUSAL, header, b"")


def decode_refusal(payload: bytes) -> OffloadRefusal:
    header, body = _unframe(payload, _KIND_REFUSAL)
    if len(body):
        raise ProtocolError(f"a refusal has no body, this one has {len(body)} bytes")
    return OffloadRefusal(
        run_id=_get(header, "run", str),
        device_id=_get(header, "dev", str),
        seq=_get(header, "seq", int),
        worker_id=_get(header, "wk", str),
        reason=_get(header, "why", str),
        wait_ms=_finite_or_nil(header, "wait"),
    )


def is_refusal(payload: bytes) -> bool:
    """Whether a message on a reply topic is a refusal (by its preamble; `decode_refusal` checks the rest)."""
    return len(payload) >= _PREAMBLE.size and _PREAMBLE.unpack_from(payload)[2] == _KIND_REFUSAL


@dataclass
class DetectionReply:
    """The cloud detector's answer to one offloaded video frame: boxes [N, 4] (x1, y1, x2, y2 in the
    frame's pixels), scores [N] and class labels [N], best first."""

    run_id: str
    device_id: str
    seq: int
    boxes: np.ndarray
    scores: np.ndarray
    labels: np.ndarray
    cloud_ms: float
    worker_id: str
    cloud_j: Optional[float] = None
    energy_source: str = "none"
    extra: Dict[str, Any] = field(default_factory=dict)


def encode_detections(reply: DetectionReply) -> bytes:
    # One float32 table [N, 6] (box, score, label): six numbers per box, none of them needs more precision.
    table = np.concatenate(
        [
            np.asarray(reply.boxes, dtype=np.float32).reshape(-1, 4),
            np.asarray(reply.scores, dtype=np.float32).reshape(-1, 1),
            np.asarray(reply.labels, dtype=np.float32).reshape(-1, 1),
        ],
        axis=1,
    )
    if table.shape[0] > MAX_DETECTIONS:
        raise ProtocolError(f"{table.shape[0]} detections, at most {MAX_DETECTIONS} travel")
    header = {
        "run": reply.run_id,
        "dev": reply.device_id,
        "seq": int(reply.seq),
        "ms": float(reply.cloud_ms),
        "wk": reply.worker_id,
        "j": None if reply.cloud_j is None else float(reply.cloud_j),
        "src": reply.energy_source,
        "x": reply.extra,
        **_tensor_header(np.ascontiguousarray(table)),
    }
    return _frame(_KIND_DETECTIONS, header, np.ascontiguousarray(table).tobytes())


def decode_detections(payload: bytes) -> DetectionReply:
    header, body = _unframe(payload, _KIND_DETECTIONS)
    table = _tensor_from(header, body)
    if table.dtype != np.float32 or table.ndim != 2 or table.shape[1] != 6 or table.shape[0] > MAX_DETECTIONS:
        raise ProtocolError(f"detections must be a float32 [N<={MAX_DETECTIONS}, 6] table, got {table.shape}")
    if not np.isfinite(table).all():
        raise ProtocolError("detections hold non-finite numbers")
    cloud_j = _finite_or_nil(header, "j")
    return DetectionReply(
        run_id=_get(header, "run", str),
        device_id=_get(header, "dev", str),
        seq=_get(header, "seq", int),
        boxes=table[:, :4].copy(),
        scores=table[:, 4].copy(),
        labels=table[:, 5].astype(np.int64),
        cloud_ms=_finite(header, "ms"),
        worker_id=_get(header, "wk", str),
        cloud_j=cloud_j,
        energy_source=_get(header, "src", str),
        extra=_get(header, "x", dict) if "x" in header else {},
    )


def encode_records(records: List[Dict[str, Any]]) -> bytes:
    """A batch of result records (plain maps; see `protocol.records`) for the collector."""
    body = msgpack.packb(records, use_bin_type=True)
    return _frame(_KIND_RECORDS, {"n": len(records)}, body)


def decode_records(payload: bytes) -> List[Dict[str, Any]]:
    header, body = _unframe(payload, _KIND_RECORDS)
    count = _get(header, "n", int)
    try:
        records = msgpack.unpackb(body, raw=False, strict_map_key=True)
    except Exception as exc:
        raise ProtocolError(f"undecodable record batch: {exc}") from exc
    if not isinstance(records, list) or len(records) != count:
        raise ProtocolError(f"record batch announces {count} records but holds something else")
    if not all(isinstance(r, dict) for r in records):
        raise ProtocolError("every record must be a map")
    return records


@dataclass
class Receipt:
    """The collector's answer to one results batch, once it is settled for good: how many of its records
    are in the result tables, how many were refused (kept in `rejected_records`, with the reason)."""

    stored: int
    refused: int = 0
    reason: str = ""


def encode_receipt(receipt: Receipt) -> bytes:
    return _frame(
        _KIND_RECEIPT, {"ok": receipt.stored, "no": receipt.refused, "why": receipt.reason[:500]}, b""
    )


def decode_receipt(payload: bytes) -> Receipt:
    """An empty payload is a receipt of a collector that predates counts: all stored."""
    if not payload:
        return Receipt(stored=-1)
    header, _ = _unframe(payload, _KIND_RECEIPT)
    return Receipt(_get(header, "ok", int), _get(header, "no", int), _get(header, "why", str))
