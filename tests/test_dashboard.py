"""The Grafana dashboard and the Prometheus scrape config in deploy/: the dashboard loads, is provisioning
ready (a uid, panels with grid positions, Prometheus targets through the datasource variable), and every
metric a panel asks for is one the agent, the cloud worker or the collector exports (their registries)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Dict, List, Set

import pytest

from broker.launcher import Credentials
from cloud_worker import CloudWorker, WorkerConfig
from cloud_worker.metrics import WorkerMetrics
from device_agent import AgentConfig, DeviceAgent
from device_agent.metrics import AgentMetrics
from edgecascade.metrics import exported_names
from protocol.topics import Topics
from results_db import Collector, CollectorConfig
from results_db.collector_metrics import CollectorMetrics

REPO = Path(__file__).resolve().parent.parent
DASHBOARD = REPO / "deploy" / "grafana" / "dashboards" / "edgecascade-fleet.json"
PROVISIONING = REPO / "deploy" / "grafana" / "provisioning"
PROMETHEUS = REPO / "deploy" / "prometheus"
# PromQL words that look like metric names but are not (functions, keywords, Grafana's variables).
_PROMQL_WORDS = {"sum", "by", "rate", "increase", "histogram_quantile", "max", "count", "le", "without", "on"}
_NAME = re.compile(r"\b(edgecascade_[a-zA-Z0-9_]+)\b")


@pytest.fixture(scope="module")
def exported(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Set[str]:
    """What the three services export, from their own registries (not started: no broker needed)."""
    nowhere = Credentials("127.0.0.1", 9, "dev-x", "pw")
    agent = DeviceAgent(
        AgentConfig(
            device_id="dev-x", broker=nowhere, model_dir=tiny_models, state_dir=tmp_path_factory.mktemp("st")
        )
    )
    worker = CloudWorker(WorkerConfig(nowhere, Topics(), tiny_models / "cloud.onnx", "w1"))
    collector = Collector(CollectorConfig(nowhere, db_url=tmp_path_factory.mktemp("db") / "r.db"))
    registries = [
        AgentMetrics(agent).registry,
        WorkerMetrics(worker).registry,
        CollectorMetrics(collector).registry,
    ]
    return exported_names(registries)


def _panels(dashboard: Dict[str, Any]) -> List[Dict[str, Any]]:
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))  # a collapsed row holds its panels
    return out


def test_the_dashboard_is_provisioning_ready() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] and isinstance(dashboard["schemaVersion"], int)
    assert "__inputs" not in dashboard  # an import-export artefact: provisioning resolves no inputs
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert (
        variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    )
    panels = _panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    graphs = [p for p in panels if p["type"] != "row"]
    assert len(graphs) >= 12
    for panel in panels:
        grid = panel["gridPos"]
        assert {"h", "w", "x", "y"} <= set(grid) and grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel[
            "title"
        ]
    for panel in graphs:
        assert panel["title"] and panel["targets"], panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}" and target["refId"], panel["title"]
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_every_panel_asks_for_a_metric_the_code_exports(exported: Set[str]) -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    asked = set()
    for panel in _panels(dashboard):
        for target in panel.get("targets", []):
            names = set(_NAME.findall(target["expr"])) - _PROMQL_WORDS
            assert names, (panel["title"], target["expr"])
            asked |= names
    missing = sorted(asked - exported)
    assert not missing, f"the dashboard asks for metrics nothing exports: {missing}"
    # ... and the variables ask for exported ones too
    for variable in dashboard["templating"]["list"]:
        assert set(_NAME.findall(variable.get("definition", ""))) <= exported
    # The figures the issue names are on the dashboard.
    for name in (
        "edgecascade_agent_samples_total",
        "edgecascade_agent_offload_fallbacks_total",
        "edgecascade_agent_offloads_shed_total",
        "edgecascade_agent_offload_refusals_total",
        "edgecascade_agent_bad_messages_total",
        "edgecascade_agent_outbox_items",
        "edgecascade_agent_outbox_oldest_age_seconds",
        "edgecascade_agent_receipts_pending",
        "edgecascade_agent_reply_latency_seconds_bucket",
        "edgecascade_cloud_service_seconds_bucket",
        "edgecascade_agent_inference_energy_joules_sum",
        "edgecascade_agent_info",
        "edgecascade_agent_input_dropped_total",
        "edgecascade_agent_drifting",
    ):
        assert name in asked, name


def test_the_scrape_config_and_the_provisioning_files_are_sane() -> None:
    yaml = pytest.importorskip("yaml")  # PyYAML comes with Datasette (the db extra)
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"edgecascade-agent", "edgecascade-cloud", "edgecascade-collector"}
    assert jobs["edgecascade-agent"]["file_sd_configs"][0]["files"]
    devices = yaml.safe_load((PROMETHEUS / "edgecascade-devices.yml").read_text())
    assert all(group["targets"] and "device" in group["labels"] for group in devices)
    for job in ("edgecascade-cloud", "edgecascade-collector"):
        assert all(":" in t for t in jobs[job]["static_configs"][0]["targets"])
    datasources = yaml.safe_load((PROVISIONING / "datasources" / "edgecascade-prometheus.yml").read_text())
    assert datasources["apiVersion"] == 1 and datasources["datasources"][0]["type"] == "prometheus"
    providers = yaml.safe_load((PROVISIONING / "dashboards" / "edgecascade.yml").read_text())
    assert providers["providers"][0]["type"] == "file" and providers["providers"][0]["options"]["path"]
