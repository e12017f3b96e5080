"""metering: windows, the per-inference split, the idle baseline, the records, selection, estimate, analytic.

Backend-specific tests live in test_metering_rapl.py, test_metering_jetson.py and test_metering_nvml.py.
Clocks are injected, so nothing here waits on real time.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Dict, List

import pytest

import metering.select
from device_agent.energy import baseline_record, window_record
from metering import (
    AnalyticModel,
    CounterMeter,
    EnergyWindow,
    IdleBaseline,
    MeterReadError,
    MeterUnavailable,
    open_meter,
)
from metering.estimate import EstimateMeter, watts_per_core


class FakeClock:
    """A monotonic clock and a sleep that advances it (and runs a hook, e.g. to move a fake counter)."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t
        self.on_sleep: List = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.t += seconds
        for hook in self.on_sleep:
            hook(seconds)


class ScriptedCounter(CounterMeter):
    """A counter whose cumulative joules the test sets: a stand-in for energy hardware."""

    source = "rapl"

    def __init__(self, clock: FakeClock, rails: Dict[str, float], total: List[str]) -> None:
        self.joules = dict(rails)
        self.fail = False
        super().__init__(
            rails=list(rails),
            total_rails=total,
            clock=clock,
            wall_clock=lambda: 1.7e9 + clock.t,
            sleep=clock.sleep,
        )

    def _read_joules(self) -> Dict[str, float]:
        if self.fail:
            raise MeterReadError("sensor gone")
        return dict(self.joules)


@pytest.fixture(autouse=True)
def _fresh_skip_log() -> None:
    metering.select._logged.clear()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def test_window_joules_duration_counts_and_total_rails(clock: FakeClock) -> None:
    meter = ScriptedCounter(clock, {"package-0": 10.0, "dram-0": 1.0, "psys": 50.0}, ["package-0", "dram-0"])
    with meter.window() as w:
        for compute_s in (0.010, 0.030):
            w.add(compute_s)
        clock.t += 2.0
        meter.joules = {"package-0": 14.0, "dram-0": 1.5, "psys": 60.0}
    r = w.result
    assert r is not None
    assert r.rails == {"package-0": 4.0, "dram-0": 0.5, "psys": 10.0}
    assert r.gross_j == pytest.approx(4.5)  # psys is not added to the packages it contains
    assert r.duration_s == pytest.approx(2.0)
    assert r.end_unix - r.start_unix == pytest.approx(2.0)
    assert (r.samples, r.meter_samples, r.idle_w, r.net_j) == (2, 1, None, None)
    assert r.meter_rate_hz == pytest.approx(0.5)
    assert r.total_rails == ["package-0", "dram-0"]
    assert r.per_inference() == [(pytest.approx(1.125), None), (pytest.approx(3.375), None)]


def test_per_inference_split_is_proportional_and_adds_up() -> None:
    window = EnergyWindow("rapl", {"p": 8.0}, 0.0, 1.0, 1.0, 4, 3, 1.0, 8.0, 7.0, ["p"], [1.0, 2.0, 0.0, 5.0])
    parts = window.per_inference()
    assert [g for g, _ in parts] == pytest.approx([1.0, 2.0, 0.0, 5.0])
    assert [n for _, n in parts] == pytest.approx([0.875, 1.75, 0.0, 4.375])
    assert sum(g for g, _ in parts) == pytest.approx(window.gross_j)
    even = EnergyWindow("rapl", {"p": 3.0}, 0.0, 1.0, 1.0, 3, 2, None, 3.0, None, ["p"], [0.0, 0.0, 0.0])
    assert even.per_inference() == [(1.0, None)] * 3
    assert EnergyWindow("rapl", {}, 0.0, 1.0, 1.0, 0, 1, None, 0.0, None).per_inference() == []


