"""Jetson backends without a Jetson: recorded tegrastats logs replayed by a fake `tegrastats` on PATH,
fake INA3221 sysfs trees in the IIO (Nano) and hwmon (Orin) layouts, a fake jtop client on a real socket."""

from __future__ import annotations

import os
import queue
import socket
import sys
import tempfile
import types
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

import pytest

import metering.select
from metering import MeterReadError, MeterUnavailable, open_meter
from metering.ina3221 import Ina3221Meter
from metering.jetson import AGX_ORIN_RAILS, total_rails
from metering.jtop import JtopMeter, rails_w
from metering.tegrastats import TegrastatsMeter, parse_line

DATA = Path(__file__).resolve().parent / "data" / "metering"
LOGS = {
    "nano": DATA / "tegrastats_nano.log",
    "orin_nano": DATA / "tegrastats_orin_nano.log",
    "agx_orin": DATA / "tegrastats_agx_orin.log",
}


@pytest.fixture(autouse=True)
def _fresh_skip_log() -> None:
    metering.select._logged.clear()


class Clock:
    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


# --- tegrastats ---------------------------------------------------------------------------------------------
def test_parse_the_three_formats() -> None:
    nano = parse_line(LOGS["nano"].read_text().splitlines()[0])
    assert nano == {"POM_5V_IN": 0.933, "POM_5V_GPU": 0.0, "POM_5V_CPU": 0.084}  # instantaneous, not 105 avg
    orin = parse_line(LOGS["orin_nano"].read_text().splitlines()[1])
    assert orin == {"VDD_IN": 8.512, "VDD_CPU_GPU_CV": 3.105, "VDD_SOC": 2.381}
    agx = parse_line(LOGS["agx_orin"].read_text().splitlines()[0])
    assert agx == {"VDD_GPU_SOC": 3.067, "VDD_CPU_CV": 0.766, "VIN_SYS_5V0": 3.72, "VDDQ_VDD2_1V8AO": 0.503}
    assert parse_line("RAM 2197/3956MB (lfb 7x4MB) SWAP 0/1978MB (cached 0MB) CPU [11%@1479]") == {}


