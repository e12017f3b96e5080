"""Bridged edge sites (issue 19, point 2): a site broker bridged to its cell through the cells' HAProxy, the
bridge's uplink cut mid-run by a relay (bench.link's proxy, `down`/`up`): the site's devices answer at the
edge meanwhile (labelled), nothing is lost or stored twice once the bridge is back, and MQTT 5's reply
properties cross the bridge. Real Mosquitto (cell and site), real HAProxy, tiny models on onnxruntime."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from agents import HeldStreams, quick_agent_config
from bridged import bridged_site
from waiting import wait_for

from bench.accounting import compare, identities
from bench.link import EmulatedLink
from broker.launcher import find_free_port
from cells.haproxy import routes_in_log
from cells.plan import PlanError, write_plan
from cells.sites import Site, SitesPlan, write_sites
from cells.stack import CellStack
from device_agent import DeviceAgent
from device_agent.sources import load_idx_dataset
from edgecascade.cli import main
from protocol.ids import InvalidId, check_device_id
from protocol.mqtt import BrokerAddress, new_client

pytestmark = pytest.mark.integration
SAMPLES = 150
CUT_AFTER = 40
HOLD_AT = 110


class SiteLogin:
    """What quick_agent_config asks a broker for: a device's login, here at its site broker."""

    def __init__(self, site: Site) -> None:
        self.site = site

    def credentials(self, device_id: str) -> BrokerAddress:
        return self.site.device_address(device_id)


@pytest.fixture
def bridged(tmp_path: Path, tiny_models: Path) -> Iterator[Dict[str, Any]]:
    """One cell (a worker, a collector) behind HAProxy, a relay before it, a site bridged through that."""
    cells = write_plan(tmp_path / "cells", cells=1, port=find_free_port(count=2), namespace="sites")
    db = tmp_path / "results.db"
    with EmulatedLink("lan", {"mqtt": (cells.host, cells.port)}, mode="proxy-only") as link, bridged_site(
        cells, tmp_path / "sites", tiny_models / "cloud.onnx", db, remote=link.address("mqtt")
    ) as up:
        yield {"cells": cells, "sites": up.sites, "link": link, "db": db, "stack": up.stack}


def _rows(db: Path, device: str) -> List[Tuple[int, float, str]]:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(
            "SELECT label, p_main, exit_stage FROM inferences WHERE device_id = ?", (device,)
        ).fetchall()


def test_the_sites_plan_writes_a_private_bridge_and_refuses_a_second_plan(tmp_path: Path) -> None:
    cells = write_plan(tmp_path / "cells", cells=3, port=21101)
    sites = write_sites(tmp_path / "sites", cells, sites=["north", "south"], devices_per_site=3, port=21201)
    assert [s.port for s in sites.sites] == [21201, 21202]
    loaded = SitesPlan.load(tmp_path / "sites")
    assert loaded == sites and loaded.remote == ("127.0.0.1", 21101)  # through the cells' HAProxy
    north = loaded.site("north")
    conf = (north.bridge_dir / "cell.conf").read_text()
    assert "cleansession false" in conf and "bridge_protocol_version mqttv50" in conf
    assert "topic edgecascade/v1/+/results out 1" in conf and "topic edgecascade/v1/+/reply in 1" in conf
    assert (north.bridge_dir / "cell.conf").stat().st_mode & 0o077 == 0  # it holds the bridge's password
    assert f"include_dir {north.bridge_dir}" in (north.broker_dir / "mosquitto.conf").read_text()
    assert north.devices() == ["north-dev-000", "north-dev-001", "north-dev-002"]
    # the bridge's account exists on the one cell HAProxy routes it to, with its own role
    cell = cells.broker(north.cell)
    assert "bridge-north" in cell.users
    with pytest.raises(PlanError, match="exists"):
        write_sites(tmp_path / "sites", cells, sites=["west"])
    with pytest.raises(InvalidId, match="bridge account"):
        check_device_id("bridge-north")  # no device can take a bridge's name (and its role)
    with CellStack(cells, services=False), pytest.raises(PlanError, match="is running"):
        write_sites(tmp_path / "more", cells, sites=["west"])  # its account would be lost: refused


