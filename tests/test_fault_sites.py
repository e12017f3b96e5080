"""The fault hierarchy with its gateway on a bridged site broker (issue 20, point 4): a sensor and the gateway
worker on the site's Mosquitto, the cloud worker and the collector on the cell's, behind HAProxy. The
sensor's windows reach the gateway on the site and never cross the bridge; what the gateway is unsure of
goes on (as device gw-<site>) across the bridge to the cloud, whose answers come back over it; the sensor's
rows reach the cell's collector. Real Mosquitto both ends, real HAProxy, the committed fault models on
onnxruntime, SQLite."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path
from typing import Any, List

import numpy as np
import pytest
from bridged import bridged_site
from waiting import wait_for

from broker.launcher import find_free_port
from cells.plan import write_plan
from cells.sites import GATEWAY_USER, write_sites
from cloud_worker.gateway import GATEWAY_GROUP, Forward, Gateway
from cloud_worker.worker import CloudWorker, WorkerConfig
from protocol.mqtt import new_client
from vibration.card import load_fault_card
from vibration.dataset import SplitSpec, make_windows
from vibration.offline import hierarchy, tier_probs
from vibration.rules import HiRule
from vibration.sensor import SensorAgent, SensorConfig, window_stream

MODELS = Path(__file__).resolve().parents[1] / "models" / "vibration"
N = 8  # windows


def _theta_between(confidence: np.ndarray, below: int) -> float:
    """A θ with exactly `below` of `confidence` under it, far enough from every value that a batch's float
    noise cannot move a window across it."""
    ordered = np.sort(confidence)
    low, high = float(ordered[below - 1]), float(ordered[below])
    assert high - low > 1e-3, f"no clear split at {below}: {ordered}"
    return (low + high) / 2


def test_the_sites_plan_gives_each_site_its_gateways_accounts(tmp_path: Path) -> None:
    cells = write_plan(tmp_path / "cells", cells=1, port=find_free_port(count=2))
    site = write_sites(tmp_path / "sites", cells, sites=["plant"], devices_per_site=1).sites[0]
    users = site.broker().users
    assert {GATEWAY_USER, "gw-plant", "plant-dev-000"} <= set(users)
    assert site.gateway_address().username == GATEWAY_USER
    assert site.gateway_address(site.forward_device).username == "gw-plant"
    assert site.gateway_password_file("gw-plant").stat().st_mode & 0o077 == 0
    assert site.devices() == ["plant-dev-000"]  # the gateway's device account is no sensor of the site
    assert "gw-plant" not in cells.broker(0).users  # behind the bridge, like the site's devices
    conf = (site.bridge_dir / "cell.conf").read_text()
    assert "/offload out 1" in conf and "gateway" not in conf  # the sensors' windows stay on the site


@pytest.mark.integration
def test_the_gateway_on_a_bridged_site_keeps_its_windows_there_and_asks_the_cloud_across(
    tmp_path: Path,
) -> None:
    windows = make_windows(SplitSpec("test", recordings=1, duration_s=0.5))
    pick = np.linspace(0, len(windows) - 1, N).round().astype(int)
    x, y = windows.x[pick], windows.y[pick]
    # thresholds forced so that each tier decides some: 3 at the sensor, 3 at the gateway, 2 in the cloud
    probs = tier_probs(load_fault_card(MODELS), x)
    sensor_theta = _theta_between(probs["sensor"].max(1), 5)
    left_sensor = probs["sensor"].max(1) < sensor_theta
    gateway_theta = _theta_between(probs["gateway"][left_sensor].max(1), 2)
    expected_answers, expected_stages = hierarchy(probs, HiRule(sensor_theta), HiRule(gateway_theta))
    assert sorted(set(expected_stages)) == ["cloud", "gateway", "main"]

    cells = write_plan(tmp_path / "cells", cells=1, port=find_free_port(count=2), namespace="fault")
    topics = cells.topics
    db = tmp_path / "results.db"
    with bridged_site(
        cells, tmp_path / "sites", MODELS, db, devices_per_site=1, max_wait_ms=1.0, load_interval_s=0
    ) as bridged:
        site = bridged.site
        wait_for(lambda: bridged.bridge_logins() >= 1, 30, "the bridge's first connection")
        # on the cell, a subscriber to every sensor's gateway topic: none may arrive there
        cell = bridged.stack.brokers[0]
        spy_address = cell.credentials(GATEWAY_USER)
        leaked: List[str] = []
        subscribed = threading.Event()
        spy = new_client(
            spy_address,
            "gateway-spy",
            on_connect=lambda c, *a: c.subscribe(f"{topics.root}/+/gateway", qos=1),
        )
        spy.on_subscribe = lambda c, u, mid, codes, props: (
            subscribed.set() if not codes[0].is_failure else None
        )
        spy.on_message = lambda c, u, message: leaked.append(message.topic)
        spy.connect(spy_address.host, spy_address.port)
        spy.loop_start()
        gateway = None
        try:
            assert subscribed.wait(10), "the spy's subscription on the cell"
            forward = Forward(site.gateway_address(site.forward_device), topics, site.forward_device, 10.0)
            gateway = CloudWorker(
                WorkerConfig(
                    site.gateway_address(),
                    topics,
                    MODELS,
                    "g0",
                    group=GATEWAY_GROUP,
                    max_wait_ms=1.0,
                    load_interval_s=0,
                ),
                task=Gateway(MODELS, rule=f"hi:{gateway_theta}", forward=forward),
            ).start()
            (sensor,) = site.devices()
            config = SensorConfig(
                device_id=sensor,
                broker=site.device_address(sensor),
                topics=topics,
                model_dir=MODELS,
                state_dir=tmp_path / sensor,
                rule="hi",
                theta=sensor_theta,
                uplink="gateway",
                deadline_s=20.0,
                realtime=False,
            )
            with SensorAgent(config) as agent:
                summary = agent.run(window_stream(x, y))
            assert summary.windows == N and summary.fallbacks == 0, summary

            def rows() -> List[Any]:
                if not db.exists():
                    return []
                with sqlite3.connect(db, timeout=10) as con:
                    return con.execute(
                        "SELECT exit_stage, prediction, label, p_gateway, p_cloud FROM inferences "
                        "WHERE device_id = ? ORDER BY seq",
                        (sensor,),
                    ).fetchall()

            wait_for(lambda: len(rows()) == N, 60, "the sensor's rows in the cell's database")
            gateway_stats, cloud_stats = dict(gateway.stats), dict(bridged.worker.stats)
            # the control: a gateway-topic message published on the cell does reach the spy
            probe = cell.credentials("probe-dev")
            prober = new_client(probe, "probe-dev")
            prober.connect(probe.host, probe.port)
            prober.loop_start()
            try:
                prober.publish(topics.gateway("probe-dev"), b"x", qos=1).wait_for_publish(10)
            finally:
                prober.disconnect()
                prober.loop_stop()
            wait_for(lambda: len(leaked) > 0, 10, "the control message at the spy")
        finally:
            if gateway is not None:
                gateway.stop()
            spy.disconnect()
            spy.loop_stop()
    got = rows()
    assert [r[0] for r in got] == list(expected_stages)
    assert [r[1] for r in got] == [int(v) for v in expected_answers]  # the deciding tier's answer
    assert [r[2] for r in got] == [int(v) for v in y]
    assert all((r[3] is not None) == (r[0] != "main") for r in got)  # the gateway saw what left the sensor
    assert all((r[4] is not None) == (r[0] == "cloud") for r in got)
    # the gateway on the site answered every window that left the sensor; the cell's cloud worker only
    # those the gateway forwarded, so they crossed the bridge up and their answers came back down
    assert gateway_stats["answered"] == int(left_sensor.sum())
    assert cloud_stats["answered"] == list(expected_stages).count("cloud")
    assert leaked == [topics.gateway("probe-dev")]  # no sensor's window reached the cell
