"""protocol.mqtt.PublishProperties packs exactly what paho's own Properties packs."""

from __future__ import annotations

from typing import Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from protocol.mqtt import PublishProperties


def paho_properties(content_type, response_topic, correlation_data, expiry_s) -> Properties:  # type: ignore[no-untyped-def]
    """The reference: paho's Properties with the same fields."""
    props = Properties(PacketTypes.PUBLISH)
    if content_type is not None:
        props.ContentType = content_type
    if response_topic is not None:
        props.ResponseTopic = response_topic
    if correlation_data is not None:
        props.CorrelationData = correlation_data
    if expiry_s is not None:
        props.MessageExpiryInterval = expiry_s
    return props


@settings(max_examples=200, deadline=None)
@given(
    content_type=st.none() | st.text(max_size=60),
    response_topic=st.none() | st.text(min_size=1, max_size=80),
    correlation_data=st.none() | st.binary(max_size=300),
    expiry_s=st.none() | st.integers(0, 2**32 - 1),
)
def test_same_bytes_as_paho(
    content_type: Optional[str],
    response_topic: Optional[str],
    correlation_data: Optional[bytes],
    expiry_s: Optional[int],
) -> None:
    kwargs = dict(
        content_type=content_type,
        response_topic=response_topic,
        correlation_data=correlation_data,
        expiry_s=expiry_s,
    )
    fast = PublishProperties(**kwargs)  # type: ignore[arg-type]
    assert fast.pack() == paho_properties(**kwargs).pack()
    assert fast.isEmpty() == all(v is None for v in kwargs.values())
    if correlation_data is not None:
        assert fast.CorrelationData == correlation_data


def test_out_of_range_values_and_mutation_are_refused() -> None:
    with pytest.raises(ValueError):
        PublishProperties(expiry_s=2**32)
    with pytest.raises(ValueError):
        PublishProperties(correlation_data=b"x" * 65536)
    props = PublishProperties(content_type="a")
    with pytest.raises(AttributeError):
        props.ContentType = "b"
    assert str(props) == "[ContentType : a]"