def test_idle_baseline_and_net_joules(clock: FakeClock) -> None:
    meter = ScriptedCounter(clock, {"package-0": 0.0}, ["package-0"])

    def idle_power(seconds: float) -> None:  # 2.5 W while idle
        meter.joules["package-0"] += 2.5 * seconds

    clock.on_sleep.append(idle_power)
    idle = meter.measure_idle(seconds=6.0)
    assert idle.source == "rapl" and idle.duration_s == pytest.approx(6.0)
    assert idle.idle_w == pytest.approx(2.5) and idle.rails == {"package-0": pytest.approx(2.5)}
    assert idle.meter_samples == 1
    with meter.window(idle=idle) as w:
        w.add(0.1)
        w.add(0.3)
        clock.t += 4.0
        meter.joules["package-0"] += 14.0
    r = w.result
    assert r is not None and r.idle_w == pytest.approx(2.5)
    assert r.gross_j == pytest.approx(14.0)
    assert r.net_j == pytest.approx(14.0 - 2.5 * 4.0)
    assert r.per_inference() == [
        (pytest.approx(3.5), pytest.approx(1.0)),
        (pytest.approx(10.5), pytest.approx(3.0)),
    ]


def test_idle_seconds_must_be_positive_and_sources_never_mix(clock: FakeClock) -> None:
    meter = ScriptedCounter(clock, {"package-0": 0.0}, ["package-0"])
    with pytest.raises(ValueError):
        meter.measure_idle(seconds=0)
    foreign = IdleBaseline(source="tegrastats", rails={"VDD_IN": 3.0}, duration_s=5.0, idle_w=3.0)
    with pytest.raises(ValueError, match="cannot be subtracted"):
        meter.window(idle=foreign)


def test_a_meter_failure_drops_the_figure_not_the_inferences(clock: FakeClock, caplog) -> None:
    meter = ScriptedCounter(clock, {"package-0": 0.0}, ["package-0"])
    with caplog.at_level(logging.WARNING), meter.window() as w:
        w.add(0.01)
        meter.fail = True
    assert w.result is None and isinstance(w.error, MeterReadError)
    assert meter.read_errors == 1
    assert "figure dropped" in caplog.text
    with pytest.raises(ValueError):
        w.add(-1.0)


def test_records_are_valid_protocol_records(clock: FakeClock) -> None:
    meter = ScriptedCounter(clock, {"package-0": 0.0}, ["package-0"])
    clock.on_sleep.append(lambda s: meter.joules.__setitem__("package-0", meter.joules["package-0"] + s))
    idle = meter.measure_idle(seconds=1.0)
    with meter.window(idle=idle) as w:
        w.add(0.2)
        clock.t += 1.0
        meter.joules["package-0"] += 3.0
    assert w.result is not None
    record = window_record(w.result, "run-1", "dev-1", 7).to_record()  # validated
    assert record["source"] == "rapl" and record["window_seq"] == 7 and record["net_j"] == pytest.approx(2.0)
    assert baseline_record(idle, "run-1", "dev-1").to_record()["idle_w"] == pytest.approx(1.0)


# --- selection ----------------------------------------------------------------------------------------------
def test_open_meter_falls_through_and_logs_each_reason_once(tmp_path: Path, caplog) -> None:
    options = {
        "rapl_root": str(tmp_path / "no-powercap"),
        "tegrastats_path": "no-such-tegrastats",
        "estimate_watts_per_core": 12.0,
        "idle_seconds": 5.0,
        "backends": ["rapl"],
    }
    with caplog.at_level(logging.INFO, logger="metering"):
        meter = open_meter(["rapl", "tegrastats", "estimate"], options)
        meter.close()
        first = caplog.text
        caplog.clear()
        open_meter(["rapl", "tegrastats", "estimate"], options).close()
    assert meter.source == "estimate" and meter.rails == ["cpu_process"]
    assert "meter rapl: skipped: no powercap tree" in first
    assert "meter tegrastats: skipped: 'no-such-tegrastats' not found on PATH" in first
    assert "figures are estimates" in first
    assert "skipped" not in caplog.text  # the second open repeats nothing


def test_open_meter_refuses_bad_lists_and_options() -> None:
    with pytest.raises(ValueError, match="last"):
        open_meter(["estimate", "rapl"])
    with pytest.raises(ValueError, match="analytic is not a meter"):
        open_meter(["analytic"])
    with pytest.raises(ValueError, match="unknown metering options"):
        open_meter(["estimate"], {"rapl_rot": "/tmp"})
    with pytest.raises(ValueError):
        open_meter("rapl")  # type: ignore[arg-type]


