"""metering.rapl against fake powercap trees laid out like /sys/class/powercap (flat intel-rapl:N[:M] zones).

Permission denied is tested twice, honestly: (1) through the injectable opener, raising the EACCES that
os.open raises for a non-root user on a 0400 root-owned energy_uj; (2) for real, when the tests run as root,
by reading a 0400 tree from a child process that has dropped to uid 65534 (root itself ignores file modes, so
a mode-000 file proves nothing in-process).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, Iterator

import pytest

import metering.select
from metering import MeterPermissionError, MeterUnavailable, open_meter
from metering.rapl import RaplMeter, discover_zones, poll_interval_s

REPO = Path(__file__).resolve().parent.parent
REAL_MAX_UJ = 262143328850  # a real package's max_energy_range_uj (2^32 x 61.035 uJ)


def make_powercap(
    root: Path, sockets: int = 1, dram: bool = True, psys: bool = False, max_uj: int = REAL_MAX_UJ
) -> Dict[str, Path]:
    """A powercap tree like the kernel's; returns {rail: energy_uj path}."""
    files: Dict[str, Path] = {}

    def zone(entry: str, name: str, rail: str = "") -> None:
        folder = root / entry
        folder.mkdir(parents=True)
        (folder / "name").write_text(name + "\n")
        (folder / "energy_uj").write_text(f"{0:020d}\n")
        (folder / "max_energy_range_uj").write_text(f"{max_uj}\n")
        (folder / "enabled").write_text("1\n")
        if rail:
            files[rail] = folder / "energy_uj"

    root.mkdir(parents=True, exist_ok=True)
    (root / "intel-rapl").mkdir()  # the control type folder: not a zone
    for s in range(sockets):
        zone(f"intel-rapl:{s}", f"package-{s}", f"package-{s}")
        zone(f"intel-rapl:{s}:0", "core")
        zone(f"intel-rapl:{s}:1", "uncore")
        if dram:
            zone(f"intel-rapl:{s}:2", "dram", f"dram-{s}")
    if psys:
        zone(f"intel-rapl:{sockets}", "psys", "psys")
    zone("intel-rapl-mmio:0", "package-0")  # MMIO duplicate of package-0: must be ignored
    return files


def put(path: Path, uj: int) -> None:
    """Overwrite in place, fixed width: the poller thread never sees a truncated, half-written file."""
    with open(path, "r+") as f:
        f.write(f"{uj:020d}\n")


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture(autouse=True)
def _fresh_skip_log() -> None:
    metering.select._logged.clear()


@pytest.fixture
def meters() -> Iterator[list]:
    opened: list = []
    yield opened
    for m in opened:
        m.close()


def test_one_socket_with_dram_and_psys(tmp_path: Path, meters: list) -> None:
    files = make_powercap(tmp_path, sockets=1, dram=True, psys=True)
    clock = Clock()
    meter = RaplMeter(root=str(tmp_path), clock=clock, start_poller=False)
    meters.append(meter)
    assert meter.source == "rapl"
    assert meter.rails == ["package-0", "dram-0", "psys"]
    assert meter.total_rails == ["package-0", "dram-0"]
    with meter.window() as w:
        w.add(0.02)
        put(files["package-0"], 5_000_000)
        put(files["dram-0"], 700_000)
        put(files["psys"], 9_000_000)
        clock.t = 1.5
    assert w.result is not None
    assert w.result.rails == {"package-0": 5.0, "dram-0": 0.7, "psys": 9.0}
    assert w.result.gross_j == pytest.approx(5.7)
    assert w.result.duration_s == pytest.approx(1.5)


def test_two_sockets(tmp_path: Path, meters: list) -> None:
    files = make_powercap(tmp_path, sockets=2, dram=True)
    for rail, start_j in {"package-0": 10, "package-1": 30, "dram-0": 20, "dram-1": 40}.items():
        put(files[rail], start_j * 1_000_000)
    meter = RaplMeter(root=str(tmp_path), start_poller=False)
    meters.append(meter)
    assert sorted(meter.rails) == ["dram-0", "dram-1", "package-0", "package-1"]
    start = meter.read()
    put(files["package-0"], 13_000_000)
    put(files["package-1"], 34_000_000)
    put(files["dram-0"], 21_000_000)
    put(files["dram-1"], 40_500_000)
    joules = meter.delta(start, meter.read())
    assert joules == {"package-0": 3.0, "dram-0": 1.0, "package-1": 4.0, "dram-1": 0.5}
    assert meter.total_j(joules) == pytest.approx(8.5)


