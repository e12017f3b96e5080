"""Radio energy: joules a device's network interface spends to send and receive, from a published power model.

The analytic meter counts compute and DRAM traffic; the hierarchical-inference papers save the radio. This
models it the way the measurement literature does, with the power model and RRC state machine of

    Huang, Qian, Gerber, Mao, Sen, Spatscheck, "A Close Examination of Performance and Power Characteristics
    of 4G LTE Networks", MobiSys 2012 (power model P = αu·tu + αd·td + β, tu/td in Mbit/s; promotion and
    tail figures of LTE and Wi-Fi, measured on a smartphone).

For a run's transfers (when, bytes up, bytes down):

- data:       αu × Mbit sent + αd × Mbit received (mW per Mbit/s × Mbit = mJ), whatever the rate;
- base:       β for as long as the radio is transferring (bits / the link's rate);
- promotion:  P_promo × t_promo each time the radio wakes from idle;
- tail:       P_tail for the gap after a transfer, up to t_tail (the radio stays connected that long;
              a gap shorter than t_tail costs the gap, and the next transfer needs no promotion).

So an agent that offloads a little but often pays tail power all the time on LTE (11.6 s tail): the figure
that turns `bytes/inf` into joules and makes batching or not offloading worth something. A wired link (`lan`)
or a link with no model we can cite (`satellite`) has no radio model: callers show "—", never 0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

HUANG_2012 = "Huang et al., MobiSys 2012 (4G LTE power model)"


@dataclass(frozen=True)
class RadioModel:
    name: str
    up_mw_per_mbps: float  # αu
    down_mw_per_mbps: float  # αd
    base_mw: float  # β: while transferring
    promotion_s: float
    promotion_mw: float
    tail_s: float
    tail_mw: float
    source: str = HUANG_2012


RADIOS: Dict[str, RadioModel] = {
    "lte": RadioModel("lte", 438.39, 51.97, 1288.04, 0.2601, 1210.7, 11.576, 1060.0),
    "wifi": RadioModel("wifi", 283.17, 137.01, 132.86, 0.0791, 124.4, 0.2381, 119.3),
}


@dataclass
class RadioEnergy:
    """A run's radio joules by component (`total_j` = their sum)."""

    data_j: float = 0.0
    base_j: float = 0.0
    promotion_j: float = 0.0
    tail_j: float = 0.0
    promotions: int = 0
    active_s: float = 0.0

    @property
    def total_j(self) -> float:
        return self.data_j + self.base_j + self.promotion_j + self.tail_j


def radio_model(name: Optional[str]) -> Optional[RadioModel]:
    """The model called `name`; None for "none" or None (wired, or nothing citable); ValueError if unknown."""
    if name in (None, "", "none"):
        return None
    if name not in RADIOS:
        raise ValueError(f"no radio model {name!r}; known: none, {', '.join(sorted(RADIOS))}")
    return RADIOS[name]


def radio_energy(
    transfers: Iterable[Tuple[float, int, int]],
    model: RadioModel,
    up_mbit_s: float,
    down_mbit_s: float,
) -> RadioEnergy:
    """Joules for `transfers` = (start time s, bytes up, bytes down) over a link of the given rates (Mbit/s).

    Transfers that overlap in time merge into one active period. The radio starts idle (one promotion
    before the first transfer) and ends with a full tail after the last."""
    if up_mbit_s <= 0 or down_mbit_s <= 0:
        raise ValueError("link rates must be positive for a radio model (a rate-less link has no radio)")
    out = RadioEnergy()
    periods: List[Tuple[float, float]] = []
    for start, up, down in sorted(transfers):
        mbit_up, mbit_down = 8e-6 * up, 8e-6 * down
        out.data_j += 1e-3 * (model.up_mw_per_mbps * mbit_up + model.down_mw_per_mbps * mbit_down)
        end = start + mbit_up / up_mbit_s + mbit_down / down_mbit_s
        if periods and start <= periods[-1][1]:
            periods[-1] = (periods[-1][0], max(periods[-1][1], end))
        else:
            periods.append((start, end))
    previous_end: Optional[float] = None
    for start, end in periods:
        out.active_s += end - start
        gap = None if previous_end is None else start - previous_end
        if gap is not None and gap <= model.tail_s:
            out.tail_j += 1e-3 * model.tail_mw * gap
        else:
            if gap is not None:
                out.tail_j += 1e-3 * model.tail_mw * model.tail_s
            out.promotions += 1
            out.promotion_j += 1e-3 * model.promotion_mw * model.promotion_s
        previous_end = end
    if previous_end is not None:
        out.tail_j += 1e-3 * model.tail_mw * model.tail_s
    out.base_j = 1e-3 * model.base_mw * out.active_s
    return out
