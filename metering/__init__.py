"""Energy metering on the device: joules per inference, always labelled with where they came from.

    from metering import open_meter, AnalyticModel
    meter = open_meter(["rapl", "estimate"], options={"estimate_watts_per_core": 15.0})
    idle = meter.measure_idle(seconds=5.0)
    with meter.window(idle=idle) as w:
        for image in batch:
            ...; w.add(compute_s)
    w.result.per_inference()   # [(gross_j, net_j), ...]

Backends, one module each: rapl, jtop, tegrastats, ina3221, nvml, estimate; `analytic` is a model,
not a meter.
Python >= 3.8, standard library only.
"""

from metering.analytic import AnalyticModel
from metering.common import (
    CounterMeter,
    EnergyWindow,
    IdleBaseline,
    Meter,
    MeterError,
    MeterPermissionError,
    MeterReadError,
    MeterUnavailable,
    Reading,
    SampledPowerMeter,
    Window,
)
from metering.select import BACKENDS, open_meter

__all__ = [
    "BACKENDS",
    "AnalyticModel",
    "CounterMeter",
    "EnergyWindow",
    "IdleBaseline",
    "Meter",
    "MeterError",
    "MeterPermissionError",
    "MeterReadError",
    "MeterUnavailable",
    "Reading",
    "SampledPowerMeter",
    "Window",
    "open_meter",
]
