"""NVIDIA GPU energy counters through NVML (nvidia-ml-py): for cloud workers; optional.

`nvmlDeviceGetTotalEnergyConsumption` gives millijoules since the driver was loaded (Volta and newer), a
64-bit counter that does not wrap in practice. Rails are ``gpu<index>``; the total is their sum. `pynvml` is
imported only when this backend is opened.

A read is a driver call, not a file read: one took 3.4 ms on an H100 (driver 580, in a gVisor sandbox), so
wrap windows around a second or more of GPU work, not around each micro-batch. The counter itself updates
every few tens of milliseconds.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, List, Optional, Sequence

from metering.common import (
    CounterMeter,
    MeterError,
    MeterPermissionError,
    MeterReadError,
    MeterUnavailable,
)

logger = logging.getLogger(__name__)

# NVML error name -> our error; every other NVML error is a MeterReadError
_EXCEPTION_MAP = {
    "NVML_ERROR_NOT_SUPPORTED": MeterUnavailable,
    "NVML_ERROR_LIBRARY_NOT_FOUND": MeterUnavailable,
    "NVML_ERROR_DRIVER_NOT_LOADED": MeterUnavailable,
    "NVML_ERROR_GPU_IS_LOST": MeterUnavailable,
    "NVML_ERROR_INVALID_ARGUMENT": MeterUnavailable,
    "NVML_ERROR_NOT_FOUND": MeterUnavailable,
    "NVML_ERROR_NO_PERMISSION": MeterPermissionError,
}


def _import_pynvml() -> Any:
    try:
        import pynvml  # lazy: nvidia-ml-py is optional (the `cloud` extra)
    except ImportError as err:
        raise MeterUnavailable(f"nvidia-ml-py is not installed (pip install nvidia-ml-py): {err}") from err
    return pynvml


def _translate(pynvml: Any, err: Exception, doing: str) -> MeterError:
    """Turn an NVMLError into our family, once, here."""
    code = getattr(err, "value", None)
    for name, cls in _EXCEPTION_MAP.items():
        if code is not None and getattr(pynvml, name, object()) == code:
            return cls(f"NVML {doing}: {err}")
    return MeterReadError(f"NVML {doing}: {err}")


class NvmlMeter(CounterMeter):
    """Cumulative joules per GPU from NVML's energy counter."""

    source = "nvml"

    def __init__(self, *, devices: Optional[Sequence[int]] = None, pynvml: Any = None, **kwargs: Any) -> None:
        nv = pynvml if pynvml is not None else _import_pynvml()
        self._nv = nv
        self._error = nv.NVMLError
        try:
            nv.nvmlInit()
        except self._error as err:
            raise _translate(nv, err, "init") from err
        try:
            indices = list(devices) if devices is not None else list(range(nv.nvmlDeviceGetCount()))
            if not indices:
                raise MeterUnavailable("NVML sees no GPU")
            self._handles = [nv.nvmlDeviceGetHandleByIndex(i) for i in indices]
            self._origin_mj = self._raw_mj()  # also proves the counter is supported on every GPU
        except self._error as err:
            nv.nvmlShutdown()
            raise _translate(nv, err, "energy counter") from err
        except BaseException:
            nv.nvmlShutdown()
            raise
        super().__init__(rails=[f"gpu{i}" for i in indices], detail={"devices": indices}, **kwargs)
        self._closed = False

    def _raw_mj(self) -> List[int]:
        return [int(self._nv.nvmlDeviceGetTotalEnergyConsumption(h)) for h in self._handles]

    def _read_joules(self) -> Dict[str, float]:
        try:
            raw = self._raw_mj()
        except self._error as err:
            raise _translate(self._nv, err, "read") from err
        return {rail: (mj - o) / 1000.0 for rail, mj, o in zip(self._rails, raw, self._origin_mj)}

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            try:
                self._nv.nvmlShutdown()
            except self._error as err:
                logger.debug("nvmlShutdown: %s", err)


def open_nvml(options: Dict[str, Any], **kwargs: Any) -> NvmlMeter:
    """Factory for `open_meter`: option `nvml_devices` (GPU indices; all by default)."""
    devices = options.get("nvml_devices")
    return NvmlMeter(devices=None if devices is None else [int(d) for d in devices], **kwargs)