def test_total_rails_per_board() -> None:
    assert total_rails(["POM_5V_CPU", "POM_5V_GPU", "POM_5V_IN"]) == ["POM_5V_IN"]
    assert total_rails(["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]) == ["VDD_IN"]
    assert total_rails(sorted(AGX_ORIN_RAILS)) == list(AGX_ORIN_RAILS)
    assert total_rails(["GPU", "CPU", "SOC"]) == ["GPU", "CPU", "SOC"]  # unknown board: all, logged
    assert total_rails(["VDD_IN", "VDD_SOC"], override=["VDD_SOC"]) == ["VDD_SOC"]
    with pytest.raises(ValueError):
        total_rails(["VDD_IN"], override=["VDD_GPU"])


@pytest.fixture
def fake_tegrastats(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A `tegrastats` executable first on PATH that replays $FAKE_TEGRASTATS_LOG."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    exe = bin_dir / "tegrastats"
    exe.write_text(f"#!{sys.executable}\n" + (DATA / "fake_tegrastats.py").read_text())
    exe.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    return exe


@pytest.fixture
def closing() -> Iterator[List[Any]]:
    opened: List[Any] = []
    yield opened
    for meter in opened:
        meter.close()


@pytest.mark.parametrize(
    ("board", "rails", "total"),
    [
        ("nano", ["POM_5V_CPU", "POM_5V_GPU", "POM_5V_IN"], ["POM_5V_IN"]),
        ("orin_nano", ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"], ["VDD_IN"]),
        ("agx_orin", sorted(AGX_ORIN_RAILS), list(AGX_ORIN_RAILS)),
    ],
)
def test_tegrastats_replayed_log(
    board: str, rails: List[str], total: List[str], fake_tegrastats: Path, monkeypatch, closing
) -> None:
    monkeypatch.setenv("FAKE_TEGRASTATS_LOG", str(LOGS[board]))
    meter = open_meter(["tegrastats", "estimate"], {"tegrastats_interval_ms": 10})
    closing.append(meter)
    assert isinstance(meter, TegrastatsMeter) and meter.source == "tegrastats"
    assert meter.rails == rails and meter.total_rails == total
    lines = [parse_line(line) for line in LOGS[board].read_text().splitlines()]
    low = min(sum(p[r] for r in total) for p in lines)
    high = max(sum(p[r] for r in total) for p in lines)
    with meter.window() as w:
        w.add(0.001)
        assert meter.wait_for_samples(meter.read().samples + 6, timeout_s=20)
    r = w.result
    assert r is not None and r.meter_samples >= 6 and meter.bad_lines == 0
    # the integral of a power that stays within [low, high] W lies within [low, high] x duration
    assert low * r.duration_s <= r.gross_j <= high * r.duration_s
    assert r.gross_j == pytest.approx(sum(r.rails[t] for t in total))


def test_tegrastats_constant_power_integrates_exactly(
    fake_tegrastats: Path, tmp_path: Path, monkeypatch, closing
):
    log = tmp_path / "steady.log"
    log.write_text(LOGS["orin_nano"].read_text().splitlines()[0] + "\n")  # VDD_IN 4968 mW, forever
    monkeypatch.setenv("FAKE_TEGRASTATS_LOG", str(log))
    meter = TegrastatsMeter(interval_ms=10)
    closing.append(meter)
    idle = meter.measure_idle(seconds=0.1)
    assert idle.idle_w == pytest.approx(4.968) and idle.rails["VDD_SOC"] == pytest.approx(1.708)
    with meter.window(idle=idle) as w:
        meter.wait_for_samples(meter.read().samples + 3, timeout_s=20)
    assert w.result is not None
    assert w.result.gross_j == pytest.approx(4.968 * w.result.duration_s)
    assert w.result.net_j == pytest.approx(0.0, abs=1e-9)


def test_tegrastats_that_dies_fails_reads_and_drops_the_window(fake_tegrastats: Path, monkeypatch, closing):
    monkeypatch.setenv("FAKE_TEGRASTATS_LOG", str(LOGS["nano"]))
    monkeypatch.setenv("FAKE_TEGRASTATS_ONCE", "1")
    meter = TegrastatsMeter(interval_ms=5)
    closing.append(meter)
    assert not meter.wait_for_samples(10_000, timeout_s=20)  # returns when the sampler fails
    with pytest.raises(MeterReadError, match="tegrastats exited"):
        meter.read()


def test_silent_or_missing_tegrastats_is_unavailable(fake_tegrastats: Path, monkeypatch) -> None:
    monkeypatch.setenv("FAKE_TEGRASTATS_SILENT", "1")
    with pytest.raises(MeterUnavailable, match="no power rails"):
        TegrastatsMeter(interval_ms=10, first_line_timeout_s=0.3)
    with pytest.raises(MeterUnavailable, match="not found on PATH"):
        TegrastatsMeter(executable="tegrastats-that-is-not-there")


# --- INA3221 ------------------------------------------------------------------------------------------------
def make_iio_nano(root: Path, mw: Dict[str, int]) -> Dict[str, Path]:
    """L4T 32 (Nano): ina3221x/6-0040/iio:device0/{rail_name_N, in_powerN_input mW, ...}."""
    folder = root / "ina3221x" / "6-0040" / "iio:device0"
    folder.mkdir(parents=True)
    files = {}
    for n, name in enumerate(("POM_5V_IN", "POM_5V_GPU", "POM_5V_CPU")):
        (folder / f"rail_name_{n}").write_text(name + "\n")
        (folder / f"in_voltage{n}_input").write_text("5000\n")
        (folder / f"in_current{n}_input").write_text(f"{mw[name] // 5}\n")
        files[name] = folder / f"in_power{n}_input"
        files[name].write_text(f"{mw[name]}\n")
    (folder / "warn_current_limit_0").write_text("4000\n")
    return files


def make_hwmon(root: Path, chips: Dict[str, List[str]], hwmon_first: int = 1) -> Dict[str, Dict[str, Path]]:
    """L4T 35+ (Orin): ina3221/<bus-addr>/hwmon/hwmon<K>/{inN_label, inN_input mV, currN_input mA}."""
    files = {}
    for k, (chip, labels) in enumerate(chips.items()):
        folder = root / "ina3221" / chip / "hwmon" / f"hwmon{hwmon_first + k}"
        folder.mkdir(parents=True)
        (folder / "name").write_text("ina3221\n")
        for n, label in enumerate(labels, start=1):
            (folder / f"in{n}_label").write_text(label + "\n")
            (folder / f"in{n}_input").write_text("5000\n")
            (folder / f"curr{n}_input").write_text("0\n")
            (folder / f"curr{n}_max").write_text("10000\n")
            (folder / f"in{n + 3}_input").write_text("12\n")  # shunt voltages: not rails
            files[label + "@" + chip] = {"mv": folder / f"in{n}_input", "ma": folder / f"curr{n}_input"}
        (folder / "in7_label").write_text("sum of shunt voltages\n")
        (folder / "in7_input").write_text("36\n")
    return files


def test_ina3221_iio_layout_nano(tmp_path: Path) -> None:
    files = make_iio_nano(tmp_path, {"POM_5V_IN": 2000, "POM_5V_GPU": 400, "POM_5V_CPU": 600})
    clock = Clock()
    meter = Ina3221Meter(root=str(tmp_path), start_thread=False, clock=clock)
    assert meter.layout == "iio" and meter.rails == ["POM_5V_CPU", "POM_5V_GPU", "POM_5V_IN"]
    assert meter.total_rails == ["POM_5V_IN"]
    with meter.window() as w:
        clock.t = 1.0
        files["POM_5V_IN"].write_text("4000\n")  # 2 W -> 4 W over one second: 3 J by trapezoid
        meter.poll()
        clock.t = 2.0
        meter.poll()  # 4 W held: +4 J
    assert w.result is not None
    assert w.result.gross_j == pytest.approx(7.0)
    assert w.result.rails["POM_5V_GPU"] == pytest.approx(0.8)
    assert w.result.meter_samples == 2
    meter.close()


def test_ina3221_hwmon_layout_orin_nano(tmp_path: Path) -> None:
    files = make_hwmon(tmp_path, {"1-0040": ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]}, hwmon_first=3)
    for label, ma in (("VDD_IN", 1000), ("VDD_CPU_GPU_CV", 100), ("VDD_SOC", 300)):
        files[label + "@1-0040"]["ma"].write_text(f"{ma}\n")
    clock = Clock()
    meter = Ina3221Meter(root=str(tmp_path), start_thread=False, clock=clock)
    assert meter.layout == "hwmon" and meter.total_rails == ["VDD_IN"]
    assert meter.sample() == {"VDD_IN": 5.0, "VDD_CPU_GPU_CV": 0.5, "VDD_SOC": 1.5}  # mV x mA / 1e6
    start = meter.read()
    clock.t = 0.5
    files["VDD_IN@1-0040"]["mv"].write_text("4000\n")  # 4 V x 1 A
    meter.poll()
    end = meter.read()
    assert meter.delta(start, end)["VDD_IN"] == pytest.approx(0.5 * (5.0 + 4.0) / 2)
    meter.close()


def test_ina3221_hwmon_agx_orin_skips_nc_and_sums_its_rails(tmp_path: Path) -> None:
    files = make_hwmon(
        tmp_path,
        {"1-0040": ["VDD_GPU_SOC", "VDD_CPU_CV", "VIN_SYS_5V0"], "1-0041": ["NC", "VDDQ_VDD2_1V8AO", "NC"]},
    )
    for key, ma in (("VDD_GPU_SOC@1-0040", 600), ("VDD_CPU_CV@1-0040", 200), ("VIN_SYS_5V0@1-0040", 700)):
        files[key]["ma"].write_text(f"{ma}\n")
    files["VDDQ_VDD2_1V8AO@1-0041"]["ma"].write_text("100\n")
    files["NC@1-0041"]["ma"].write_text("999\n")  # an unconnected channel's noise must not count
    meter = Ina3221Meter(root=str(tmp_path), start_thread=False)
    assert meter.rails == sorted(AGX_ORIN_RAILS) and meter.total_rails == list(AGX_ORIN_RAILS)
    watts = meter.sample()
    assert sum(watts[r] for r in meter.total_rails) == pytest.approx(5.0 * (0.6 + 0.2 + 0.7 + 0.1))
    meter.close()


def test_ina3221_polling_thread_integrates_constant_power(tmp_path: Path) -> None:
    make_iio_nano(tmp_path, {"POM_5V_IN": 3000, "POM_5V_GPU": 0, "POM_5V_CPU": 1000})
    meter = open_meter(["ina3221"], {"ina3221_root": str(tmp_path), "ina3221_interval_s": 0.005})
    try:
        with meter.window() as w:
            assert isinstance(meter, Ina3221Meter) and meter.wait_for_samples(8, timeout_s=20)
        assert w.result is not None and w.result.meter_samples >= 5
        assert w.result.gross_j == pytest.approx(3.0 * w.result.duration_s)
    finally:
        meter.close()


def test_ina3221_missing_tree_or_vanished_rail(tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="no INA3221 rails"):
        Ina3221Meter(root=str(tmp_path))
    files = make_iio_nano(tmp_path, {"POM_5V_IN": 3000, "POM_5V_GPU": 0, "POM_5V_CPU": 1000})
    meter = Ina3221Meter(root=str(tmp_path), start_thread=False)
    files["POM_5V_IN"].unlink()
    with pytest.raises(MeterUnavailable):
        meter.poll()


# --- jtop ---------------------------------------------------------------------------------------------------
ORIN_NANO_POWER = {
    "rail": {
        "VDD_CPU_GPU_CV": {
            "online": True,
            "type": "INA3221",
            "volt": 5000,
            "curr": 87,
            "power": 436,
            "avg": 436,
        },
        "VDD_SOC": {"online": True, "type": "INA3221", "volt": 5000, "curr": 341, "power": 1708, "avg": 1708},
    },
    "tot": {
        "online": True,
        "type": "INA3221",
        "volt": 5000,
        "curr": 993,
        "power": 4968,
        "avg": 4968,
        "name": "VDD_IN",
    },
}
AGX_ORIN_POWER = {
    "rail": {
        name: {"online": True, "type": "INA3221", "power": mw, "avg": mw}
        for name, mw in zip(AGX_ORIN_RAILS, (3067, 766, 3720, 503))
    },
    "tot": {"power": 8056, "avg": 8056},  # jtop's own sum: no input rail, no name
}


class FakeJtop:
    """The jtop client's surface: start(), ok() (blocks until fresh data), power, close()."""

    def __init__(self, interval: float, first: Dict[str, Any], clock: Optional[Clock] = None) -> None:
        self.interval = interval
        self.power: Dict[str, Any] = first
        self.feed: queue.Queue[Optional[tuple]] = queue.Queue()
        self.clock = clock
        self.started = self.closed = False
        self._first = True

    def start(self) -> None:
        self.started = True

    def ok(self, spin: bool = False) -> bool:
        if self._first:
            self._first = False
            return True
        item = self.feed.get()
        if item is None:
            return False
        t, power = item
        if self.clock is not None:
            self.clock.t = t
        self.power = power
        return True

    def close(self) -> None:
        self.closed = True
        self.feed.put(None)


@pytest.fixture
def jtop_socket() -> Iterator[str]:
    """A real listening UNIX socket where /run/jtop.sock would be (short path: AF_UNIX allows ~107 bytes)."""
    folder = tempfile.mkdtemp(prefix="jtop-")
    path = os.path.join(folder, "jtop.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)
    yield path
    server.close()
    os.unlink(path)
    os.rmdir(folder)


def test_jtop_rails_put_the_input_rail_back() -> None:
    assert rails_w(ORIN_NANO_POWER) == {"VDD_CPU_GPU_CV": 0.436, "VDD_SOC": 1.708, "VDD_IN": 4.968}
    assert set(rails_w(AGX_ORIN_POWER)) == set(AGX_ORIN_RAILS)


def test_jtop_meter_integrates_the_client(jtop_socket: str) -> None:
    clock = Clock()
    client = FakeJtop(0.1, ORIN_NANO_POWER, clock)
    meter = JtopMeter(socket_path=jtop_socket, client_factory=lambda interval: client, clock=clock)
    assert client.started and meter.rails == ["VDD_CPU_GPU_CV", "VDD_IN", "VDD_SOC"]
    assert meter.total_rails == ["VDD_IN"]
    start = meter.read()
    busier = {"rail": ORIN_NANO_POWER["rail"], "tot": dict(ORIN_NANO_POWER["tot"], power=9032)}
    client.feed.put((1.0, busier))
    assert meter.wait_for_samples(2, timeout_s=10)
    end = meter.read()
    assert meter.delta(start, end)["VDD_IN"] == pytest.approx((4.968 + 9.032) / 2)
    meter.close()
    assert client.closed


def test_jtop_agx_orin_sums_the_four_rails(jtop_socket: str) -> None:
    client = FakeJtop(0.1, AGX_ORIN_POWER)
    meter = JtopMeter(socket_path=jtop_socket, client_factory=lambda interval: client)
    assert meter.total_rails == list(AGX_ORIN_RAILS)
    meter.close()


def test_jtop_through_open_meter_imports_jtop_lazily(jtop_socket: str, monkeypatch) -> None:
    made: List[FakeJtop] = []

    def jtop(interval: float = 0.5) -> FakeJtop:
        made.append(FakeJtop(interval, ORIN_NANO_POWER))
        return made[-1]

    monkeypatch.setitem(sys.modules, "jtop", types.SimpleNamespace(jtop=jtop))
    meter = open_meter(["jtop", "estimate"], {"jtop_socket": jtop_socket, "jtop_interval_s": 0.25})
    try:
        assert meter.source == "jtop" and made[0].interval == 0.25
    finally:
        meter.close()


def test_jtop_without_service_or_failing_client_is_unavailable(jtop_socket: str, tmp_path: Path) -> None:
    with pytest.raises(MeterUnavailable, match="install-service"):
        JtopMeter(socket_path=str(tmp_path / "jtop.sock"))
    (tmp_path / "plain").write_text("")
    with pytest.raises(MeterUnavailable, match="not a socket"):
        JtopMeter(socket_path=str(tmp_path / "plain"))

    class Refusing(FakeJtop):
        def start(self) -> None:
            raise ConnectionRefusedError(111, "Connection refused")

    with pytest.raises(MeterUnavailable, match="ConnectionRefusedError"):
        JtopMeter(socket_path=jtop_socket, client_factory=lambda i: Refusing(i, ORIN_NANO_POWER))


def test_jtop_client_dying_fails_reads(jtop_socket: str) -> None:
    client = FakeJtop(0.1, ORIN_NANO_POWER)
    meter = JtopMeter(socket_path=jtop_socket, client_factory=lambda interval: client)
    client.feed.put(None)  # the client's ok() turns False: jtop lost its service
    assert not meter.wait_for_samples(5, timeout_s=10)
    with pytest.raises(MeterReadError, match="jtop client stopped"):
        meter.read()
    meter.close()
