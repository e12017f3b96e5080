"""A cell SIGKILLed mid-run behind HAProxy (issue 19, point 1): its devices answer at the edge meanwhile
(labelled fallback), their outboxes hold their results, nothing is lost or stored twice once the cell is
back; the devices of the other cell never notice. Real Mosquitto cells, real HAProxy, real onnxruntime (the
tiny models), cloud workers and collectors in this process, one SQLite file for both cells' collectors."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any, Dict, Iterator, List, Tuple

import pytest
from agents import HeldStreams, quick_agent_config
from waiting import wait_for

from bench.accounting import compare, identities
from broker.launcher import find_free_port
from cells.haproxy import cells_per_client
from cells.plan import write_plan
from cells.stack import CellStack
from cloud_worker import CloudWorker, WorkerConfig
from device_agent import DeviceAgent
from device_agent.sources import load_idx_dataset
from results_db import Collector, CollectorConfig

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SAMPLES = 160
KILL_AFTER = 40  # every device has this many samples done when the cell is killed
HOLD_AT = 120  # ... and waits here (bounded) until it is back, so that some samples follow the return


def _devices_of(plan: Any, cell: int, count: int) -> List[str]:
    found = (f"dev-{i:03d}" for i in range(1000))
    return [d for d in found if plan.cell_of(d) == cell][:count]


def _rows(db: Path, device: str) -> List[Tuple[int, float, str]]:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(
            "SELECT label, p_main, exit_stage FROM inferences WHERE device_id = ?", (device,)
        ).fetchall()


@pytest.fixture
def cells(tmp_path: Path, tiny_models: Path) -> Iterator[Dict[str, Any]]:
    """2 cells, HAProxy, and per cell a cloud worker and a collector into one results file."""
    plan = write_plan(tmp_path / "plan", cells=2, port=find_free_port(count=3), namespace="outage")
    db = tmp_path / "results.db"
    with CellStack(plan, services=False) as stack:
        services: List[Any] = []
        try:
            for i, broker in enumerate(stack.brokers):
                services.append(
                    Collector(CollectorConfig(broker.credentials("collector"), plan.topics, db, flush_ms=20))
                )
                services[-1].start()  # one after the other: the first migrates the file
                services.append(
                    CloudWorker(
                        WorkerConfig(
                            broker.credentials("cloud"), plan.topics, tiny_models / "cloud.onnx", f"c{i}"
                        )
                    )
                )
                services[-1].start()
            yield {"stack": stack, "db": db}
        finally:
            for service in reversed(services):
                service.stop()


def test_a_killed_cell_loses_nothing_its_devices_answer_at_the_edge_the_other_cell_runs_on(
    cells: Dict[str, Any], tiny_models: Path, tmp_path: Path
) -> None:
    stack: CellStack = cells["stack"]
    plan = stack.plan
    killed, spared = _devices_of(plan, 0, 2), _devices_of(plan, 1, 2)
    images, labels = load_idx_dataset("fashion-mnist", "test", SAMPLES)
    streams = HeldStreams(images, labels, HOLD_AT)
    agents = {
        device: DeviceAgent(
            quick_agent_config(
                stack,  # type: ignore[arg-type]  # credentials(): HAProxy's address, the device's own account
                plan.topics,
                tiny_models,
                tmp_path / "state" / device,
                device_id=device,
                policy={"name": "cloud-only", "params": {"edge": "main"}},  # every sample an offload
                capacity_aware=False,  # so an offload to the dead cell waits out its deadline: a fallback
                # short where the cell dies (fallbacks come quickly); long in the other cell, where any
                # fallback would be a stall of this shared host rather than an effect of the kill
                offload_deadline_s=1.0 if device in killed else 10.0,
                receipt_timeout_s=2.0,  # batches the killed cell took but never delivered go again soon
            )
        ).start()
        for device in killed + spared
    }
    streams.start(agents)
    wait_for(lambda: streams.reached(KILL_AFTER), 60, f"{KILL_AFTER} samples each")
    stack.kill_cell(0)
    # its devices answer at the edge: offloads wait out their deadline and fall back, labelled
    wait_for(
        lambda: all(agents[d].offloads.stats["fallbacks"] >= 2 for d in killed), 60, "fallbacks at the edge"
    )
    held = {d: agents[d].outbox.counts()["record"] for d in killed}
    stack.start_cell(0)
    streams.release_and_join()
    finals = {d: agents[d].close() for d in agents}

    expected = identities(tiny_models, SAMPLES)
    for device in agents:
        wait_for(lambda d=device: len(_rows(cells["db"], d)) >= SAMPLES, 60, f"{device}'s rows")
    assert all(held[d] > 0 for d in killed), held  # their results waited in their outboxes
    for device in agents:
        rows = _rows(cells["db"], device)
        assert compare(expected, [(label, p) for label, p, _ in rows]) == (0, 0), device  # 0 lost, 0 twice
        assert streams.summaries[device].samples == SAMPLES and streams.summaries[device].failed == 0
        assert finals[device].outbox_left == {"record": 0, "offload": 0}
    for device in killed:
        stages = [stage for *_, stage in _rows(cells["db"], device)]
        assert set(stages) <= {"cloud", "fallback"} and stages.count("fallback") >= 2
        assert stages.count("cloud") > 0  # before the kill and after the return
        assert agents[device].link.stats["disconnects"] >= 1
    for device in spared:  # the other cell: never disconnected, every sample answered by its cloud
        assert agents[device].link.stats["disconnects"] == 0
        assert {stage for *_, stage in _rows(cells["db"], device)} == {"cloud"}
    # and every device's connections, the reconnects after the kill included, went to its own cell
    routes = cells_per_client(plan.directory / "haproxy.log")
    assert {d: routes[d] for d in agents} == {d: {f"cell-{plan.cell_of(d)}"} for d in agents}
