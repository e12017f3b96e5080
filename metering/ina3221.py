"""Jetson rails read straight from the INA3221 power monitors in sysfs, polled by a thread.

Two layouts, both under /sys/bus/i2c/drivers:

- IIO (Jetson Nano, L4T 32): ``ina3221x/<bus-addr>/iio:device<K>/rail_name_<N>`` names the rail,
  ``in_power<N>_input`` is its power in mW.
- hwmon (Orin, L4T 35+): ``ina3221/<bus-addr>/hwmon/hwmon<K>/in<N>_label`` names the rail (the hwmon number
  changes between boots, so it is globbed), ``in<N>_input`` is the bus voltage in mV and ``curr<N>_input`` the
  current in mA; power = mV x mA / 1000 mW. Channels labelled NC and "sum of shunt voltages" are skipped.

The total follows `metering.jetson.total_rails`.
"""

from __future__ import annotations

import glob
import logging
import os
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from metering.common import (
    MeterReadError,
    MeterUnavailable,
    PollingThread,
    SampledPowerMeter,
    translate_os_error,
)
from metering.jetson import is_unconnected, total_rails

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/bus/i2c/drivers"
DEFAULT_INTERVAL_S = 0.05

# rail name -> a function returning its power in watts
Reader = Callable[[], float]


def _read_int(path: str) -> int:
    with open(path) as f:
        text = f.read().strip()
    try:
        return int(text)
    except ValueError:
        raise MeterReadError(f"{path} holds {text!r}, not an integer") from None


def _iio_rails(root: str) -> List[Tuple[str, Reader]]:
    found = []
    for label_path in sorted(glob.glob(os.path.join(root, "ina3221x", "*", "iio:device*", "rail_name_*"))):
        channel = label_path.rsplit("_", 1)[1]
        power_path = os.path.join(os.path.dirname(label_path), f"in_power{channel}_input")
        if os.path.exists(power_path):
            found.append((label_path, _mw_reader(power_path)))
    return found


def _hwmon_rails(root: str) -> List[Tuple[str, Reader]]:
    found = []
    for label_path in sorted(glob.glob(os.path.join(root, "ina3221", "*", "hwmon", "hwmon*", "in*_label"))):
        match = re.fullmatch(r"in(\d+)_label", os.path.basename(label_path))
        if match is None:
            continue
        folder, channel = os.path.dirname(label_path), match.group(1)
        volt_path = os.path.join(folder, f"in{channel}_input")
        curr_path = os.path.join(folder, f"curr{channel}_input")
        if os.path.exists(volt_path) and os.path.exists(curr_path):
            found.append((label_path, _vi_reader(volt_path, curr_path)))
    return found


def _mw_reader(power_path: str) -> Reader:
    return lambda: _read_int(power_path) / 1000.0


def _vi_reader(volt_path: str, curr_path: str) -> Reader:
    return lambda: _read_int(volt_path) * _read_int(curr_path) / 1e6


def discover(root: str = DEFAULT_ROOT) -> Tuple[str, Dict[str, Reader]]:
    """Find the rails under `root`: (layout "iio" or "hwmon", {rail: reader of watts})."""
    for layout, finder in (("hwmon", _hwmon_rails), ("iio", _iio_rails)):
        readers: Dict[str, Reader] = {}
        for label_path, reader in finder(root):
            try:
                with open(label_path) as f:
                    name = f.read().strip()
            except OSError as err:
                raise translate_os_error(err, label_path) from err
            if not name or is_unconnected(name):
                continue
            if name in readers:  # two monitors with one label: keep both, apart
                name = f"{name}@{os.path.basename(os.path.dirname(label_path))}"
            readers[name] = reader
        if readers:
            return layout, readers
    raise MeterUnavailable(
        f"no INA3221 rails under {root} (neither ina3221x/*/iio:device* nor ina3221/*/hwmon)"
    )


class Ina3221Meter(SampledPowerMeter):
    """INA3221 rails polled every `interval_s` and integrated (trapezoid)."""

    source = "ina3221"

    def __init__(
        self,
        *,
        root: str = DEFAULT_ROOT,
        interval_s: float = DEFAULT_INTERVAL_S,
        total: Optional[Sequence[str]] = None,
        start_thread: bool = True,
        **kwargs: Any,
    ) -> None:
        layout, readers = discover(root)
        self._readers = readers
        names = sorted(readers)
        super().__init__(
            interval_s=interval_s,
            rails=names,
            total_rails=total_rails(names, total),
            detail={"root": root, "layout": layout},
            **kwargs,
        )
        self.layout = layout
        self.poll()  # a first sample now: also proves that every file can be read
        self._thread = PollingThread("ina3221-poll", interval_s, self.poll, self._fail)
        if start_thread:
            self._thread.start()

    def sample(self) -> Dict[str, float]:
        """Watts per rail, now."""
        try:
            return {name: read() for name, read in self._readers.items()}
        except OSError as err:
            raise translate_os_error(err, "INA3221 rail") from err

    def poll(self) -> None:
        """Take one sample and integrate it (the polling thread calls this)."""
        watts = self.sample()
        self._ingest(self.clock(), watts)

    def close(self) -> None:
        self._thread.stop()


def open_ina3221(options: Dict[str, Any], **kwargs: Any) -> Ina3221Meter:
    """Factory for `open_meter`: options `ina3221_root`, `ina3221_interval_s`, `jetson_total_rails`."""
    return Ina3221Meter(
        root=str(options.get("ina3221_root", DEFAULT_ROOT)),
        interval_s=float(options.get("ina3221_interval_s", DEFAULT_INTERVAL_S)),
        total=options.get("jetson_total_rails"),
        **kwargs,
    )
