"""One offload as the worker takes it: checked in full before it may join a batch.

`parse_offload` raises `ProtocolError` (the worker counts, logs and acknowledges it) for anything it cannot
answer: too big, no reply address, another content type, a header that is not the topic's device, a reply
topic that is not that device's own, a tensor that is not the model's input. The ACL proves who published on
a topic; the header and the reply address must agree with it, so that nobody can make the worker answer into
another device's reply topic.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Tuple

import numpy as np

from protocol.codec import CONTENT_TYPE_OFFLOAD, OffloadRequest, ProtocolError, decode_offload
from protocol.topics import Topics

# Room for the envelope's preamble and msgpack header on top of the sample's bytes; anything larger than
# sample + slack cannot be a valid offload for this model and is refused before decoding.
HEADER_SLACK_BYTES = 1024


@dataclass
class Job:
    request: OffloadRequest
    reply_topic: str
    correlation: bytes
    deadline: float  # time.monotonic() after which the requester no longer wants an answer
    mid: int
    qos: int
    generation: int  # which connection delivered it: acks go only to that one


def parse_offload(
    message: Any,
    topics: Topics,
    input_shape: Tuple[int, ...],
    max_payload_bytes: int,
    max_expiry_s: float,
    received: float,
    generation: int,
    input_dtype: Any = np.uint8,
) -> Job:
    """The job of one paho message; its deadline counts from `received` (monotonic seconds)."""
    payload = bytes(message.payload)
    if len(payload) > max_payload_bytes:
        raise ProtocolError(
            f"oversized: {len(payload)} bytes, a {input_shape} {np.dtype(input_dtype)} offload needs at most "
            f"{max_payload_bytes}"
        )
    props = message.properties
    reply_topic = getattr(props, "ResponseTopic", None)
    correlation = getattr(props, "CorrelationData", None)
    if not reply_topic or correlation is None:
        raise ProtocolError("no ResponseTopic/CorrelationData: nowhere to send the answer")
    content_type = getattr(props, "ContentType", None)
    if content_type is not None and content_type != CONTENT_TYPE_OFFLOAD:
        raise ProtocolError(f"content type {content_type!r} is not {CONTENT_TYPE_OFFLOAD!r}")
    request = decode_offload(payload)
    try:
        device = topics.device_of(message.topic)
    except ValueError as exc:
        raise ProtocolError(str(exc)) from None
    if request.device_id != device:
        raise ProtocolError(f"header device {request.device_id!r} != topic device {device!r}")
    if reply_topic != topics.reply(device):
        raise ProtocolError(f"ResponseTopic {reply_topic!r} is not {device!r}'s reply topic")
    tensor = request.tensor
    if tensor.dtype != input_dtype:
        raise ProtocolError(f"sample dtype {tensor.dtype} is not the model input's {np.dtype(input_dtype)}")
    if tuple(tensor.shape) == (1, *input_shape):
        tensor = tensor.reshape(input_shape)
    if tuple(tensor.shape) != input_shape:
        raise ProtocolError(f"sample shape {list(tensor.shape)} != model input {list(input_shape)}")
    request.tensor = tensor
    expiry = getattr(props, "MessageExpiryInterval", None)
    # No offload waits forever: one without expiry (or a longer one) gets the worker's maximum.
    expiry_s = min(float(expiry), max_expiry_s) if expiry else max_expiry_s
    return Job(
        request, reply_topic, bytes(correlation), received + expiry_s, message.mid, message.qos, generation
    )
