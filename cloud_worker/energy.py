"""Optional energy metering of the worker's batches through `metering` (`metering.open_meter`, windows).

Energy is a measurement the worker adds when it can, never a reason to stop serving: when `metering` is not
importable, no backend works, or a window fails, replies carry `cloud_j=None` and `energy_source="none"`, and
the reason is logged once.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

logger = logging.getLogger(__name__)

NO_SOURCE = "none"


class BatchEnergy:
    """Times a batch and, when a meter is open, splits the window's joules over its samples."""

    def __init__(
        self,
        backends: Sequence[str] = (),
        options: Optional[Dict[str, Any]] = None,
        idle_seconds: float = 0.0,
    ) -> None:
        self._meter: Any = None
        self._idle: Any = None
        self.source = NO_SOURCE
        if not backends:
            return
        try:
            from metering import open_meter
        except ImportError as exc:
            logger.warning("metering unavailable (%s): replies carry no cloud energy", exc)
            return
        try:
            self._meter = open_meter(list(backends), options=dict(options or {}))
            if idle_seconds > 0:
                self._idle = self._meter.measure_idle(seconds=idle_seconds)
            self.source = str(self._meter.source)
            logger.info("cloud energy from %s (rails %s)", self.source, getattr(self._meter, "rails", "?"))
        except Exception as exc:  # any backend failure: serve without energy
            logger.warning(
                "no usable meter among %s (%s): replies carry no cloud energy", list(backends), exc
            )
            self._disable()

    def _disable(self) -> None:
        meter, self._meter, self.source = self._meter, None, NO_SOURCE
        if meter is not None:
            try:
                meter.close()
            except Exception:
                logger.debug("meter close failed", exc_info=True)

    def run(self, compute: Callable[[], Any], samples: int) -> Tuple[Any, float, Optional[List[float]]]:
        """(result of `compute()`, compute seconds, joules per sample or None)."""
        if self._meter is None:
            start = time.perf_counter()
            result = compute()
            return result, time.perf_counter() - start, None
        outcome: Dict[str, Any] = {}
        split: Optional[List[Tuple[float, Optional[float]]]] = None
        try:
            with self._meter.window(idle=self._idle) as window:
                start = time.perf_counter()
                try:
                    outcome["result"] = compute()
                except Exception as exc:  # the model's failure, not the meter's: re-raised below
                    outcome["error"] = exc
                else:
                    outcome["seconds"] = time.perf_counter() - start
                    for _ in range(samples):
                        window.add(outcome["seconds"] / samples)
            if "result" in outcome:
                split = list(window.result.per_inference())
        except Exception as exc:
            logger.warning("energy window failed (%s): metering switched off for this worker", exc)
            self._disable()
        if "error" in outcome:
            raise outcome["error"]
        if "result" not in outcome:  # the window failed before the model ran; the meter is off now
            return self.run(compute, samples)
        joules = None
        if split is not None and len(split) == samples:
            # Net of the idle baseline when one was measured, else gross; the reply names the source.
            joules = [
                float(net if (self._idle is not None and net is not None) else gross) for gross, net in split
            ]
        return outcome["result"], outcome["seconds"], joules

    def close(self) -> None:
        self._disable()
