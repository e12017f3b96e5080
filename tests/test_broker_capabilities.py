"""Each role reads the broker's CONNACK and refuses, at start and in one line, a broker that lacks what it
needs (protocol/capabilities.py): a real ejabberd without shared subscriptions, a real Mosquitto without
retain or with a small MaximumPacketSize, and the full Mosquitto that serves every role."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
from agents import quick_agent_config
from ejabberd import EjabberdProcess, EjabberdUnavailable

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.config import LoginRefused
from device_agent import AgentConfig, DeviceAgent
from protocol.capabilities import BrokerOffer, RoleNeeds, clamp_inflight, refusal, session_note
from protocol.mqtt import BrokerAddress, BrokerUnusable, new_client
from protocol.topics import Topics
from results_db import Collector, CollectorConfig
from results_db.collector import COLLECTOR_NEEDS

# ejabberd 23.01's CONNACK to an MQTT 5 CONNECT, as it came off the wire here (tests/ejabberd.py setup):
# success, properties TopicAliasMaximum 100, SharedSubscriptionAvailable 0, SessionExpiryInterval 0,
# ServerKeepAlive 60.
EJABBERD_CONNACK = bytes.fromhex("201000000d2200642a00110000000013003c")
WORKER = RoleNeeds("cloud worker", retain=True, wildcards=True, shared_subscriptions=True)


def connack_properties(address: BrokerAddress) -> Dict[str, Any]:
    """The CONNACK properties a real broker sends to a paho MQTT 5 client, as paho decoded them."""
    got: Dict[str, Any] = {}
    done = threading.Event()

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        got.update(reason=reason, props=props, inflight=c._max_inflight_messages)
        done.set()

    client = new_client(address, f"probe-{threading.get_ident()}", on_connect=on_connect, max_inflight=5000)
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        assert done.wait(10), "no CONNACK within 10 s"
    finally:
        client.disconnect()
        client.loop_stop()
    assert not got["reason"].is_failure, got["reason"]
    return got


def test_recorded_ejabberd_connack_says_no_shared_subscriptions() -> None:
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    assert EJABBERD_CONNACK[0] >> 4 == PacketTypes.CONNACK and EJABBERD_CONNACK[3] == 0  # success
    props = Properties(PacketTypes.CONNACK)
    props.unpack(EJABBERD_CONNACK[4:])
    offer = BrokerOffer.from_connack(props)
    assert offer == BrokerOffer(shared_subscriptions=False, session_expiry_s=0)
    why = refusal(offer, WORKER, "ejabberd:1883")
    assert why == (
        "the broker at ejabberd:1883 cannot serve a cloud worker: no shared subscriptions "
        "(SharedSubscriptionAvailable=0): workers join $share/ groups"
    )
    assert "\n" not in why
    assert refusal(offer, COLLECTOR_NEEDS, "ejabberd:1883") is None
    assert session_note(offer, 3600) is not None and session_note(BrokerOffer(), 3600) is None


def test_no_properties_means_the_mqtt5_defaults() -> None:
    assert BrokerOffer.from_connack(None) == BrokerOffer()
    assert refusal(BrokerOffer(), WORKER, "b:1") is None


def test_packet_size_qos_and_wildcards_are_checked() -> None:
    device = RoleNeeds("device", retain=True, wildcards=True, largest_payload_bytes=784)
    assert refusal(BrokerOffer(maximum_packet_bytes=1808), device, "b:1") is None
    small = refusal(BrokerOffer(maximum_packet_bytes=1807), device, "b:1")
    assert small is not None and "packets up to 1807 bytes (MaximumPacketSize)" in small and "1808" in small
    several = refusal(BrokerOffer(maximum_qos=0, wildcard_subscriptions=False, retain=False), device, "b:1")
    assert several is not None and several.count(";") == 2 and "QoS at most 0" in several


def test_full_mosquitto_serves_every_role_and_its_receive_maximum_caps_our_window(
    broker: BrokerProcess,
) -> None:
    got = connack_properties(broker.credentials("cloud"))
    offer = BrokerOffer.from_connack(got["props"])
    assert offer.shared_subscriptions and offer.retain and offer.maximum_qos == 2
    assert offer.receive_maximum == 1000  # edgecascade.conf: max_inflight_messages 1000
    assert got["inflight"] == 1000  # new_client asked for 5000: cut to what the broker takes
    device = RoleNeeds("device", retain=True, wildcards=True, largest_payload_bytes=784)
    for needs in (WORKER, COLLECTOR_NEEDS, device):
        assert refusal(offer, needs, "b:1") is None


def test_clamp_never_widens() -> None:
    class Client:
        _max_inflight_messages = 0

    client = Client()
    assert clamp_inflight(client, BrokerOffer(receive_maximum=65535), 16) == 16
    assert client._max_inflight_messages == 16


# -- real brokers that lack something --------------------------------------------------------------------


@pytest.fixture(scope="module")
def ejabberd() -> Iterator[EjabberdProcess]:
    try:
        server = EjabberdProcess().start()
    except EjabberdUnavailable as exc:
        pytest.fail(f"ejabberd for the shared-subscription test: {exc}")
    yield server
    server.stop()


def test_ejabberd_tells_a_real_client_it_has_no_shared_subscriptions(ejabberd: EjabberdProcess) -> None:
    offer = BrokerOffer.from_connack(connack_properties(ejabberd.account("probe"))["props"])
    assert not offer.shared_subscriptions and offer.retain


def test_cloud_worker_refuses_ejabberd_at_start(ejabberd: EjabberdProcess, tiny_models: Path) -> None:
    config = WorkerConfig(ejabberd.account("cloud"), Topics(), tiny_models, "w-ejabberd")
    with pytest.raises(LoginRefused) as refused:
        CloudWorker(config).start(timeout_s=20)
    assert str(refused.value) == (
        f"the broker at 127.0.0.1:{ejabberd.port} cannot serve a cloud worker: no shared subscriptions "
        "(SharedSubscriptionAvailable=0): workers join $share/ groups"
    )


def test_collector_accepts_ejabberd(ejabberd: EjabberdProcess, tmp_path: Path) -> None:
    config = CollectorConfig(ejabberd.account("collector"), Topics(), str(tmp_path / "r.db"))
    collector = Collector(config).start()  # subscribed: it needs no shared subscription
    collector.stop()
    assert collector.refused is None


def test_device_refuses_mosquitto_without_retain(tmp_path: Path, tiny_models: Path, topics: Topics) -> None:
    with BrokerProcess(tmp_path / "broker", extra_config="retain_available false") as plain:
        config = quick_agent_config(plain, topics, tiny_models, tmp_path / "state")
        # The device's Last Will is retained: Mosquitto refuses the CONNECT itself (0x9A), for good.
        with pytest.raises(BrokerUnusable, match=r"does not support retained messages"):
            DeviceAgent(config).start()
        worker = WorkerConfig(plain.credentials("cloud"), topics, tiny_models, "w-noretain")
        with pytest.raises(LoginRefused, match=r"does not support retained messages"):
            CloudWorker(worker).start(timeout_s=20)
        # Without its load the worker publishes nothing retained: that broker is fine for it.
        CloudWorker(dataclasses.replace(worker, load_interval_s=0.0)).start().stop(drain_s=0)


def test_device_refuses_a_packet_limit_below_its_offloads(
    tmp_path: Path, tiny_models: Path, topics: Topics
) -> None:
    with BrokerProcess(tmp_path / "broker", extra_config="max_packet_size 1500") as small:
        config: AgentConfig = quick_agent_config(small, topics, tiny_models, tmp_path / "state")
        with pytest.raises(BrokerUnusable, match=r"packets up to 1500 bytes \(MaximumPacketSize\)"):
            DeviceAgent(config).start()
