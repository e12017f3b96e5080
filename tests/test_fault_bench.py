"""`edgecascade bench --task fault`, shortened to 24 windows: every configuration's rows in the database,
each window in the tier the offline replay of the rules puts it, the report's figures those of the rows."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import numpy as np
import pytest

from bench.fault_bench import CONFIGS, TEST_RECORDINGS, replay, rules_of, run_fault_bench
from vibration.card import load_fault_card
from vibration.dataset import SplitSpec, make_windows
from vibration.offline import tier_probs

MODELS = Path(__file__).resolve().parents[1] / "models" / "vibration"
N = 24


@pytest.mark.integration
@pytest.mark.slow
def test_quick_fault_bench_agrees_with_its_database(tmp_path: Path) -> None:
    report = run_fault_bench(MODELS, True, tmp_path, tmp_path / "fault.json", limit=N)
    assert json.loads((tmp_path / "fault.json").read_text())["windows"] == N
    assert (tmp_path / "fault-front.png").stat().st_size > 10_000
    card = load_fault_card(MODELS)
    windows = make_windows(SplitSpec("test", TEST_RECORDINGS, duration_s=0.6), limit=N)
    probs = tier_probs(card, windows.x)
    with sqlite3.connect(tmp_path / "fault.db") as con:
        for config in CONFIGS:
            point = report["live"][config.name]
            rows = con.execute(
                "SELECT prediction, label, exit_stage, bytes_up, gateway_ms FROM inferences WHERE run_id = ? "
                "ORDER BY seq",
                (point["run_id"],),
            ).fetchall()
            assert len(rows) == point["rows"] == N, config.name
            pred = np.array([r[0] for r in rows])
            stage = np.array([r[2] for r in rows])
            assert [r[1] for r in rows] == windows.y.tolist()
            assert point["accuracy"] == pytest.approx(float((pred == windows.y).mean()))
            assert point["left_sensor"] == pytest.approx(float((stage != "main").mean()))
            assert point["reached_cloud"] == pytest.approx(float((stage == "cloud").mean()))
            expected_pred, expected_stage = replay(config, rules_of(config, card), probs)
            answered = stage != "fallback"  # a missed deadline on a loaded host: the sensor's own answer
            assert answered.mean() >= 0.9, config.name
            assert (stage[answered] == expected_stage[answered]).all(), config.name
            assert (pred[answered] == expected_pred[answered]).all(), config.name
            assert all((r[3] > 8192) == (r[2] != "main") for r in rows), config.name  # the int16 window sent
            # the gateway's own time in its column (0009) for every window it saw, and only for those
            via_gateway = config.uplink == "gateway" and config.rule != "none"
            passed = [r for r in rows if r[2] in ("gateway", "cloud")]
            assert all((r[4] is not None) == via_gateway for r in passed), config.name
            assert point["at_gateway"] == (len(passed) if via_gateway else 0) or not answered.all()
    live = report["live"]
    assert live["sensor-only"]["left_sensor"] == 0.0 and live["gateway-only"]["left_sensor"] == 1.0
    assert live["cloud-only"]["reached_cloud"] >= 0.9 and live["gateway-only"]["reached_cloud"] == 0.0
    assert live["sensor-only"]["radio_j"] == 0.0 and live["cloud-only"]["compute_j"] == 0.0
    assert live["cloud-only"]["total_j"] > live["two-tier-hi"]["total_j"] > live["sensor-only"]["total_j"]
    assert {t["target"] for t in report["targets"]} >= {"<= 20 % of windows leave the sensor"}
