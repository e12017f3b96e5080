"""One device must not be able to hurt others through the broker (issue #13, points 5, 6 and 13).

All against the real Mosquitto with the project's config: the dynamic-security roles and client-id binding
(broker/dynsec.py, edgecascade-roles.json) and the devices' ACL.
"""

from __future__ import annotations

import json
import ssl
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import paho.mqtt.client as mqtt
import pytest
from tinymodels import tiny_images

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.probe import OffloadProbe
from protocol.ids import InvalidId
from protocol.mqtt import BrokerAddress, connect_properties, new_client
from protocol.topics import Topics

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def _connect(address: BrokerAddress, client_id: str, session_expiry_s: int = 0) -> Tuple[mqtt.Client, Any]:
    """Connect and wait for the CONNACK; the client (network loop running) and the reason code."""
    reasons: List[Any] = []
    done = threading.Event()
    client = new_client(address, client_id, on_connect=lambda c, u, f, r, p: (reasons.append(r), done.set()))
    client.connect(
        address.host,
        address.port,
        clean_start=session_expiry_s == 0,
        properties=connect_properties(session_expiry_s),
    )
    client.loop_start()
    assert done.wait(5), "no CONNACK"
    return client, reasons[0]


def _subscribe(client: mqtt.Client, topic: str) -> Any:
    """SUBSCRIBE at QoS 1 and wait for the SUBACK; its one reason code."""
    granted: List[Any] = []
    done = threading.Event()
    client.on_subscribe = lambda c, u, mid, reasons, p: (granted.extend(reasons), done.set())
    client.subscribe(topic, qos=1)
    assert done.wait(5), "no SUBACK"
    return granted[0]


def _close(*clients: mqtt.Client) -> None:
    for c in clients:
        c.disconnect()
        c.loop_stop()


# -- point 5: client-id takeover ---------------------------------------------------------------------------
def test_a_device_cannot_take_over_another_devices_or_the_collectors_session(
    broker: BrokerProcess, topics: Topics
) -> None:
    victim, attacker = "cam-victim", "cam-attacker"
    broker.add_users([victim, attacker])
    victim_client, reason = _connect(broker.credentials(victim), victim, session_expiry_s=300)
    assert not reason.is_failure
    collector, reason = _connect(
        broker.credentials("collector"), "edgecascade-collector", session_expiry_s=300
    )
    assert not reason.is_failure
    lost: List[Any] = []
    victim_client.on_disconnect = lambda *a: lost.append(a)
    collector.on_disconnect = lambda *a: lost.append(a)
    try:
        for taken in (victim, "edgecascade-collector"):
            intruder, reason = _connect(broker.credentials(attacker), taken)
            _close(intruder)
            assert reason.is_failure, f"{attacker} logged in with client id {taken}"
        # Both sessions are intact: a message for the victim still reaches its connection.
        got: List[bytes] = []
        arrived = threading.Event()
        victim_client.on_message = lambda c, u, m: (got.append(m.payload), arrived.set())
        assert not _subscribe(victim_client, topics.receipts(victim)).is_failure
        collector.publish(topics.receipts(victim), b"still yours", qos=1).wait_for_publish(5)
        assert arrived.wait(5) and got == [b"still yours"]
        assert lost == [] and victim_client.is_connected() and collector.is_connected()
        # Its own client id is the one a device may use; a made-up one is refused too.
        own, reason = _connect(broker.credentials(attacker), attacker)
        _close(own)
        assert not reason.is_failure
        other, reason = _connect(broker.credentials(attacker), f"{attacker}-2")
        _close(other)
        assert reason.is_failure
    finally:
        _close(victim_client, collector)


# -- point 6: shared-subscription hijack -------------------------------------------------------------------
@pytest.fixture
def worker(broker: BrokerProcess, topics: Topics, tiny_models: Path) -> Iterator[CloudWorker]:
    with CloudWorker(WorkerConfig(broker.credentials("cloud"), topics, tiny_models, "w-share")) as w:
        yield w


