"""The broker's TLS listener with certificates from broker/make-test-certs.sh."""

from __future__ import annotations

import ssl
import subprocess
import threading
from pathlib import Path
from typing import Iterator

import paho.mqtt.client as mqtt
import pytest
from tinymodels import tiny_images

from broker.launcher import CERT_SCRIPT, BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.probe import OffloadProbe
from protocol.mqtt import BrokerAddress, new_client
from protocol.topics import Topics

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("certs")
    subprocess.run(["sh", str(CERT_SCRIPT), str(directory)], check=True, capture_output=True)
    return directory


@pytest.fixture(scope="module")
def tls_broker(tmp_path_factory: pytest.TempPathFactory, certs: Path) -> Iterator[BrokerProcess]:
    with BrokerProcess(tmp_path_factory.mktemp("tls-broker"), tls_dir=certs) as proc:
        yield proc


def test_script_makes_a_ca_and_a_localhost_server_certificate(certs: Path) -> None:
    assert {p.name for p in certs.iterdir()} >= {"ca.crt", "ca.key", "server.crt", "server.key"}
    assert (certs / "server.key").stat().st_mode & 0o077 == 0 and (
        certs / "ca.key"
    ).stat().st_mode & 0o077 == 0
    verify = subprocess.run(
        ["openssl", "verify", "-CAfile", str(certs / "ca.crt"), str(certs / "server.crt")],
        capture_output=True,
        text=True,
    )
    assert verify.returncode == 0, verify.stderr
    text = subprocess.run(
        ["openssl", "x509", "-in", str(certs / "server.crt"), "-noout", "-text"],
        capture_output=True,
        text=True,
    ).stdout
    assert (
        "DNS:localhost" in text and "IP Address:127.0.0.1" in text and "TLS Web Server Authentication" in text
    )
    again = subprocess.run(["sh", str(CERT_SCRIPT), str(certs)], capture_output=True, text=True)
    assert again.returncode != 0 and "FORCE=1" in again.stderr  # never silently replaces a CA


def _connack(address: BrokerAddress) -> mqtt.ReasonCode:
    result: list = []
    done = threading.Event()
    client = new_client(address, "tls-probe", on_connect=lambda c, u, f, r, p: (result.append(r), done.set()))
    client.connect(address.host, address.port)
    client.loop_start()
    try:
        assert done.wait(5), "no CONNACK over TLS"
        assert isinstance(client.socket(), ssl.SSLSocket)
    finally:
        client.disconnect()
        client.loop_stop()
    return result[0]


def test_client_with_the_ca_connects_over_tls(tls_broker: BrokerProcess) -> None:
    assert not _connack(tls_broker.credentials("cloud", tls=True)).is_failure


def test_without_the_ca_the_server_certificate_is_refused(tls_broker: BrokerProcess) -> None:
    address = tls_broker.credentials("cloud", tls=True)
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    client.username_pw_set(address.username, address.password)
    client.tls_set()  # the system's CA bundle, which does not know our test CA
    with pytest.raises(ssl.SSLCertVerificationError):
        client.connect(address.host, address.port)


def test_plain_mqtt_on_the_tls_port_gets_no_session(tls_broker: BrokerProcess) -> None:
    tls = tls_broker.credentials("cloud", tls=True)
    plain = BrokerAddress(tls.host, tls.port, tls.username, tls.password)  # no tls_ca: plain TCP
    connacks: list = []
    client = new_client(plain, "plain-on-tls", on_connect=lambda c, u, f, r, p: connacks.append(r))
    client.connect(plain.host, plain.port)
    # Drive the loop by hand: the broker answers a plaintext CONNECT on a TLS port by closing the socket.
    rc = mqtt.MQTT_ERR_SUCCESS
    for _ in range(50):
        rc = client.loop(timeout=0.1)
        if rc != mqtt.MQTT_ERR_SUCCESS:
            break
    assert rc == mqtt.MQTT_ERR_CONN_LOST and connacks == []


def test_offload_round_trip_over_tls(tls_broker: BrokerProcess, tiny_models: Path) -> None:
    topics = Topics.namespaced("tls")
    config = WorkerConfig(tls_broker.credentials("cloud", tls=True), topics, tiny_models, "w-tls")
    with CloudWorker(config), OffloadProbe(
        tls_broker.credentials("dev-tls", tls=True), topics, "dev-tls"
    ) as probe:
        answer = probe.request(tiny_images(1)[0], seq=5).result(timeout=10)
    assert answer.reply.seq == 5 and answer.reply.worker_id == "w-tls"
