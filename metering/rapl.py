"""Intel/AMD RAPL energy counters, read straight from Linux powercap sysfs.

We read sysfs ourselves rather than use pyRAPL: pyRAPL is unmaintained since 2019 and ignores counter
wraparound, which silently loses ~262 kJ per wrap on a long run.

Layout (/sys/class/powercap, flat; AMD Zen exposes the same `intel-rapl` tree since Linux 5.8):
``intel-rapl:<N>/name`` is ``package-<S>`` (one per socket) or ``psys`` (the whole SoC platform, on some
laptops); ``intel-rapl:<N>:<M>/name`` is ``core``, ``uncore`` or ``dram`` under package N. Each zone has
``energy_uj`` (a counter in µJ that wraps at ``max_energy_range_uj``). The `intel-rapl-mmio` tree repeats the
package counters through MMIO and is ignored.

Rails: ``package-<S>``, ``dram-<S>`` when present, ``psys`` when present. The total is packages + DRAM;
psys is reported but not added, because it already contains the packages.

Wraparound: every read adds the difference to the previous raw value, adding `max_energy_range_uj` when the
counter went down. A counter that wraps twice between two reads would lose energy, so a poller thread reads at
least every max_energy_range / (max plausible power x 4).

Since CVE-2020-8694 (Platypus) `energy_uj` is readable by root only; see `PERMISSION_HELP`.
"""

from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional

from metering.common import (
    CounterMeter,
    MeterPermissionError,
    MeterReadError,
    MeterUnavailable,
    PollingThread,
    translate_os_error,
)

logger = logging.getLogger(__name__)

DEFAULT_ROOT = "/sys/class/powercap"
DEFAULT_MAX_POWER_W = 1000.0  # per zone; far above any socket today, so the poller is never too slow
POLL_SAFETY = 4.0  # poll 4x more often than the fastest possible wrap
MAX_POLL_INTERVAL_S = 60.0
MIN_POLL_INTERVAL_S = 0.001
_ZONE = re.compile(r"intel-rapl:(\d+)")
_SUBZONE = re.compile(r"intel-rapl:(\d+):(\d+)")

UDEV_RULE = (
    'SUBSYSTEM=="powercap", KERNEL=="intel-rapl:*", ACTION=="add", '
    'RUN+="/bin/chgrp powercap /sys%p/energy_uj", RUN+="/bin/chmod g+r /sys%p/energy_uj"'
)
PERMISSION_HELP = "\n".join(
    [
        "RAPL energy counters ({path}) are readable only by root since CVE-2020-8694. Grant read access:",
        "  1. a udev rule (persistent), /etc/udev/rules.d/60-edgecascade-rapl.rules:",
        "       " + UDEV_RULE,
        "     then: sudo groupadd -f powercap; sudo usermod -aG powercap <service user>;",
        "           sudo udevadm control --reload;",
        "           sudo udevadm trigger --subsystem-match=powercap --action=add",
        "  2. until the next reboot: sudo chmod g+r,o+r /sys/class/powercap/intel-rapl:*/energy_uj",
        "  3. run the service as a user in a group that can read energy_uj (systemd: User=,",
        "     SupplementaryGroups=), or as root.",
        "Whoever reads these counters can mount the Platypus power side channel: grant it to services only.",
    ]
)

Opener = Callable[[str, int], int]


@dataclass
class _Zone:
    rail: str
    path: str  # the zone folder
    max_range_uj: int
    fd: int = -1
    last_raw: int = 0
    total_uj: int = 0
    wraps: int = 0


def poll_interval_s(max_range_uj: float, max_power_w: float) -> float:
    """How often to read a counter so that it cannot wrap twice unseen at `max_power_w`."""
    if max_range_uj <= 0 or max_power_w <= 0:
        raise ValueError("max range and max power must be > 0")
    seconds_to_wrap = (max_range_uj / 1e6) / max_power_w
    return min(max(seconds_to_wrap / POLL_SAFETY, MIN_POLL_INTERVAL_S), MAX_POLL_INTERVAL_S)


def _read_text(path: str) -> str:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError as err:
        raise translate_os_error(err, path) from err


