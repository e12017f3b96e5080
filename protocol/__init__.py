"""Wire contract shared by devices, cloud workers and the collector.

`protocol` owns the MQTT topic layout (`edgecascade/v1/{device_id}/offload|reply|results|status`, the cloud
workers' shared subscription) and the versioned binary envelope: a small msgpack header followed by the raw
tensor bytes exactly as captured. Decoding is strict and raises `ProtocolError` for anything malformed, so a
service can count, log and drop a bad message without crashing. Python >= 3.8, numpy and msgpack only.
"""

from protocol.codec import (
    CONTENT_TYPE_DETECTIONS,
    CONTENT_TYPE_OFFLOAD,
    CONTENT_TYPE_REFUSAL,
    CONTENT_TYPE_REPLY,
    CONTENT_TYPE_RESULTS,
    MAX_MESSAGE_BYTES,
    PROTOCOL_VERSION,
    DetectionReply,
    OffloadRefusal,
    OffloadReply,
    OffloadRequest,
    ProtocolError,
    Receipt,
    decode_detections,
    decode_offload,
    decode_receipt,
    decode_records,
    decode_refusal,
    decode_reply,
    encode_detections,
    encode_offload,
    encode_receipt,
    encode_records,
    encode_refusal,
    encode_reply,
    is_refusal,
)
from protocol.records import EXIT_STAGES, RECORD_FIELDS, InferenceRecord, validate_record
from protocol.topics import Topics

__all__ = [
    "CONTENT_TYPE_DETECTIONS",
    "CONTENT_TYPE_OFFLOAD",
    "CONTENT_TYPE_REFUSAL",
    "CONTENT_TYPE_REPLY",
    "CONTENT_TYPE_RESULTS",
    "EXIT_STAGES",
    "MAX_MESSAGE_BYTES",
    "PROTOCOL_VERSION",
    "RECORD_FIELDS",
    "InferenceRecord",
    "DetectionReply",
    "OffloadRefusal",
    "OffloadReply",
    "OffloadRequest",
    "ProtocolError",
    "Receipt",
    "Topics",
    "decode_detections",
    "decode_offload",
    "decode_receipt",
    "decode_records",
    "decode_refusal",
    "decode_reply",
    "encode_detections",
    "encode_offload",
    "encode_receipt",
    "encode_records",
    "encode_refusal",
    "encode_reply",
    "is_refusal",
    "validate_record",
]
