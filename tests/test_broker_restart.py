"""`edgecascade broker` restarted on its work directory, and killed (issue #13, point 10).

A restart keeps every password and port, so connected clients reconnect by themselves with what they have;
the launcher's Mosquitto never outlives the launcher, not even a SIGKILLed one.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest
from waiting import wait_for

from broker.launcher import BrokerProcess
from protocol.mqtt import BrokerAddress, connect_properties, new_client

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def _launch(workdir: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "edgecascade", "broker", "--workdir", str(workdir), *extra],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _ready(proc: subprocess.Popen) -> Dict[str, Any]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    assert line, proc.stderr.read() if proc.stderr else "no output"
    return json.loads(line)


def _children(pid: int) -> Set[int]:
    """Direct children of `pid`, from every one of its threads (the spawner thread forks Mosquitto)."""
    found: Set[int] = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is dead too: only its exit status is left for its parent (or init) to collect.
    return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"


def test_a_restart_keeps_passwords_and_port_and_clients_reconnect(tmp_path: Path) -> None:
    workdir, creds_file = tmp_path / "broker", tmp_path / "creds.json"
    first = _launch(workdir, "--users", "cam-01", "--credentials-out", str(creds_file))
    info = _ready(first)
    creds = json.loads(creds_file.read_text())
    connects: List[Any] = []
    # A device with a persistent session, paho's own reconnect loop, and the credentials it started with.
    address = BrokerAddress(info["host"], info["port"], "cam-01", creds["passwords"]["cam-01"])
    client = new_client(address, "cam-01", on_connect=lambda c, u, f, r, p: connects.append(r))
    client.connect(address.host, address.port, clean_start=False, properties=connect_properties(300))
    client.loop_start()
    second = None
    try:
        wait_for(lambda: len(connects) == 1, what="the first connection")
        first.send_signal(signal.SIGTERM)
        assert first.wait(10) == 0
        second = _launch(workdir, "--credentials-out", str(creds_file))
        again = _ready(second)
        assert (again["host"], again["port"]) == (info["host"], info["port"])
        assert json.loads(creds_file.read_text())["passwords"] == creds["passwords"]
        assert sorted(again["users"]) == ["cam-01", "cloud", "collector"]
        wait_for(lambda: len(connects) >= 2, what="the reconnect after the restart")
        assert all(not r.is_failure for r in connects), connects
        assert (workdir / "credentials.json").stat().st_mode & 0o077 == 0
    finally:
        client.disconnect()
        client.loop_stop()
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.terminate()
                proc.wait(10)


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_mosquitto_stops_with_its_launcher(tmp_path: Path, signum: int) -> None:
    launcher = _launch(tmp_path / "broker")
    _ready(launcher)
    (mosquitto,) = _children(launcher.pid)
    assert "mosquitto" in Path(f"/proc/{mosquitto}/cmdline").read_text()
    launcher.send_signal(signum)
    launcher.wait(10)
    wait_for(lambda: not _alive(mosquitto), what=f"mosquitto {mosquitto} to exit after {signum!r}")


def test_a_broker_started_from_a_short_lived_thread_outlives_that_thread(tmp_path: Path) -> None:
    """The parent-death signal follows the thread that forked; the launcher forks from one that stays."""
    broker = BrokerProcess(tmp_path / "b")
    starter = threading.Thread(target=broker.start)
    starter.start()
    starter.join()
    try:
        pid = broker.pid
        assert pid is not None
        address = broker.credentials("cloud")
        connected = threading.Event()
        client = new_client(address, "cloud-thread", on_connect=lambda c, u, f, r, p: connected.set())
        client.connect(address.host, address.port)
        client.loop_start()
        assert connected.wait(5) and broker.running
        client.disconnect()
        client.loop_stop()
    finally:
        broker.close()
