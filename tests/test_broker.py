"""The private broker: project config, authentication and the ACL, against a real Mosquitto."""

from __future__ import annotations

import threading
import time

import paho.mqtt.client as mqtt
import pytest

from broker.launcher import BrokerProcess
from protocol.mqtt import BrokerAddress, new_client
from protocol.topics import Topics

pytestmark = pytest.mark.integration


def _connect(address: BrokerAddress, client_id: str) -> tuple[mqtt.Client, mqtt.ReasonCode]:
    result: dict = {}
    done = threading.Event()

    def on_connect(c, userdata, flags, reason, props):
        result["reason"] = reason
        done.set()

    client = new_client(address, client_id, on_connect=on_connect)
    client.connect(address.host, address.port)
    client.loop_start()
    assert done.wait(5), "no CONNACK"
    return client, result["reason"]


def _collect(client: mqtt.Client, topic: str) -> list:
    got: list = []
    client.on_message = lambda c, u, m: got.append((m.topic, m.payload))
    subscribed = threading.Event()
    granted: list = []

    def on_subscribe(c, u, mid, reasons, props):
        granted.extend(reasons)
        subscribed.set()

    client.on_subscribe = on_subscribe
    client.subscribe(topic, qos=1)
    assert subscribed.wait(5)
    return got


def test_anonymous_and_wrong_password_are_refused(broker: BrokerProcess) -> None:
    good = broker.credentials("cloud")
    bad = BrokerAddress(good.host, good.port, "cloud", "not-the-password")
    client, reason = _connect(bad, "intruder")
    client.loop_stop()
    assert reason.is_failure and reason.value in (134, 135)  # bad credentials / not authorized

    anon = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    codes: list = []
    anon.on_connect = lambda c, u, f, r, p: codes.append(r)
    anon.connect(good.host, good.port)
    anon.loop_start()
    deadline = time.monotonic() + 5
    while not codes and time.monotonic() < deadline:
        time.sleep(0.02)
    anon.loop_stop()
    assert codes and codes[0].is_failure


def test_device_is_fenced_to_its_own_topics(broker: BrokerProcess, topics: Topics) -> None:
    broker.add_users(["dev-a", "dev-b"])
    cloud, reason = _connect(broker.credentials("cloud"), "cloud-acl")
    assert not reason.is_failure
    seen_offloads = _collect(cloud, topics.all_offloads)

    dev_a, _ = _connect(broker.credentials("dev-a"), "dev-a")
    snooped = _collect(dev_a, topics.reply("dev-b"))  # the broker accepts the SUBSCRIBE but delivers nothing
    dev_a.publish(topics.offload("dev-a"), b"mine", qos=1).wait_for_publish(5)
    dev_a.publish(topics.offload("dev-b"), b"forged", qos=1).wait_for_publish(5)
    cloud.publish(topics.reply("dev-b"), b"for b only", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    for c in (cloud, dev_a):
        c.disconnect()
        c.loop_stop()
    assert [p for _, p in seen_offloads] == [b"mine"]
    assert snooped == []


def test_receipts_come_only_from_the_collector_and_reach_only_their_device(
    broker: BrokerProcess, topics: Topics
) -> None:
    broker.add_users(["dev-c", "dev-d"])
    dev_c, _ = _connect(broker.credentials("dev-c"), "dev-c")
    dev_d, _ = _connect(broker.credentials("dev-d"), "dev-d")
    collector, reason = _connect(broker.credentials("collector"), "collector-acl")
    assert not reason.is_failure
    own = _collect(dev_d, topics.receipts("dev-d"))
    snooped = _collect(dev_c, topics.receipts("dev-d"))
    dev_c.publish(topics.receipts("dev-d"), b"forged receipt", qos=1).wait_for_publish(5)
    collector.publish(topics.receipts("dev-d"), b"stored", qos=1).wait_for_publish(5)
    time.sleep(0.5)
    for c in (dev_c, dev_d, collector):
        c.disconnect()
        c.loop_stop()
    assert [p for _, p in own] == [b"stored"]
    assert snooped == []


def test_find_free_port_vouches_for_the_whole_run_it_returns() -> None:
    import socket

    from broker.launcher import find_free_port

    base = find_free_port(count=4)
    for port in range(base, base + 4):  # each of them binds, as a cell plan's brokers will
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))
    from broker.launcher import _bindable

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:  # what a run must step over
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert not _bindable("127.0.0.1", taken.getsockname()[1])
    assert _bindable("127.0.0.1", base)