def test_open_meter_names_every_reason_when_nothing_works(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable) as err:
        open_meter(["rapl", "ina3221"], {"rapl_root": str(tmp_path), "ina3221_root": str(tmp_path)})
    assert "rapl: no RAPL package zone" in str(err.value) and "ina3221: no INA3221 rails" in str(err.value)


# --- estimate -----------------------------------------------------------------------------------------------
def test_estimate_is_cpu_time_times_watts_and_labelled(clock: FakeClock) -> None:
    cpu = {"s": 3.0}
    meter = EstimateMeter(watts_per_core=15.0, basis="configured", cpu_time=lambda: cpu["s"], clock=clock)
    with meter.window() as w:
        w.add(0.5)
        cpu["s"] += 0.5
        clock.t += 1.0
    assert w.result is not None and w.result.source == "estimate"
    assert w.result.gross_j == pytest.approx(7.5)
    assert meter.detail == {"watts_per_core": 15.0, "basis": "configured"}


def test_estimate_watts_per_core_sources(tmp_path: Path, caplog) -> None:
    assert watts_per_core({"estimate_watts_per_core": 7}) == (7.0, "configured estimate_watts_per_core")
    assert watts_per_core({"estimate_tdp_w": 65}, cpu_count=4) == (
        16.25,
        "configured estimate_tdp_w / 4 CPUs",
    )
    nano = tmp_path / "cpuinfo"
    nano.write_text("processor\t: 0\nmodel name\t: ARMv8 Processor rev 1 (v8l)\nCPU part\t: 0xd07\n")
    watts, basis = watts_per_core({}, cpuinfo_path=str(nano))
    assert watts == 1.2 and "Cortex-A57" in basis
    with caplog.at_level(logging.WARNING):
        assert watts_per_core({}, cpuinfo_path=str(tmp_path / "none"))[1] == "default guess"
    assert "guessing" in caplog.text


# --- analytic -----------------------------------------------------------------------------------------------
def test_analytic_equals_a_hand_computation() -> None:
    model = AnalyticModel()
    # 1000 MACs x (3.7 + 0.9) pJ + 400 bytes / 4 x 640 pJ = 4600 pJ + 64000 pJ
    assert model.energy_j(macs=1000, bytes_moved=400) == pytest.approx(68600e-12, rel=1e-12)
    assert model.energy_j(macs=0, bytes_moved=0) == 0.0
    cheaper = AnalyticModel({"mult_pj": 0.2, "add_pj": 0.03, "dram_pj_per_word": 100.0})
    assert cheaper.energy_j(macs=1000, bytes_moved=400) == pytest.approx(1000 * 0.23e-12 + 100 * 100e-12)
    with pytest.raises(ValueError, match="unknown analytic table keys"):
        AnalyticModel({"fp32_mult": 3.7})
    with pytest.raises(ValueError):
        model.energy_j(macs=-1, bytes_moved=0)


def test_analytic_for_card_reads_the_blocks(tiny_models: Path) -> None:
    card = json.loads((tiny_models / "card.json").read_text())
    model = AnalyticModel.for_card(card)
    for name in ("main", "extension", "cloud"):
        block = card["blocks"][name]
        hand = block["macs"] * 4.6e-12 + block["bytes_moved"] / 4 * 640e-12
        assert model.block_j(name) == pytest.approx(hand, rel=1e-12)
    assert model.blocks_j(["main", "extension"]) == pytest.approx(
        model.block_j("main") + model.block_j("extension")
    )
    assert AnalyticModel.for_card(card).block_j("main") == model.block_j("main")  # deterministic
    with pytest.raises(KeyError):
        model.block_j("adaptive")
    with pytest.raises(ValueError, match="lacks"):
        AnalyticModel.for_card({"blocks": {"main": {"macs": 1}}})


def test_metering_imports_no_optional_library() -> None:
    import subprocess
    import sys

    code = (
        "import metering, metering.jtop, metering.nvml, sys; "
        "print('jtop' in sys.modules, 'pynvml' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert out.stdout.split() == ["False", "False"]
