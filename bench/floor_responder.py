"""The offload benchmark's floor: a responder that answers every offload at once with one precomputed reply.

    python -m bench.floor_responder HOST PORT CLOUD_PASSWORD SUBSCRIPTION

From inside paho's callback, no model, no queue: what MQTT, the broker and two Python clients cost on this
machine, which no worker can go below (bench/offload_bench.py --floor). Says READY=1 once subscribed.
"""

from __future__ import annotations

import sys
from typing import Any, List

import numpy as np

from edgecascade.systemd import notify
from protocol.codec import CONTENT_TYPE_REPLY, OffloadReply, encode_reply
from protocol.mqtt import BrokerAddress, PublishProperties, new_client


def main(argv: List[str]) -> int:
    host, port, password, subscription = argv[:4]
    address = BrokerAddress(host, int(port), "cloud", password)
    logits = np.zeros(10, np.float32)
    reply = encode_reply(
        OffloadReply("r", "d", 0, 0, logits, 0.0, "floor", None, "none", {"batch": 1, "queue_ms": 0.0})
    )

    def on_message(client: Any, userdata: Any, message: Any) -> None:
        corr = message.properties.CorrelationData
        props = PublishProperties(content_type=CONTENT_TYPE_REPLY, correlation_data=corr)
        client.publish(message.properties.ResponseTopic, reply, qos=1, properties=props)

    client = new_client(address, "cloud-floor", on_connect=lambda c, *_: c.subscribe(subscription, qos=1))
    client.on_message = on_message

    def on_subscribe(*_: Any) -> None:
        notify("READY=1")

    client.on_subscribe = on_subscribe
    client.connect(address.host, address.port)
    client.loop_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