def test_a_wrap_is_unwrapped_through_max_energy_range(tmp_path: Path, meters: list) -> None:
    files = make_powercap(tmp_path, dram=False, max_uj=1_000_000)
    put(files["package-0"], 900_000)
    meter = RaplMeter(root=str(tmp_path), start_poller=False)
    meters.append(meter)
    with meter.window() as w:
        put(files["package-0"], 150_000)  # 0.1 J to the top, then 0.15 J past zero
    assert w.result is not None and w.result.gross_j == pytest.approx(0.25)
    assert meter.wraps == {"package-0": 1}


def test_two_wraps_in_a_long_window_are_both_counted_when_polled(tmp_path: Path, meters: list) -> None:
    files = make_powercap(tmp_path, dram=False, max_uj=1000)
    put(files["package-0"], 900)
    meter = RaplMeter(root=str(tmp_path), start_poller=False)
    meters.append(meter)
    with meter.window() as w:
        for raw in (100, 500, 50):  # wrap, climb, wrap again; the poller reads in between
            put(files["package-0"], raw)
            meter.poll()
        put(files["package-0"], 300)
    # (1000 - 900 + 100) + 400 + (1000 - 500 + 50) + 250 uJ
    assert w.result is not None and w.result.gross_j == pytest.approx(1400e-6)
    assert meter.wraps == {"package-0": 2}


def test_without_polling_a_double_wrap_is_lost(tmp_path: Path, meters: list) -> None:
    """Why the poller exists: reading only at the window's edges sees one wrap where there were two."""
    files = make_powercap(tmp_path, dram=False, max_uj=1000)
    put(files["package-0"], 900)
    meter = RaplMeter(root=str(tmp_path), start_poller=False)
    meters.append(meter)
    with meter.window() as w:
        put(files["package-0"], 300)  # the same path as above, unobserved
    assert w.result is not None and w.result.gross_j == pytest.approx(400e-6)  # 1000 uJ missing


def test_the_poller_thread_catches_every_wrap(tmp_path: Path, meters: list) -> None:
    # 1 J range at 40 W could wrap every 25 ms: the poller must run every 25 / 4 ms
    files = make_powercap(tmp_path, dram=False, max_uj=1_000_000)
    meter = RaplMeter(root=str(tmp_path), max_power_w=40.0)
    meters.append(meter)
    assert meter.poll_interval_s == pytest.approx(0.00625)
    start = meter.read()
    raw = 0
    for _ in range(5):  # 0.8 J steps: each step past the top is a wrap that only a poll can see
        raw = (raw + 800_000) % 1_000_000
        polls = meter.polls
        put(files["package-0"], raw)
        deadline = time.monotonic() + 5.0
        while meter.polls < polls + 2 and time.monotonic() < deadline:
            time.sleep(0.002)
        assert meter.polls >= polls + 2, "the poller thread stopped"
    assert meter.delta(start, meter.read())["package-0"] == pytest.approx(4.0)
    assert meter.wraps["package-0"] == 4  # 0.8 -> 0.6 -> 0.4 -> 0.2 -> 0.0


def test_poll_interval_follows_range_and_max_power() -> None:
    assert poll_interval_s(REAL_MAX_UJ, 1000.0) == pytest.approx(60.0)  # 262 s to wrap: capped at 60 s
    assert poll_interval_s(REAL_MAX_UJ, 4000.0) == pytest.approx(REAL_MAX_UJ / 1e6 / 4000 / 4)
    assert poll_interval_s(10, 1e6) == 0.001
    with pytest.raises(ValueError):
        poll_interval_s(0, 100.0)


def test_no_tree_or_no_package_is_unavailable(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="no powercap tree"):
        discover_zones(str(tmp_path / "missing"))
    (tmp_path / "intel-rapl:0").mkdir()
    (tmp_path / "intel-rapl:0" / "name").write_text("psys\n")
    (tmp_path / "intel-rapl:0" / "max_energy_range_uj").write_text("1000\n")
    with pytest.raises(MeterUnavailable, match="no RAPL package zone"):
        discover_zones(str(tmp_path))


