"""Metering benchmark: the cost of one RAPL read, and of metering an edge-only loop in windows of 32.

    .venv/bin/python -m bench.metering_bench [--seconds 0.25] [--repeats 20] [--model path/to/main.onnx]

1. One RAPL read: against a fake powercap tree (regular files in a temp dir, so the figure is the Python +
   pread path, not the kernel's RAPL MSR read behind sysfs), and against the real /sys/class/powercap when
   this process can read it. Target: <= 50 us.
2. Overhead: an edge-only loop (one onnxruntime run per image, batch 1, as the agent's main block; every
   inference timed, as the agent times edge_ms anyway) with and without `meter.window()` around every 32
   inferences and `w.add()` per inference, for the RAPL meter (fake tree), the estimate meter and a polled
   INA3221 meter (fake tree, 20 Hz thread). Two figures: (a) the cost of one window (enter, 32 adds, exit)
   measured alone, divided by the time of 32 inferences; (b) throughput of interleaved short runs in ABBA
   order, median of the paired differences: this machine is shared and noisy, so (b) wobbles by a few %
   from run to run and (a) is the figure to quote.
   Target: <= 2 %.

The model is models/fashion-mnist/main.onnx when it exists, else a small conv net built here with onnx.helper.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np

from metering.common import Meter
from metering.estimate import EstimateMeter
from metering.ina3221 import Ina3221Meter
from metering.rapl import RaplMeter

REPO = Path(__file__).resolve().parent.parent
WINDOW = 32


def fake_powercap(root: Path, sockets: int = 1) -> None:
    for s in range(sockets):
        for entry, name in ((f"intel-rapl:{s}", f"package-{s}"), (f"intel-rapl:{s}:2", "dram")):
            folder = root / entry
            folder.mkdir(parents=True)
            (folder / "name").write_text(name + "\n")
            (folder / "energy_uj").write_text("123456789\n")
            (folder / "max_energy_range_uj").write_text("262143328850\n")


def fake_ina3221(root: Path) -> None:
    folder = root / "ina3221x" / "6-0040" / "iio:device0"
    folder.mkdir(parents=True)
    for n, (name, mw) in enumerate((("POM_5V_IN", 3000), ("POM_5V_GPU", 400), ("POM_5V_CPU", 900))):
        (folder / f"rail_name_{n}").write_text(name + "\n")
        (folder / f"in_power{n}_input").write_text(f"{mw}\n")


def time_per_call_us(fn: Callable[[], Any], n: int) -> float:
    """Median over 5 batches of n calls, in microseconds per call."""
    batches = []
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(n):
            fn()
        batches.append((time.perf_counter() - start) / n * 1e6)
    return statistics.median(batches)


def bench_rapl_read(tmp: Path) -> None:
    print("== one RAPL read ==")
    fake_powercap(tmp / "powercap")
    meter = RaplMeter(root=str(tmp / "powercap"), start_poller=False)
    zone = meter._zones[0]
    raw_us = time_per_call_us(lambda: meter._raw(zone), 20000)
    read_us = time_per_call_us(meter.read, 20000)
    print(
        f"fake tree (regular files, not sysfs): one counter pread+parse {raw_us:.2f} us; "
        f"meter.read() of {len(meter.rails)} zones {read_us:.2f} us  (target <= 50 us)"
    )
    meter.close()
    real = Path("/sys/class/powercap")
    if not real.exists():
        print("real /sys/class/powercap: absent on this machine (no RAPL exposed to this VM/container)")
        return
    try:
        real_meter = RaplMeter(root=str(real), start_poller=False)
    except Exception as err:  # a benchmark reports why, whatever it is
        print(
            f"real /sys/class/powercap: not readable here: {type(err).__name__}: {str(err).splitlines()[0]}"
        )
        return
    zone = real_meter._zones[0]
    print(
        f"real sysfs: one counter {time_per_call_us(lambda: real_meter._raw(zone), 2000):.2f} us; "
        f"meter.read() of {real_meter.rails} {time_per_call_us(real_meter.read, 2000):.2f} us"
    )
    real_meter.close()


def small_convnet(path: Path) -> None:
    """uint8 [N,1,28,28] -> conv 3x3x16 s1 -> relu -> conv 3x3x32 s2 -> relu -> GAP -> dense 10."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)

    def init(name: str, shape: List[int]) -> Any:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.1).astype(np.float32), name)

    nodes = [
        helper.make_node("Cast", ["image"], ["xf"], to=TensorProto.FLOAT),
        helper.make_node("Mul", ["xf", "inv255"], ["x"]),
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], pads=[1, 1, 1, 1], strides=[2, 2]),
        helper.make_node("Relu", ["c2"], ["features"]),
        helper.make_node("GlobalAveragePool", ["features"], ["g"]),
        helper.make_node("Flatten", ["g"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["logits"]),
    ]
    inits = [
        numpy_helper.from_array(np.array(1 / 255, dtype=np.float32), "inv255"),
        init("w1", [16, 1, 3, 3]),
        init("b1", [16]),
        init("w2", [32, 16, 3, 3]),
        init("b2", [32]),
        init("w3", [32, 10]),
        init("b3", [10]),
    ]
    graph = helper.make_graph(
        nodes,
        "bench-convnet",
        [helper.make_tensor_value_info("image", TensorProto.UINT8, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))


def edge_loop(session: Any, images: np.ndarray, seconds: float, meter: Optional[Meter]) -> float:
    """Inferences per second of the edge-only loop for `seconds`, metered in windows of 32 when a meter."""
    name = session.get_inputs()[0].name
    done = 0
    start = time.perf_counter()
    deadline = start + seconds
    while time.perf_counter() < deadline:
        if meter is None:
            compute_s = []
            for i in range(WINDOW):
                t0 = time.perf_counter()
                session.run(None, {name: images[i : i + 1]})
                compute_s.append(time.perf_counter() - t0)
            done += WINDOW
            continue
        with meter.window() as w:
            for i in range(WINDOW):
                t0 = time.perf_counter()
                session.run(None, {name: images[i : i + 1]})
                w.add(time.perf_counter() - t0)
        assert w.result is not None and w.result.samples == WINDOW
        done += WINDOW
    return done / (time.perf_counter() - start)


def window_cost_us(meter: Meter, n: int = 2000) -> float:
    """Microseconds for one window of 32 inferences' bookkeeping (enter, 32 adds, exit, result)."""

    def one() -> None:
        with meter.window() as w:
            for _ in range(WINDOW):
                w.add(1e-4)
        assert w.result is not None

    return time_per_call_us(one, n)


def bench_overhead(tmp: Path, model: Optional[str], seconds: float, repeats: int) -> None:
    import onnxruntime as ort

    print(f"== metering overhead, windows of {WINDOW} inferences, edge-only loop ==")
    path = Path(model) if model else REPO / "models" / "fashion-mnist" / "main.onnx"
    if not path.exists():
        path = tmp / "convnet.onnx"
        small_convnet(path)
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1  # as on a device core; also keeps the shared machine's noise down
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    images = np.random.default_rng(1).integers(0, 256, size=(WINDOW, 1, 28, 28), dtype=np.uint8)
    if not (tmp / "powercap").exists():
        fake_powercap(tmp / "powercap")
    fake_ina3221(tmp / "ina")
    meters: Dict[str, Callable[[], Meter]] = {
        "rapl (fake tree)": lambda: RaplMeter(root=str(tmp / "powercap")),
        "estimate": lambda: EstimateMeter(watts_per_core=15.0),
        "ina3221 (fake tree, 20 Hz thread)": lambda: Ina3221Meter(root=str(tmp / "ina"), interval_s=0.05),
    }
    edge_loop(session, images, 0.5, None)  # warm up
    print(
        f"model {path if path.parent != tmp else 'built-in conv net'}, 1 intra-op thread, "
        f"{seconds:.2f} s per run, {repeats} ABBA-ordered baseline/metered pairs per meter:"
    )
    for label, make in meters.items():
        meter = make()
        base: List[float] = []
        metered: List[float] = []
        for k in range(repeats):  # ABBA order: whichever runs second in a pair must not bias the figure
            if k % 2 == 0:
                base.append(edge_loop(session, images, seconds, None))
                metered.append(edge_loop(session, images, seconds, meter))
            else:
                metered.append(edge_loop(session, images, seconds, meter))
                base.append(edge_loop(session, images, seconds, None))
        b, m = statistics.median(base), statistics.median(metered)
        pair = statistics.median((bb - mm) / bb * 100 for bb, mm in zip(base, metered))
        cost_us = window_cost_us(meter)
        meter.close()
        print(f"  {label}")
        share = cost_us / (WINDOW * 1e6 / b) * 100
        print(f"    (a) one window costs {cost_us:.1f} us = {share:.3f} % of 32 inferences")
        print(f"    (b) baseline {b:.0f} inf/s, metered {m:.0f} inf/s, median paired overhead {pair:+.2f} %")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=0.25, help="length of each timed run")
    parser.add_argument(
        "--repeats", type=int, default=20, help="interleaved baseline/metered pairs per meter"
    )
    parser.add_argument("--model", help="an ONNX model with a uint8 [N,1,28,28] input")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    with tempfile.TemporaryDirectory(prefix="metering-bench-") as tmp:
        bench_rapl_read(Path(tmp))
        bench_overhead(Path(tmp), args.model, args.seconds, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