def discover_zones(root: str = DEFAULT_ROOT) -> List[_Zone]:
    """Package, DRAM and psys zones under `root`, in a stable order."""
    try:
        entries = sorted(os.listdir(root))
    except OSError as err:
        raise MeterUnavailable(f"no powercap tree at {root} ({err}): no RAPL here (or not Linux)") from err
    names: Dict[str, str] = {}
    for entry in entries:
        if _ZONE.fullmatch(entry) or _SUBZONE.fullmatch(entry):
            names[entry] = _read_text(os.path.join(root, entry, "name"))
    zones: List[_Zone] = []
    for entry, name in names.items():
        sub = _SUBZONE.fullmatch(entry)
        if sub is None:
            if not (name.startswith("package") or name == "psys"):
                continue
            rail = name
        elif name == "dram":
            package = names.get(f"intel-rapl:{sub.group(1)}", f"package-{sub.group(1)}")
            rail = "dram-" + package.split("-", 1)[-1]
        else:
            continue  # core/uncore: already inside their package
        if any(z.rail == rail for z in zones):
            rail = f"{rail}@{entry}"
        path = os.path.join(root, entry)
        max_text = _read_text(os.path.join(path, "max_energy_range_uj"))
        try:
            max_range = int(max_text)
        except ValueError:
            raise MeterUnavailable(f"{path}/max_energy_range_uj holds {max_text!r}") from None
        zones.append(_Zone(rail=rail, path=path, max_range_uj=max_range))
    if not any(z.rail.startswith("package") for z in zones):
        raise MeterUnavailable(f"no RAPL package zone under {root}")
    return zones


class RaplMeter(CounterMeter):
    """Cumulative joules per RAPL zone, wraparound-corrected; a poller thread makes sure no wrap is missed."""

    source = "rapl"

    def __init__(
        self,
        *,
        root: str = DEFAULT_ROOT,
        max_power_w: float = DEFAULT_MAX_POWER_W,
        opener: Opener = os.open,
        start_poller: bool = True,
        **kwargs: Any,
    ) -> None:
        zones = discover_zones(root)
        for zone in zones:
            energy_path = os.path.join(zone.path, "energy_uj")
            try:
                # One descriptor per counter, re-read with pread: sysfs regenerates the value at offset 0,
                # and this keeps one read near 2 µs instead of an open/close per read.
                zone.fd = opener(energy_path, os.O_RDONLY)
            except PermissionError as err:
                self._close_fds(zones)
                raise MeterPermissionError(PERMISSION_HELP.format(path=energy_path)) from err
            except OSError as err:
                self._close_fds(zones)
                raise translate_os_error(err, energy_path) from err
        self._zones = zones
        rails = [z.rail for z in zones]
        total = [r for r in rails if r.startswith(("package", "dram"))]
        interval = min(poll_interval_s(z.max_range_uj, max_power_w) for z in zones)
        super().__init__(
            rails=rails,
            total_rails=total,
            detail={"root": root, "poll_interval_s": interval, "max_power_w": max_power_w},
            **kwargs,
        )
        self._update_lock = threading.Lock()
        self.polls = 0
        for zone in zones:
            zone.last_raw = self._raw(zone)
        self.poll_interval_s = interval
        self._poller = PollingThread("rapl-wrap-poller", interval, self.poll, self._poller_failed)
        self._poller_error: Optional[str] = None
        if start_poller:
            self._poller.start()

    @staticmethod
    def _close_fds(zones: List[_Zone]) -> None:
        for zone in zones:
            if zone.fd >= 0:
                os.close(zone.fd)
                zone.fd = -1

    def _raw(self, zone: _Zone) -> int:
        try:
            data = os.pread(zone.fd, 32, 0)
        except OSError as err:
            raise translate_os_error(err, os.path.join(zone.path, "energy_uj")) from err
        try:
            return int(data)
        except ValueError:
            raise MeterReadError(f"{zone.path}/energy_uj holds {data!r}") from None

    def _update(self) -> None:
        """Fold the counters' progress since the last read into the running totals."""
        with self._update_lock:
            for zone in self._zones:
                raw = self._raw(zone)
                step = raw - zone.last_raw
                if step < 0:  # wrapped (at most once, thanks to the poller)
                    step += zone.max_range_uj
                    zone.wraps += 1
                zone.total_uj += step
                zone.last_raw = raw

    def poll(self) -> None:
        """Read every counter once; the poller thread calls this so that no wrap goes unseen."""
        self._update()
        self.polls += 1

    def _poller_failed(self, reason: str) -> None:
        self._poller_error = reason

    def _read_joules(self) -> Dict[str, float]:
        if self._poller_error is not None:
            raise MeterReadError(f"rapl: the wrap poller stopped: {self._poller_error}")
        self._update()
        return {z.rail: z.total_uj / 1e6 for z in self._zones}

    @property
    def wraps(self) -> Dict[str, int]:
        """Wraparounds seen per rail."""
        return {z.rail: z.wraps for z in self._zones}

    def close(self) -> None:
        self._poller.stop()
        with self._update_lock:
            self._close_fds(self._zones)


def open_rapl(options: Dict[str, Any], **kwargs: Any) -> RaplMeter:
    """Factory for `open_meter`: options `rapl_root`, `rapl_max_power_w`."""
    return RaplMeter(
        root=str(options.get("rapl_root", DEFAULT_ROOT)),
        max_power_w=float(options.get("rapl_max_power_w", DEFAULT_MAX_POWER_W)),
        **kwargs,
    )
