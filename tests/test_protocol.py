"""The binary envelope: round trips, and strict decoding that raises ProtocolError and nothing else."""

from __future__ import annotations

import struct
from typing import Any, Callable, Dict

import msgpack
import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protocol.codec import (
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    DetectionReply,
    OffloadRefusal,
    OffloadReply,
    OffloadRequest,
    ProtocolError,
    decode_detections,
    decode_offload,
    decode_records,
    decode_refusal,
    decode_reply,
    encode_detections,
    encode_offload,
    encode_records,
    encode_refusal,
    encode_reply,
    is_refusal,
)

PREAMBLE = struct.Struct(">2sBBI")
DECODERS: Dict[str, Callable[[Any], Any]] = {
    "offload": decode_offload,
    "reply": decode_reply,
    "records": decode_records,
    "refusal": decode_refusal,
}
DTYPES = ["uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"]
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

texts = st.text(max_size=40)
int64s = st.integers(min_value=-(2**63), max_value=2**63 - 1)
tensors = st.sampled_from(DTYPES).flatmap(
    lambda dt: hnp.arrays(dtype=dt, shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=6))
)


def _frame(header: Any, body: bytes = b"", kind: int = 1, version: int = PROTOCOL_VERSION) -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return PREAMBLE.pack(b"EC", version, kind, len(packed)) + packed + body


def _valid_offload() -> bytes:
    image = np.arange(28 * 28, dtype=np.uint8).reshape(1, 28, 28)
    return encode_offload(OffloadRequest("run-1", "dev-1", 7, image, 123))


def _valid_reply() -> bytes:
    probs = np.full(10, 0.1, dtype=np.float32)
    return encode_reply(OffloadReply("run-1", "dev-1", 7, 3, probs, 1.5, "w1", None, "none", {"batch": 2}))


VALID = {
    "offload": _valid_offload(),
    "reply": _valid_reply(),
    "records": encode_records([{"kind": "run"}]),
    "refusal": encode_refusal(OffloadRefusal("run-1", "dev-1", 7, "w1", "busy", 812.5)),
}


def _only_protocol_error(decoder: Callable[[Any], Any], payload: Any) -> None:
    """Decoding bad input raises ProtocolError; any other exception type fails the test."""
    with pytest.raises(ProtocolError):
        decoder(payload)


# -- round trips -----------------------------------------------------------------------------------------
@FAST
@given(tensor=tensors, run_id=texts, device_id=texts, seq=int64s, sent=int64s)
def test_offload_round_trip(tensor: np.ndarray, run_id: str, device_id: str, seq: int, sent: int) -> None:
    back = decode_offload(encode_offload(OffloadRequest(run_id, device_id, seq, tensor, sent)))
    assert (back.run_id, back.device_id, back.seq, back.sent_unix_ns) == (run_id, device_id, seq, sent)
    assert back.tensor.dtype == tensor.dtype and back.tensor.shape == tensor.shape
    assert back.tensor.tobytes() == np.ascontiguousarray(tensor).tobytes()  # bitwise, NaNs included


@FAST
@given(
    probs=hnp.arrays(np.float32, st.integers(1, 50), elements=st.floats(0, 1, width=32)),
    pred=st.integers(0, 1000),
    cloud_ms=st.floats(0, 1e6),
    cloud_j=st.none() | st.floats(0, 1e3),
    extra=st.dictionaries(st.text(max_size=8), st.integers() | st.text(max_size=8), max_size=4),
)
def test_reply_round_trip(
    probs: np.ndarray, pred: int, cloud_ms: float, cloud_j: Any, extra: Dict[str, Any]
) -> None:
    pred %= probs.size  # a class of these logits (any other is refused: see below)
    extra = {k: v for k, v in extra.items() if not isinstance(v, int) or -(2**63) <= v < 2**64}
    reply = OffloadReply("r", "d", 1, pred, probs, cloud_ms, "w", cloud_j, "rapl", extra)
    back = decode_reply(encode_reply(reply))
    assert back.prediction == pred and back.cloud_ms == cloud_ms and back.cloud_j == cloud_j
    assert back.energy_source == "rapl" and back.worker_id == "w" and back.extra == extra
    np.testing.assert_array_equal(back.logits, probs)


