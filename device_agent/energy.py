"""The agent's view of the power meters (`metering`): windows of inferences, joules per inference.

A thin adapter so the agent's loop reads the same whichever backend measures: open the first backend that
works, measure the idle baseline, wrap each window of `window_size` inferences, split the window's joules over
its inferences in proportion to their compute time. Without any usable meter the adapter says so
(`source="none"`, joules None) instead of inventing figures. The analytic estimate from the card's MACs and
bytes is kept beside.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

from protocol.records import EnergyWindowRecord, IdleBaselineRecord

logger = logging.getLogger(__name__)


@dataclass
class WindowEnergy:
    """What one closed window gives the agent: the meter's figure and each inference's (gross_j, net_j)."""

    window: Any  # metering.EnergyWindow, or None (no meter, or the meter failed in the window)
    per_inference: List[Tuple[Optional[float], Optional[float]]]


def window_record(window: Any, run_id: str, device_id: str, window_seq: int) -> EnergyWindowRecord:
    """The `energy_window` record of a meter window (rate = meter_samples / (end - start))."""
    return EnergyWindowRecord(
        run_id=run_id,
        device_id=device_id,
        window_seq=window_seq,
        source=window.source,
        rails=dict(window.rails),
        start_unix=window.start_unix,
        end_unix=window.end_unix,
        samples=window.samples,
        meter_samples=window.meter_samples,
        idle_w=window.idle_w,
        gross_j=window.gross_j,
        net_j=window.net_j,
    )


def baseline_record(idle: Any, run_id: str, device_id: str) -> IdleBaselineRecord:
    """The `idle_baseline` record of a measured baseline (metering.IdleBaseline)."""
    return IdleBaselineRecord(
        run_id=run_id,
        device_id=device_id,
        source=idle.source,
        rails=dict(idle.rails),
        duration_s=idle.duration_s,
        idle_w=idle.idle_w,
        measured_unix=idle.measured_unix,
    )


class OpenWindow:
    """A window in progress; `add(compute_s)` once per inference."""

    def __init__(self, meter: Any, idle: Any) -> None:
        self._ctx = meter.window(idle=idle) if meter is not None else None
        self._handle = self._ctx.__enter__() if self._ctx is not None else None
        self.count = 0
        self.opened = time.monotonic()

    def add(self, compute_s: float) -> None:
        self.count += 1
        if self._handle is not None:
            self._handle.add(compute_s)

    def close(self) -> WindowEnergy:
        if self._ctx is None or self._handle is None:
            return WindowEnergy(None, [(None, None)] * self.count)
        self._ctx.__exit__(None, None, None)
        result = self._handle.result
        if result is None:  # the meter failed inside the window (it logged why): no figure, not a guess
            return WindowEnergy(None, [(None, None)] * self.count)
        shares = [(_f(g), _f(n)) for g, n in result.per_inference()]
        if len(shares) != self.count:  # a meter that saw fewer adds than we made: do not misattribute
            logger.warning("meter split %d inferences, the agent counted %d", len(shares), self.count)
            shares = [(None, None)] * self.count
        return WindowEnergy(result, shares)


def _f(value: Any) -> Optional[float]:
    return None if value is None else float(value)


class DeviceEnergy:
    """Meter + idle baseline + analytic model for one agent."""

    def __init__(
        self,
        backends: Sequence[str],
        options: Optional[Dict[str, Any]] = None,
        card_raw: Optional[Dict[str, Any]] = None,
    ) -> None:
        self.meter: Any = None
        self.source = "none"
        self.idle: Any = None
        try:
            from metering import open_meter
        except ImportError as exc:
            logger.warning("metering is not available (%s): device joules will not be measured", exc)
        else:
            try:
                self.meter = open_meter(list(backends), options=dict(options or {}))
                self.source = str(self.meter.source)
            except Exception as exc:  # any backend failure must leave the agent running, unmetered
                logger.warning("no power meter from %s: %s", list(backends), exc)
        self._analytic: Dict[str, Optional[float]] = {}
        if card_raw is not None:
            self._analytic = _analytic_blocks(card_raw)
        self._analytic_sums: Dict[Tuple[str, ...], Optional[float]] = {}  # per sample: a handful of keys

    def measure_idle(self, seconds: float) -> Any:
        """Measure the idle baseline (metering.IdleBaseline; None for 0 s or without a meter)."""
        if self.meter is None or seconds <= 0:
            return None
        self.idle = self.meter.measure_idle(seconds=seconds)
        return self.idle

    def open_window(self) -> OpenWindow:
        return OpenWindow(self.meter, self.idle)

    def analytic_j(self, blocks: Sequence[str]) -> Optional[float]:
        """Modelled joules of running `blocks` on one image (None when the model or card lacks figures)."""
        key = tuple(blocks)
        try:
            return self._analytic_sums[key]
        except KeyError:
            pass
        total: Optional[float] = 0.0
        values = [self._analytic.get(b) for b in key]
        if any(v is None for v in values):
            total = None
        elif values:
            total = float(sum(v for v in values if v is not None))
        self._analytic_sums[key] = total
        return total

    def use_card(self, card_raw: Dict[str, Any]) -> None:
        """The analytic figures of a model swapped in (`device_agent.rollout`); the meter stays."""
        self._analytic = _analytic_blocks(card_raw)
        self._analytic_sums = {}

    def close(self) -> None:
        if self.meter is not None:
            self.meter.close()


def _analytic_blocks(card_raw: Dict[str, Any]) -> Dict[str, Optional[float]]:
    try:
        from metering import AnalyticModel
    except ImportError:
        return {}
    try:
        model = AnalyticModel.for_card(card_raw)
        return {name: float(model.block_j(name)) for name in card_raw.get("blocks", {})}
    except Exception as exc:  # a card without cost figures: no analytic estimate, not a dead agent
        logger.warning("no analytic energy model for this card: %s", exc)
        return {}
