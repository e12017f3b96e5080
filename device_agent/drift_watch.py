"""The agent's drift watch: its `DriftMonitor` fed every sample, each test a `drift` record, the verdict on
the device's retained status (`protocol.status`) whenever it changes.

The statistic is `device_agent.drift`'s; this module decides only what the agent says about it and where.
"""

from __future__ import annotations

import logging
from typing import Any, Dict, Optional

import numpy as np

from device_agent.card import ModelCard, ModelCardError
from device_agent.drift import (
    DriftMonitor,
    DriftProfileError,
    DriftReference,
    DriftSettings,
    feature_names,
)
from device_agent.keys import entry_key
from device_agent.policies import EdgeView, Policy
from device_agent.sink import Finished, RecordSink
from protocol.records import DriftRecord
from protocol.status import DriftStatus

logger = logging.getLogger(__name__)


class DriftWatch:
    """Runs on the inference thread (`observe`); `link` is the agent's `Link` (its `set_drift`)."""

    def __init__(
        self, monitor: DriftMonitor, *, run_id: str, device_id: str, sink: RecordSink, link: Any
    ) -> None:
        self.monitor = monitor
        self.run_id = run_id
        self.device_id = device_id
        self.sink = sink
        self.link = link
        self._drifting: Optional[bool] = None  # None until the first test
        self._since: Optional[int] = None

    @classmethod
    def for_agent(
        cls,
        settings: Optional[DriftSettings],
        card: ModelCard,
        policy: Policy,
        *,
        run_id: str,
        device_id: str,
        sink: RecordSink,
        link: Any,
    ) -> Optional[DriftWatch]:
        """The watch, or None (logged) where there is nothing to watch against or nothing to watch."""
        if settings is None:
            return None
        try:
            reference = DriftReference.from_card(card.raw)
        except DriftProfileError as exc:
            raise ModelCardError(f"{card.path}: {exc}") from None
        if reference is None:
            logger.info("drift not watched: the card in %s has no drift reference", card.path)
            return None
        if reference.features not in (
            feature_names(card.num_classes),
            feature_names(card.num_classes, inputs=True),
        ):
            raise ModelCardError(
                f"{card.path}: a drift reference of features {reference.features} "
                f"for {card.num_classes} classes"
            )
        if policy.edge == "none":
            logger.info("drift not watched: policy %s runs nothing on the device", policy.name)
            return None
        return cls(
            DriftMonitor(reference, settings), run_id=run_id, device_id=device_id, sink=sink, link=link
        )

    def observe(self, view: EdgeView, seq: int, image: np.ndarray) -> None:
        if view.main_probs is None:
            return
        check = self.monitor.observe(view.main_probs, seq, image)
        if check is None:
            return
        record = DriftRecord(
            run_id=self.run_id,
            device_id=self.device_id,
            seq=check.seq,
            samples=check.samples,
            window_size=check.window,
            statistic=check.statistic,
            feature=check.feature,
            p_value=check.p_value,
            level=check.level,
            drift=int(check.drift),
            ts_unix=check.checked_unix,
        )
        self.sink.add(Finished(entry_key("drift", self.run_id, self.device_id, check.seq), record.to_map()))
        if check.drift == self._drifting:
            return
        first = self._drifting is None
        self._drifting = check.drift
        self._since = check.seq if check.drift else None
        if check.drift:
            logger.warning(
                "drift: the last %d samples (to #%d) differ from the card's profile (%s, KS p = %.2g < %.2g)",
                check.window,
                check.seq,
                check.feature,
                check.p_value,
                check.level,
            )
        elif not first:
            logger.info(
                "drift over: the last %d samples (to #%d) match the card's profile", check.window, check.seq
            )
        self.link.set_drift(self.status())

    @property
    def drifting(self) -> bool:
        """The latest test's verdict (False before the first)."""
        return bool(self._drifting)

    def status(self) -> Optional[DriftStatus]:
        """The verdict the status topic carries (None before the first test)."""
        last = self.monitor.last
        if last is None:
            return None
        return DriftStatus(
            drifting=last.drift,
            since_seq=self._since,
            seq=last.seq,
            p_value=last.p_value,
            feature=last.feature,
            checked_unix=last.checked_unix,
            alarms=self.monitor.alarms,
        )

    def report(self) -> Dict[str, Any]:
        return self.monitor.report()
