"""Energy windows and idle baselines: the figures a meter hands out, each naming where it came from."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

from metering.errors import MeterError

if TYPE_CHECKING:  # only for annotations: common.py imports this module
    from metering.common import Meter

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    """Cumulative joules per rail since the meter opened, at monotonic time `t` (seconds)."""

    t: float
    joules: Dict[str, float]
    samples: int


@dataclass
class IdleBaseline:
    """Mean power per rail while the device did nothing, measured before a run."""

    source: str
    rails: Dict[str, float]  # watts per rail
    duration_s: float
    idle_w: float  # watts of the total (the same rails the meter sums into gross_j)
    measured_unix: float = 0.0
    meter_samples: int = 0


@dataclass
class EnergyWindow:
    """Joules over one window of inferences, with everything needed to judge the figure."""

    source: str
    rails: Dict[str, float]  # joules per rail
    start_unix: float
    end_unix: float
    duration_s: float
    samples: int  # inferences in the window
    meter_samples: int  # meter readings (counter reads or power samples) taken during the window
    idle_w: Optional[float]
    gross_j: float
    net_j: Optional[float]  # gross_j - idle_w * duration_s; None without a baseline
    total_rails: List[str] = field(default_factory=list)  # which rails were summed into gross_j
    compute_s: List[float] = field(default_factory=list)  # each inference's compute time, in add() order

    @property
    def meter_rate_hz(self) -> float:
        """Meter readings per second during the window."""
        return self.meter_samples / self.duration_s if self.duration_s > 0 else 0.0

    def per_inference(self) -> List[Tuple[float, Optional[float]]]:
        """(gross_j, net_j) for each inference: the window's joules split in proportion to compute time.

        With no compute time recorded at all the split is even, so the parts always add up to the window.
        """
        n = len(self.compute_s)
        if n == 0:
            return []
        total_s = sum(self.compute_s)
        shares = [c / total_s for c in self.compute_s] if total_s > 0 else [1.0 / n] * n
        net = self.net_j
        return [(self.gross_j * s, None if net is None else net * s) for s in shares]

    def as_dict(self) -> Dict[str, Any]:
        return asdict(self)


class Window:
    """Context manager returned by `Meter.window()`; `add(compute_s)` once per inference.

    A meter failure inside the window is logged and counted on the meter (`meter.read_errors`) and leaves
    `result` None and `error` set, instead of raising into the inference loop: an energy figure may go
    missing, the inferences may not.
    """

    def __init__(self, meter: Meter, idle: Optional[IdleBaseline]) -> None:
        if idle is not None and idle.source != meter.source:
            raise ValueError(f"idle baseline from {idle.source!r} cannot be subtracted from {meter.source!r}")
        self._meter = meter
        self._idle = idle
        self._start: Optional[Reading] = None
        self._start_unix = 0.0
        self.compute_s: List[float] = []
        self.result: Optional[EnergyWindow] = None
        self.error: Optional[MeterError] = None

    def add(self, compute_s: float) -> None:
        """Record one inference and its compute time in seconds."""
        if compute_s < 0:
            raise ValueError(f"compute time must be >= 0, got {compute_s}")
        self.compute_s.append(float(compute_s))

    def __enter__(self) -> Window:
        self._start_unix = self._meter.wall_clock()
        try:
            self._start = self._meter.read()
        except MeterError as err:
            self._fail(err)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        if self._start is None:
            return
        try:
            end = self._meter.read()
            rails_j = self._meter.delta(self._start, end)
        except MeterError as err:
            self._fail(err)
            return
        duration_s = max(end.t - self._start.t, 0.0)
        gross_j = self._meter.total_j(rails_j)
        idle_w = self._idle.idle_w if self._idle is not None else None
        self.result = EnergyWindow(
            source=self._meter.source,
            rails=rails_j,
            start_unix=self._start_unix,
            end_unix=self._start_unix + duration_s,
            duration_s=duration_s,
            samples=len(self.compute_s),
            meter_samples=end.samples - self._start.samples,
            idle_w=idle_w,
            gross_j=gross_j,
            net_j=None if idle_w is None else gross_j - idle_w * duration_s,
            total_rails=list(self._meter.total_rails),
            compute_s=list(self.compute_s),
        )

    def _fail(self, err: MeterError) -> None:
        self.error = err
        self._meter.read_errors += 1
        logger.warning(
            "%s meter failed inside an energy window (figure dropped): %s", self._meter.source, err
        )