def test_a_garbage_counter_is_a_read_error_in_the_window(tmp_path: Path, meters: list) -> None:
    files = make_powercap(tmp_path, dram=False)
    meter = RaplMeter(root=str(tmp_path), start_poller=False)
    meters.append(meter)
    with meter.window() as w:
        files["package-0"].write_text("not a number\n")
    assert w.result is None and "holds" in str(w.error) and meter.read_errors == 1


def _eacces_opener(path: str, flags: int) -> int:
    """What os.open does for a non-root user on energy_uj since CVE-2020-8694 (mode 0400, owner root)."""
    if path.endswith("energy_uj"):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
    return os.open(path, flags)


def test_permission_denied_names_the_fixes(tmp_path: Path) -> None:
    make_powercap(tmp_path)
    with pytest.raises(MeterPermissionError) as err:
        RaplMeter(root=str(tmp_path), opener=_eacces_opener, start_poller=False)
    text = str(err.value)
    assert "CVE-2020-8694" in text and "udev" in text and 'SUBSYSTEM=="powercap"' in text
    assert "group" in text and "User=" in text
    assert isinstance(err.value, MeterUnavailable)  # so open_meter falls through to the next backend


def test_permission_denied_falls_through_to_the_next_backend(tmp_path: Path, monkeypatch, caplog) -> None:
    make_powercap(tmp_path)
    real_init = RaplMeter.__init__

    def init_with_eacces(self, **kwargs):  # type: ignore[no-untyped-def]
        real_init(self, opener=_eacces_opener, **kwargs)

    monkeypatch.setattr(RaplMeter, "__init__", init_with_eacces)
    with caplog.at_level(logging.INFO, logger="metering"):
        meter = open_meter(["rapl", "estimate"], {"rapl_root": str(tmp_path), "estimate_watts_per_core": 5.0})
    meter.close()
    assert meter.source == "estimate"
    skipped = [r for r in caplog.records if "meter rapl: skipped" in r.getMessage()]
    assert len(skipped) == 1 and skipped[0].levelno == logging.WARNING and "udev" in skipped[0].getMessage()


def _python_outside_root_home() -> str:
    for candidate in ("/usr/bin/python3", "/usr/local/bin/python3"):
        if os.access(candidate, os.X_OK):
            return candidate
    return ""


@pytest.mark.skipif(os.name != "posix", reason="POSIX permissions")
def test_permission_denied_for_real_by_the_kernel() -> None:
    """A 0400 energy_uj read by a process that is not root: the kernel, not a fake, says EACCES."""
    top = Path(tempfile.mkdtemp(prefix="rapl-eacces-"))
    try:
        os.chmod(top, 0o755)
        files = make_powercap(top / "powercap")
        for path in files.values():
            os.chmod(path, 0o400)
        for folder in [top, *(p for p in (top / "powercap").rglob("*") if p.is_dir())]:
            os.chmod(folder, 0o755)
        code = (
            "import sys; sys.path.insert(0, sys.argv[2])\n"
            "from metering.rapl import RaplMeter\n"
            "from metering import MeterPermissionError\n"
            "try:\n    RaplMeter(root=sys.argv[1], start_poller=False)\n"
            "except MeterPermissionError as e:\n    print('DENIED', 'udev' in str(e))\n"
            "else:\n    print('READ')\n"
        )
        if os.geteuid() == 0:
            python = _python_outside_root_home()
            if not python:
                pytest.skip("no python outside /root for an unprivileged child")
            # copy the package where uid 65534 can read it: the checkout may sit under a private home
            shutil.copytree(REPO / "metering", top / "src" / "metering")
            os.chmod(top / "src", 0o755)
            out = subprocess.run(
                [python, "-c", code, str(top / "powercap"), str(top / "src")],
                capture_output=True,
                text=True,
                user=65534,
                group=65534,
                timeout=60,
            )
        else:
            out = subprocess.run(
                [sys.executable, "-c", code, str(top / "powercap"), str(REPO)],
                capture_output=True,
                text=True,
                timeout=60,
            )
        assert out.stdout.split() == ["DENIED", "True"], out.stderr
    finally:
        shutil.rmtree(top, ignore_errors=True)