@FAST
@given(
    run_id=texts, device_id=texts, seq=int64s, worker=texts, reason=st.sampled_from(["busy", "queue_full"])
)
def test_refusal_round_trip_and_only_a_refusal_is_one(
    run_id: str, device_id: str, seq: int, worker: str, reason: str
) -> None:
    refusal = OffloadRefusal(run_id, device_id, seq, worker, reason, None)
    payload = encode_refusal(refusal)
    assert decode_refusal(payload) == refusal and is_refusal(payload)
    assert not any(is_refusal(VALID[kind]) for kind in ("offload", "reply", "records"))
    assert not is_refusal(b"") and not is_refusal(payload[:3])


def test_records_round_trip() -> None:
    records = [{"kind": "inference", "seq": i, "latency_ms": 0.5 * i, "label": None} for i in range(100)]
    assert decode_records(encode_records(records)) == records


def test_image_travels_as_raw_bytes() -> None:
    """A 28x28 uint8 image costs its 784 bytes plus a small header, not a float list."""
    assert 784 < len(VALID["offload"]) < 784 + 100


# -- strict decoding ---------------------------------------------------------------------------------------
@FAST
@given(payload=st.binary(max_size=2000), kind=st.sampled_from(sorted(DECODERS)))
@example(payload=b"", kind="offload")
@example(payload=b"EC", kind="reply")
@example(payload=b"EC\x01\x01\x00\x00\x00\x00", kind="offload")
@example(payload=b"EC\x01\x03\x00\x00\x00\x01\xc1", kind="records")  # 0xc1: never-used msgpack byte
def test_garbage_raises_protocol_error(payload: bytes, kind: str) -> None:
    _only_protocol_error(DECODERS[kind], payload)


@FAST
@given(kind=st.sampled_from(sorted(DECODERS)), data=st.data())
def test_every_truncation_raises(kind: str, data: st.DataObject) -> None:
    valid = VALID[kind]
    cut = data.draw(st.integers(0, len(valid) - 1))
    _only_protocol_error(DECODERS[kind], valid[:cut])
    extra = data.draw(st.binary(min_size=1, max_size=64))
    _only_protocol_error(DECODERS[kind], valid + extra)


@FAST
@given(
    version=st.integers(0, 255).filter(lambda v: v != PROTOCOL_VERSION), kind=st.sampled_from(sorted(VALID))
)
def test_wrong_version_raises(version: int, kind: str) -> None:
    tampered = VALID[kind][:2] + bytes([version]) + VALID[kind][3:]
    with pytest.raises(ProtocolError, match="version"):
        DECODERS[kind](tampered)


@pytest.mark.parametrize("payload_kind", sorted(VALID))
@pytest.mark.parametrize("decoder_kind", sorted(DECODERS))
def test_wrong_kind_raises(payload_kind: str, decoder_kind: str) -> None:
    if payload_kind == decoder_kind:
        DECODERS[decoder_kind](VALID[payload_kind])  # the diagonal decodes
    else:
        with pytest.raises(ProtocolError, match="kind"):
            DECODERS[decoder_kind](VALID[payload_kind])


@FAST
@given(
    shape=st.lists(st.integers(-3, 2**64 - 1), min_size=0, max_size=6),
    dtype=st.sampled_from([*DTYPES, "bool", "object", "U8", ""]),
    body=st.binary(max_size=64),
)
@example(shape=[2**32, 2**32], dtype="uint8", body=b"")  # wraps to 0 bytes in int64 arithmetic
@example(shape=[2**63, 2], dtype="uint8", body=b"")
def test_shape_and_length_mismatch_raise(shape: list, dtype: str, body: bytes) -> None:
    header = {"run": "r", "dev": "d", "seq": 1, "t": 0, "dtype": dtype, "shape": shape}
    payload = _frame(header, body)
    itemsize = np.dtype(dtype).itemsize if dtype in DTYPES else None
    consistent = (
        itemsize is not None
        and len(shape) <= 4
        and all(d > 0 for d in shape)
        and int(np.prod([float(d) for d in shape]) * itemsize) == len(body)
    )
    if consistent:
        assert decode_offload(payload).tensor.shape == tuple(shape)
    else:
        _only_protocol_error(decode_offload, payload)


