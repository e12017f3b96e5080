"""metering.nvml through a stub `pynvml` module (the nvidia-ml-py surface we use), and the real one here."""

from __future__ import annotations

import logging
import sys
import time
import types
from typing import Dict, List, Optional

import pytest

import metering.select
from metering import MeterPermissionError, MeterReadError, MeterUnavailable, open_meter
from metering.nvml import NvmlMeter


class NVMLError(Exception):
    """pynvml.NVMLError: carries the NVML return code in `.value`."""

    def __init__(self, value: int) -> None:
        super().__init__(f"NVML error {value}")
        self.value = value


def stub_pynvml(energy_mj: List[int], init_error: Optional[int] = None) -> types.SimpleNamespace:
    """A stand-in for the pynvml module: GPUs whose energy counters (mJ) the test moves."""
    state: Dict[str, object] = {"inited": False, "shutdowns": 0, "read_error": None}

    def nvmlInit() -> None:
        if init_error is not None:
            raise NVMLError(init_error)
        state["inited"] = True

    def nvmlShutdown() -> None:
        state["shutdowns"] = int(state["shutdowns"]) + 1  # type: ignore[call-overload]

    def nvmlDeviceGetHandleByIndex(i: int) -> str:
        if not 0 <= i < len(energy_mj):
            raise NVMLError(2)
        return f"handle{i}"

    def nvmlDeviceGetTotalEnergyConsumption(handle: str) -> int:
        if state["read_error"] is not None:
            raise NVMLError(state["read_error"])  # type: ignore[arg-type]
        return energy_mj[int(handle[len("handle") :])]

    return types.SimpleNamespace(
        NVMLError=NVMLError,
        NVML_ERROR_INVALID_ARGUMENT=2,
        NVML_ERROR_NOT_SUPPORTED=3,
        NVML_ERROR_NO_PERMISSION=4,
        NVML_ERROR_DRIVER_NOT_LOADED=9,
        NVML_ERROR_LIBRARY_NOT_FOUND=12,
        NVML_ERROR_GPU_IS_LOST=15,
        NVML_ERROR_UNKNOWN=999,
        nvmlInit=nvmlInit,
        nvmlShutdown=nvmlShutdown,
        nvmlDeviceGetCount=lambda: len(energy_mj),
        nvmlDeviceGetHandleByIndex=nvmlDeviceGetHandleByIndex,
        nvmlDeviceGetTotalEnergyConsumption=nvmlDeviceGetTotalEnergyConsumption,
        state=state,
    )


@pytest.fixture(autouse=True)
def _fresh_skip_log() -> None:
    metering.select._logged.clear()


def test_nvml_counts_millijoules_per_gpu(monkeypatch) -> None:
    counters = [5_000_000, 7_000_000]
    nv = stub_pynvml(counters)
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    meter = open_meter(["nvml", "estimate"])
    assert isinstance(meter, NvmlMeter) and meter.source == "nvml"
    assert meter.rails == ["gpu0", "gpu1"] and meter.total_rails == ["gpu0", "gpu1"]
    with meter.window() as w:
        w.add(0.004)
        counters[0] += 1500  # 1.5 J
        counters[1] += 250
    assert w.result is not None
    assert w.result.rails == {"gpu0": pytest.approx(1.5), "gpu1": pytest.approx(0.25)}
    assert w.result.gross_j == pytest.approx(1.75)
    meter.close()
    meter.close()
    assert nv.state["shutdowns"] == 1


def test_nvml_selected_devices(monkeypatch) -> None:
    counters = [0, 0, 0]
    monkeypatch.setitem(sys.modules, "pynvml", stub_pynvml(counters))
    meter = open_meter(["nvml"], {"nvml_devices": [2]})
    counters[2] += 1000
    assert meter.rails == ["gpu2"] and meter.read().joules == {"gpu2": pytest.approx(1.0)}
    meter.close()


@pytest.mark.parametrize(
    ("code", "error", "where"),
    [(3, MeterUnavailable, "counter"), (4, MeterPermissionError, "counter"), (12, MeterUnavailable, "init")],
)
def test_nvml_errors_are_translated_once(code: int, error: type, where: str) -> None:
    nv = stub_pynvml([0], init_error=code if where == "init" else None)
    if where == "counter":
        nv.state["read_error"] = code
    with pytest.raises(error) as err:
        NvmlMeter(pynvml=nv)
    assert isinstance(err.value.__cause__, NVMLError)


def test_nvml_unsupported_falls_through(monkeypatch, caplog) -> None:
    nv = stub_pynvml([0])
    nv.state["read_error"] = 3  # a pre-Volta GPU: no energy counter
    monkeypatch.setitem(sys.modules, "pynvml", nv)
    with caplog.at_level(logging.INFO, logger="metering"):
        meter = open_meter(["nvml", "estimate"], {"estimate_watts_per_core": 10.0})
    meter.close()
    assert meter.source == "estimate" and "meter nvml: skipped: NVML energy counter" in caplog.text
    assert nv.state["shutdowns"] == 1  # init was undone


def test_nvml_read_failure_mid_run_drops_the_window(monkeypatch) -> None:
    nv = stub_pynvml([0])
    meter = NvmlMeter(pynvml=nv)
    with meter.window() as w:
        nv.state["read_error"] = 999
    assert w.result is None and isinstance(w.error, MeterReadError) and meter.read_errors == 1
    meter.close()


def test_the_real_nvml_here() -> None:
    """The installed nvidia-ml-py: with a GPU (device machine) it meters; without, it falls through."""
    meter = open_meter(["nvml", "estimate"], {"estimate_watts_per_core": 10.0})
    try:
        if meter.source == "nvml":
            with meter.window() as w:
                time.sleep(0.3)
            assert w.result is not None and w.result.gross_j >= 0.0 and meter.rails[0] == "gpu0"
        else:
            assert meter.source == "estimate"
    finally:
        meter.close()