@pytest.mark.slow
def test_a_cut_bridge_loses_nothing_and_the_site_answers_at_the_edge_meanwhile(
    bridged: Dict[str, Any], tiny_models: Path, tmp_path: Path
) -> None:
    site = bridged["sites"].sites[0]
    link: EmulatedLink = bridged["link"]
    log = bridged["cells"].haproxy_cfg.with_name("haproxy.log")
    bridge_connected = lambda: any(s == "--" for _, s in routes_in_log(log).get(site.bridge_account, []))  # noqa: E731
    wait_for(bridge_connected, 30, "the bridge's first connection")
    images, labels = load_idx_dataset("fashion-mnist", "test", SAMPLES)
    streams = HeldStreams(images, labels, HOLD_AT)
    agents = {
        device: DeviceAgent(
            quick_agent_config(
                SiteLogin(site),  # type: ignore[arg-type]
                bridged["cells"].topics,
                tiny_models,
                tmp_path / "state" / device,
                device_id=device,
                policy={"name": "cloud-only", "params": {"edge": "main"}},
                capacity_aware=False,
                offload_deadline_s=1.0,
                receipt_timeout_s=2.0,
            )
        ).start()
        for device in site.devices()
    }
    streams.start(agents)
    wait_for(lambda: streams.reached(CUT_AFTER), 60, f"{CUT_AFTER} samples each")
    link.down()
    wait_for(lambda: all(a.offloads.stats["fallbacks"] >= 2 for a in agents.values()), 60, "edge answers")
    assert all(a.link.stats["disconnects"] == 0 for a in agents.values())  # the devices' own broker is up
    link.up()
    streams.release_and_join()
    finals = {d: agents[d].close() for d in agents}
    expected = identities(tiny_models, SAMPLES)
    for device in agents:
        wait_for(lambda d=device: len(_rows(bridged["db"], d)) >= SAMPLES, 60, f"{device}'s rows")
        rows = _rows(bridged["db"], device)
        assert compare(expected, [(label, p) for label, p, _ in rows]) == (0, 0), device
        stages = [stage for *_, stage in rows]
        assert set(stages) <= {"cloud", "fallback"} and stages.count("fallback") >= 2
        assert stages.count("cloud") > 0
        assert streams.summaries[device].samples == SAMPLES and finals[device].outbox_left == {
            "record": 0,
            "offload": 0,
        }
    routes = routes_in_log(log)[site.bridge_account]
    assert sum(1 for _, state in routes if state == "--") >= 2  # the bridge reconnected after the cut


def test_a_bridge_account_carries_the_project_topics_and_nothing_else(tmp_path: Path) -> None:
    """On its cell the bridge may publish a device's results but not a reply (only the cloud answers)."""
    cells = write_plan(tmp_path / "cells", cells=1, port=find_free_port(count=2))
    write_sites(tmp_path / "sites", cells, sites=["east"], devices_per_site=0, port=find_free_port())
    with CellStack(cells, services=False) as stack:
        address = stack.brokers[0].credentials("bridge-east")
        acks: Dict[int, Any] = {}
        connected = threading.Event()
        client = new_client(address, "bridge-east", on_connect=lambda *a: connected.set())
        client.on_publish = lambda c, u, mid, reason, props: acks.__setitem__(mid, reason)
        client.connect(address.host, address.port)
        client.loop_start()
        try:
            assert connected.wait(10)
            allowed = client.publish(cells.topics.results("east-dev-000"), b"x", qos=1).mid
            refused = client.publish(cells.topics.reply("east-dev-000"), b"x", qos=1).mid
            wait_for(lambda: allowed in acks and refused in acks, 10, "both PUBACKs")
        finally:
            client.disconnect()
            client.loop_stop()
    assert not acks[allowed].is_failure and acks[refused].is_failure


def test_sites_plan_from_the_command_line(tmp_path: Path, capsys) -> None:
    cells = tmp_path / "cells"
    assert main(["cells", "plan", "--cells", "2", "--port", "21301", "--out", str(cells)]) == 0
    out = tmp_path / "sites"
    args = ["sites", "plan", "--cells-dir", str(cells), "--sites", "2", "--devices-per-site", "1"]
    assert main([*args, "--port", "21401", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "site-1: Mosquitto on 127.0.0.1:21402, 1 device(s), bridged as bridge-site-1" in printed
    assert SitesPlan.load(out).remote == ("127.0.0.1", 21301)
    assert main([*args, "--remote", "nowhere", "--out", str(tmp_path / "bad")]) == 2
    assert "expected HOST:PORT" in capsys.readouterr().err
