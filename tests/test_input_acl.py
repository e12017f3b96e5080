"""Who may publish to a device's `input` topic (the MQTT input source), against the real Mosquitto with the
project's ACL and dynamic-security roles: the device itself and its sensor account `sensor-<device>`, which
may publish there and nowhere else; no other device and no other device's sensor."""

from __future__ import annotations

import threading
import uuid
from typing import Any, Dict, List, Tuple

import pytest
from waiting import wait_for

from broker.launcher import BrokerProcess
from protocol.ids import InvalidId, check_device_id, check_username, sensor_account, sensor_of
from protocol.mqtt import BrokerAddress, new_client
from protocol.topics import Topics

pytestmark = pytest.mark.integration


class Client:
    """A connected paho client that records the PUBACK reason of each publish and what it receives."""

    def __init__(self, address: BrokerAddress, client_id: str) -> None:
        self.connack: List[Any] = []
        self.acks: Dict[int, Any] = {}
        self.received: List[Tuple[str, bytes]] = []
        self._connected = threading.Event()
        self._acked = threading.Condition()
        self._subscribed = threading.Event()
        self.client = new_client(address, client_id, on_connect=self._on_connect)
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.received.append((m.topic, bytes(m.payload)))
        self.client.on_subscribe = lambda *a: self._subscribed.set()
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert self._connected.wait(5), "no CONNACK"

    def _on_connect(self, c: Any, u: Any, flags: Any, reason: Any, props: Any) -> None:
        self.connack.append(reason)
        self._connected.set()

    def _on_publish(self, c: Any, u: Any, mid: int, reason: Any, props: Any) -> None:
        with self._acked:
            self.acks[mid] = reason
            self._acked.notify_all()

    def publish(self, topic: str, payload: bytes) -> Any:
        """QoS 1; the PUBACK's reason code."""
        info = self.client.publish(topic, payload, qos=1)
        with self._acked:
            assert self._acked.wait_for(lambda: info.mid in self.acks, 5), "no PUBACK"
            return self.acks[info.mid]

    def subscribe(self, topic: str) -> None:
        self._subscribed.clear()
        self.client.subscribe(topic, qos=1)
        assert self._subscribed.wait(5)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_sensor_accounts_are_named_after_their_device_and_no_device_may_take_such_a_name() -> None:
    assert sensor_account("cam-01") == "sensor-cam-01" and sensor_of("sensor-cam-01") == "cam-01"
    assert check_username("sensor-cam-01") == "sensor-cam-01" and sensor_of("cam-01") is None
    with pytest.raises(InvalidId):
        check_device_id("sensor-cam-01")  # a device of that name would own that account
    with pytest.raises(InvalidId):
        sensor_account("cloud-1")  # services have no sensors


def test_only_the_device_and_its_sensor_account_may_publish_to_its_input(
    broker: BrokerProcess, topics: Topics
) -> None:
    device, other = f"dev-{uuid.uuid4().hex[:8]}", f"dev-{uuid.uuid4().hex[:8]}"
    sensor = sensor_account(device)
    agent = Client(broker.credentials(device), device)
    camera = Client(broker.credentials(sensor), sensor)
    intruder = Client(broker.credentials(other), other)
    strange_sensor = Client(broker.credentials(sensor_account(other)), sensor_account(other))
    watcher = Client(broker.credentials("collector"), f"collector-{uuid.uuid4().hex[:6]}")
    try:
        agent.subscribe(topics.input(device))
        watcher.subscribe(topics.all_results)
        assert not camera.publish(topics.input(device), b"from-sensor").is_failure
        assert not agent.publish(topics.input(device), b"from-itself").is_failure
        assert camera.publish(topics.input(other), b"x").is_failure  # another device's input
        assert camera.publish(topics.results(device), b"x").is_failure  # not its device's results either
        assert camera.publish(topics.results(sensor_of(sensor) or ""), b"x").is_failure
        assert intruder.publish(topics.input(device), b"x").is_failure
        assert strange_sensor.publish(topics.input(device), b"x").is_failure
        assert not camera.publish(topics.input(device), b"marker").is_failure

        wait_for(lambda: any(p == b"marker" for _, p in agent.received), 5, "the marker")
        assert [p for _, p in agent.received] == [b"from-sensor", b"from-itself", b"marker"]
        assert watcher.received == []
    finally:
        for client in (agent, camera, intruder, strange_sensor, watcher):
            client.close()


def test_a_sensor_account_is_bound_to_its_own_client_id(broker: BrokerProcess) -> None:
    """So a camera cannot take over its device's session (client id = the device id) by logging in as it."""
    device = f"dev-{uuid.uuid4().hex[:8]}"
    reasons: List[Any] = []
    done = threading.Event()
    address = broker.credentials(sensor_account(device))
    client = new_client(address, device, on_connect=lambda c, u, f, r, p: (reasons.append(r), done.set()))
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        assert done.wait(5) and reasons[0].is_failure
    finally:
        client.disconnect()
        client.loop_stop()