def test_only_the_cloud_role_may_join_the_shared_group(
    broker: BrokerProcess, topics: Topics, worker: CloudWorker
) -> None:
    """Three device sessions try to join the workers' group and stay connected; a legitimate device's
    offloads are all answered by the real worker (with them in the group, about a quarter would be)."""
    hijackers = []
    try:
        for i in range(3):
            name = f"cam-hijack-{i}"
            client, reason = _connect(broker.credentials(name), name)
            hijackers.append(client)
            assert not reason.is_failure
            for filter_ in (
                worker.subscription,
                f"$share/cloud/{topics.all_offloads}",
                f"$share/x/{topics.root}/#",
            ):
                assert _subscribe(client, filter_).is_failure, f"{name} got into {filter_}"
        with OffloadProbe(broker.credentials("cam-legit"), topics, "cam-legit") as probe:
            images = tiny_images(60, seed=3)
            futures = [probe.request(images[i], seq=i, expiry_s=10) for i in range(60)]
            answers = [f.result(timeout=15) for f in futures]
        assert [a.reply.seq for a in answers] == list(range(60))
        assert {a.reply.worker_id for a in answers} == {"w-share"}
        assert all(c.is_connected() for c in hijackers)
    finally:
        _close(*hijackers)


def test_a_cloud_account_may_join_the_group(broker: BrokerProcess, topics: Topics) -> None:
    """The other side of the rule: `cloud` and a per-instance `cloud-<x>` account both may."""
    for user in ("cloud", "cloud-gpu1"):
        client, reason = _connect(broker.credentials(user), f"{user}-probe")
        try:
            assert not reason.is_failure
            assert not _subscribe(client, topics.cloud_subscription()).is_failure
        finally:
            _close(client)


# -- point 13: account names and the launcher's listeners ---------------------------------------------------
@pytest.mark.parametrize("name", ["cam+1", "cam#", "a/b", "", "x" * 65, "edgecascade-admin2", "-cam"])
def test_account_names_that_break_topics_or_ids_are_refused(broker: BrokerProcess, name: str) -> None:
    with pytest.raises(InvalidId):
        broker.add_users([name])
    assert name not in broker.users


def _edgecascade(*args: str, timeout_s: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "edgecascade", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


def test_broker_cli_refuses_bad_names_and_plaintext_on_the_network(tmp_path: Path) -> None:
    bad = _edgecascade("broker", "--workdir", str(tmp_path / "w1"), "--users", "cam-01,cam/+")
    assert bad.returncode == 2 and bad.stderr.startswith("edgecascade broker: device id 'cam/+'")
    assert bad.stderr.count("\n") == 1  # one line, no traceback
    plain = _edgecascade("broker", "--workdir", str(tmp_path / "w2"), "--host", "0.0.0.0")
    assert plain.returncode == 2 and "--tls-dir" in plain.stderr and "clear text" in plain.stderr


def test_broker_cli_serves_tls_with_the_plaintext_listener_on_loopback(tmp_path: Path) -> None:
    certs = tmp_path / "certs"  # empty: the launcher makes a test CA and server certificate in it
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "edgecascade",
            "broker",
            "--workdir",
            str(tmp_path / "w"),
            "--host",
            "localhost",
            "--tls-dir",
            str(certs),
            "--users",
            "cam-tls",
            "--credentials-out",
            str(tmp_path / "creds.json"),
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline())
        assert info["host"] == "127.0.0.1" and info["tls_host"] == "localhost"
        assert Path(info["tls_ca"]) == certs / "ca.crt"
        creds = json.loads((tmp_path / "creds.json").read_text())
        assert (tmp_path / "creds.json").stat().st_mode & 0o077 == 0
        tls = BrokerAddress(
            "localhost", info["tls_port"], "cam-tls", creds["passwords"]["cam-tls"], info["tls_ca"]
        )
        client, reason = _connect(tls, "cam-tls")
        assert not reason.is_failure
        assert isinstance(client.socket(), ssl.SSLSocket)
        _close(client)
    finally:
        proc.terminate()
        assert proc.wait(10) == 0


def test_refused_logins_get_a_clear_reason(broker: BrokerProcess) -> None:
    """What the services' `permanent_connack_refusal` is given by this broker for a login that cannot heal."""
    from protocol.mqtt import permanent_connack_refusal

    good = broker.credentials("cam-reason")
    for address, client_id in (
        (BrokerAddress(good.host, good.port, "cam-reason", "wrong"), "cam-reason"),
        (BrokerAddress(good.host, good.port, "nobody-here", "x"), "nobody-here"),
        (good, "not-my-id"),
    ):
        client, reason = _connect(address, client_id)
        _close(client)
        assert reason.is_failure and permanent_connack_refusal(reason) is not None, (client_id, reason)
    assert (
        permanent_connack_refusal(0x88) is None and permanent_connack_refusal(0) is None
    )  # may heal / no refusal
