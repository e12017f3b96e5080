"""Broker cells behind HAProxy (issue 19, point 1): the plan's files, and the routing by MQTT client id
through a real HAProxy to real Mosquitto cells, the same cell on every reconnect and after HAProxy restarts.

A device's account exists on its own cell only, so a device routed anywhere else would be refused: every
successful CONNACK through HAProxy is itself a check that the routing matched `cells.routing.cell_of`."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Iterator, List

import pytest
from waiting import wait_for

from broker.launcher import find_free_port
from cells.haproxy import cells_per_client, routes_in_log
from cells.plan import CellsPlan, PlanError, write_plan
from cells.routing import cell_of
from cells.stack import CellStack
from edgecascade.cli import main
from protocol.mqtt import BrokerAddress, connect_properties, new_client

pytestmark = pytest.mark.integration
DEVICES = [f"dev-{i:03d}" for i in range(24)]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CellStack]:
    """3 cells and HAProxy (no services: routing needs none), 24 device accounts."""
    plan = write_plan(
        tmp_path_factory.mktemp("cells") / "plan", cells=3, port=find_free_port(count=4), devices=DEVICES
    )
    with CellStack(plan, services=False) as running:
        yield running


def connect_once(address: BrokerAddress, client_id: str, clean: bool = False) -> Any:
    """One CONNECT through `address`; the CONNACK's reason code (None: no CONNACK within 10 s)."""
    answered = threading.Event()
    reasons: List[Any] = []

    def on_connect(c: Any, userdata: Any, flags: Any, reason: Any, props: Any) -> None:
        reasons.append(reason)
        answered.set()

    client = new_client(address, client_id, on_connect=on_connect)
    client.connect(address.host, address.port, clean_start=clean, properties=connect_properties(300))
    client.loop_start()
    try:
        answered.wait(10)
    finally:
        client.disconnect()
        client.loop_stop()
    return reasons[0] if reasons else None


def test_the_plan_writes_each_cell_its_config_and_each_device_one_account(tmp_path: Path, capsys) -> None:
    out = tmp_path / "plan"
    assert (
        main(["cells", "plan", "--cells", "3", "--devices", "12", "--port", "21001", "--out", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "edgecascade cells up" in printed and "cell-2: Mosquitto on 127.0.0.1:21004" in printed
    plan = CellsPlan.load(out)
    assert [c.port for c in plan.cells] == [21002, 21003, 21004]
    assert plan.devices() == [f"dev-{i:03d}" for i in range(12)]
    for cell in plan.cells:
        conf = (cell.broker_dir / "mosquitto.conf").read_text()
        assert f"listener {cell.port} 127.0.0.1" in conf and "allow_anonymous false" in conf
        accounts = json.loads((cell.broker_dir / "dynamic-security.json").read_text())["clients"]
        mine = {a["username"] for a in accounts} - {"cloud", "collector", "edgecascade-admin"}
        assert mine == {d for d in plan.devices() if cell_of(d, 3) == cell.index}
        worker = (cell.directory / "cloud-0.toml").read_text()
        assert f'broker = "127.0.0.1:{cell.port}"' in worker and f'worker_id = "c{cell.index}-w0"' in worker
        assert f'broker = "127.0.0.1:{cell.port}"' in (cell.directory / "collect.toml").read_text()
        assert (cell.directory / "cloud.pw").stat().st_mode & 0o077 == 0
    assert (out / "devices" / "dev-000.pw").stat().st_mode & 0o077 == 0
    # a second plan into the same directory would change every password: refused with the reason
    assert main(["cells", "plan", "--cells", "2", "--out", str(out)]) == 2
    assert "would change every password" in capsys.readouterr().err
    assert main(["cells", "route", str(out), "dev-003"]) == 0
    assert capsys.readouterr().out == f"dev-003\tcell-{cell_of('dev-003', 3)}\n"


def test_a_plan_with_bad_settings_is_refused_with_the_reason(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="--cells must be >= 1"):
        write_plan(tmp_path / "a", cells=0)
    with pytest.raises(PlanError, match="must lie in 1..65535"):
        write_plan(tmp_path / "b", cells=3, port=65534)
    with pytest.raises(PlanError, match="not found"):
        CellsPlan.load(tmp_path / "nothing")


def test_every_device_lands_in_its_own_cell_on_every_reconnect_and_haproxy_restart(stack: CellStack) -> None:
    plan = stack.plan
    assert {plan.cell_of(d) for d in DEVICES} == {0, 1, 2}  # the 24 ids spread over all three cells
    for round_ in range(3):
        for device in DEVICES:
            reason = connect_once(plan.device_address(device), device)
            assert reason is not None and not reason.is_failure, (device, round_, reason)
        if round_ == 1:
            stack.haproxy.restart()  # routing is computed from the CONNECT, not remembered by HAProxy
    log = plan.directory / "haproxy.log"
    wait_for(
        lambda: all(len(routes_in_log(log).get(d, [])) >= 3 for d in DEVICES), 10, "3 logged routes each"
    )
    seen = cells_per_client(log)
    assert {d: seen[d] for d in DEVICES} == {d: {f"cell-{cell_of(d, 3)}"} for d in DEVICES}


def test_a_device_with_the_client_id_of_another_cell_is_refused_there(stack: CellStack) -> None:
    """The account lives on its own cell only: a CONNECT routed elsewhere finds no such account."""
    device = DEVICES[0]
    other = next(d for d in DEVICES if stack.plan.cell_of(d) != stack.plan.cell_of(device))
    reason = connect_once(stack.plan.device_address(device), other)  # its password, another's client id
    assert reason is not None and reason.is_failure


def test_bytes_that_are_not_mqtt_are_refused_and_a_split_connect_still_routes(stack: CellStack) -> None:
    plan = stack.plan
    with socket.create_connection((plan.host, plan.port), timeout=10) as junk:
        junk.sendall(b"GET / HTTP/1.0\r\n\r\n")
        assert junk.recv(64) == b""  # closed by HAProxy, no broker saw it
    # a CONNECT (MQTT 3.1.1, client id dev-000, no credentials) in two segments: HAProxy waits for all of it
    # and routes it; the cell answers (not authorized: no password), which only a routed CONNECT gets
    client_id = DEVICES[0].encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + len(client_id).to_bytes(2, "big") + client_id
    packet = bytes([0x10, len(body)]) + body
    with socket.create_connection((plan.host, plan.port), timeout=10) as split:
        split.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        split.sendall(packet[:7])
        # the stimulus, not a wait: HAProxy reads and inspects the first part alone before the rest comes
        time.sleep(0.3)
        split.sendall(packet[7:])
        connack = split.recv(4)
    assert connack[:1] == b"\x20" and connack[3] != 0  # a CONNACK, refusing the anonymous login


def test_cells_up_starts_the_planned_brokers_and_haproxy_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The newcomer's command, as a process (`--no-services`: the cells benchmark runs the services)."""
    plan = write_plan(tmp_path / "plan", cells=2, port=find_free_port(count=3), devices=["dev-up"])
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgecascade", "cells", "up", str(plan.directory), "--no-services"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stdout is not None
        info = json.loads(proc.stdout.readline() or "{}")
        assert info["haproxy"] == f"{plan.host}:{plan.port}" and len(info["cells"]) == 2
        reason = connect_once(plan.device_address("dev-up"), "dev-up")
        assert reason is not None and not reason.is_failure
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0, proc.stderr.read() if proc.stderr else ""
    with pytest.raises(OSError):  # HAProxy went with it
        socket.create_connection((plan.host, plan.port), timeout=1).close()
