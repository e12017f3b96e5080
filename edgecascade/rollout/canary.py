"""The canary verdict: does a group's new model version agree with the cloud as often as the one before?

Each device reports on its status (`protocol.status.ModelStatus`) its rolling agreement with the cloud for
the version it serves and, after a swap, the agreement its previous version had reached. Pooled over the
group's devices (weighted by how many offloads each compared), the new version's agreement must not fall
more than `threshold` below the previous version's; until `min_compared` offloads have been compared under
the new version the verdict is `wait`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, Optional, Tuple

from protocol.status import Agreement, DeviceStatus

WAIT, PROMOTE, ROLLBACK = "wait", "promote", "rollback"


@dataclass(frozen=True)
class Verdict:
    decision: str  # wait, promote or rollback
    version: str
    devices: int  # devices of the group serving `version`
    agreement: Optional[float]  # pooled, under `version`
    compared: int
    previous_agreement: Optional[float]  # pooled, under the version each device served before
    previous_compared: int
    reason: str


def pooled(agreements: Iterable[Agreement]) -> Tuple[Optional[float], int]:
    """(agreement weighted by comparisons, comparisons) over `agreements`."""
    agree = compared = 0.0
    for a in agreements:
        if a.agreement is not None and a.compared > 0:
            agree += a.agreement * a.compared
            compared += a.compared
    return (agree / compared if compared else None), int(compared)


def judge(
    statuses: Dict[str, DeviceStatus],
    group: str,
    version: str,
    *,
    threshold: float,
    min_compared: int,
) -> Verdict:
    """The verdict on `version` in `group` from the devices' latest statuses."""
    models = [
        s.model
        for s in statuses.values()
        if s.state == "online" and s.model is not None and s.model.group == group
    ]
    serving = [m for m in models if m.current.version == version]
    new, compared = pooled(m.current for m in serving)
    old, old_compared = pooled(m.previous for m in serving if m.previous and m.previous.version != version)

    def verdict(decision: str, reason: str) -> Verdict:
        return Verdict(decision, version, len(serving), new, compared, old, old_compared, reason)

    if compared < min_compared or new is None:
        return verdict(WAIT, f"{compared} of {min_compared} offloads compared under {version} so far")
    if old is None:
        return verdict(PROMOTE, "no agreement of an earlier version to compare with")
    if new < old - threshold:
        return verdict(
            ROLLBACK,
            f"agreement {new:.1%} fell below the previous version's {old:.1%} by more than {threshold:.1%}",
        )
    return verdict(PROMOTE, f"agreement {new:.1%} against {old:.1%} before (allowed drop {threshold:.1%})")


def watch(
    operator: Any,
    group: str,
    version: str,
    *,
    threshold: float,
    min_compared: int,
    timeout_s: float,
    on_verdict: Optional[Callable[[Verdict], None]] = None,
) -> Verdict:
    """Judge `version` on each status that arrives (`Operator.watch_status` must be on) until the verdict is
    promote or rollback, or `timeout_s` passes (then the last `wait` verdict)."""
    deadline = time.monotonic() + timeout_s
    seen = -1
    while True:
        with operator.lock:
            statuses = dict(operator.statuses)
        verdict = judge(statuses, group, version, threshold=threshold, min_compared=min_compared)
        if on_verdict is not None:
            on_verdict(verdict)
        left = deadline - time.monotonic()
        if verdict.decision != WAIT or left <= 0:
            return verdict
        seen = operator.wait_status_change(seen, min(left, 5.0))