@FAST
@given(
    field=st.sampled_from(["run", "dev", "seq", "t", "dtype", "shape"]),
    value=st.none()
    | st.booleans()
    | st.floats()
    | st.text(max_size=5)
    | st.binary(max_size=5)
    | st.lists(st.none()),
)
def test_wrongly_typed_header_fields_raise(field: str, value: Any) -> None:
    header = {"run": "r", "dev": "d", "seq": 1, "t": 0, "dtype": "uint8", "shape": [2]}
    expected_type = {"run": str, "dev": str, "seq": int, "t": int, "dtype": str, "shape": list}[field]
    if isinstance(value, expected_type) and not isinstance(value, bool):
        return  # a well-typed value; other tests cover its content
    header[field] = value
    _only_protocol_error(decode_offload, _frame(header, b"\x00\x01"))


def test_missing_fields_and_non_map_headers_raise() -> None:
    full = {"run": "r", "dev": "d", "seq": 1, "t": 0, "dtype": "uint8", "shape": [2]}
    for key in full:
        header = {k: v for k, v in full.items() if k != key}
        with pytest.raises(ProtocolError, match=key):
            decode_offload(_frame(header, b"\x00\x01"))
    for header in ([1, 2], "text", 5, None, {1: "int key"}):
        _only_protocol_error(decode_offload, _frame(header, b"\x00\x01"))


def test_oversized_messages_raise_both_ways() -> None:
    big = np.zeros(MAX_MESSAGE_BYTES, dtype=np.uint8)
    with pytest.raises(ProtocolError, match="limit"):
        encode_offload(OffloadRequest("r", "d", 1, big))
    payload = _frame(
        {"run": "r", "dev": "d", "seq": 1, "t": 0, "dtype": "uint8", "shape": [len(big)]}, big.tobytes()
    )
    with pytest.raises(ProtocolError, match="limit"):
        decode_offload(payload)


@pytest.mark.parametrize("payload", ["a string", None, 12, [b"EC"]])
def test_non_bytes_payloads_raise(payload: Any) -> None:
    for decoder in DECODERS.values():
        _only_protocol_error(decoder, payload)


def test_records_batch_count_must_match() -> None:
    body = msgpack.packb([{"a": 1}, {"a": 2}])
    _only_protocol_error(decode_records, _frame({"n": 3}, body, kind=3))
    _only_protocol_error(decode_records, _frame({"n": 2}, msgpack.packb([{"a": 1}, 5]), kind=3))
    _only_protocol_error(decode_records, _frame({"n": 1}, b"\xc1", kind=3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_replies_with_non_finite_numbers_are_refused(bad: float) -> None:
    """Before: NaN/Inf logits, times and joules decoded fine (only the detections table was checked)."""
    logits = np.full(10, 0.5, dtype=np.float32)
    logits[4] = bad
    _only_protocol_error(decode_reply, encode_reply(OffloadReply("r", "d", 1, 3, logits, 1.5, "w")))
    ok = np.zeros(10, dtype=np.float32)
    for cloud_ms, cloud_j in ((bad, None), (1.5, bad)):
        _only_protocol_error(
            decode_reply, encode_reply(OffloadReply("r", "d", 1, 3, ok, cloud_ms, "w", cloud_j))
        )
    detections = DetectionReply("r", "d", 1, np.zeros((0, 4)), np.zeros(0), np.zeros(0), bad, "w")
    _only_protocol_error(decode_detections, encode_detections(detections))


@pytest.mark.parametrize("pred", [-1, 10, 2**40])
def test_a_prediction_that_is_no_class_of_the_logits_is_refused(pred: int) -> None:
    logits = np.zeros(10, dtype=np.float32)
    with pytest.raises(ProtocolError, match="prediction"):
        decode_reply(encode_reply(OffloadReply("r", "d", 1, pred, logits, 1.5, "w")))
    assert decode_reply(encode_reply(OffloadReply("r", "d", 1, 9, logits, 1.5, "w"))).prediction == 9


@pytest.mark.parametrize("stage", ["main", "extension", "cloud", "fallback", "shed"])
def test_every_exit_stage_is_a_valid_record_and_no_other(stage: str) -> None:
    from protocol.records import EXIT_STAGES, InferenceRecord

    assert stage in EXIT_STAGES
    record = InferenceRecord("run-1", "dev-1", 0, 3, stage, 1.0).to_record()
    assert record["exit_stage"] == stage
    with pytest.raises(ProtocolError, match="exit_stage 'teleport'"):
        InferenceRecord("run-1", "dev-1", 0, 3, "teleport", 1.0).to_record()
