"""Rolling-element bearing geometry and its fault characteristic frequencies (as orders of shaft speed).

The kinematic formulas (no slip) are the standard ones, e.g. Randall & Antoni, "Rolling element bearing
diagnostics — A tutorial", Mechanical Systems and Signal Processing 25 (2011) 485-520, eqs. (1)-(4):

    BPFO = n/2 (1 - d/D cos φ)        ball pass frequency, outer race
    BPFI = n/2 (1 + d/D cos φ)        ball pass frequency, inner race
    FTF  = 1/2 (1 - d/D cos φ)        fundamental train (cage) frequency
    BSF  = D/(2d) (1 - (d/D cos φ)²)  ball spin frequency

with n rolling elements of diameter d on pitch diameter D, contact angle φ, all times the shaft frequency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class FaultOrders:
    """Fault characteristic frequencies as multiples of the shaft frequency."""

    bpfo: float
    bpfi: float
    ftf: float
    bsf: float


@dataclass(frozen=True)
class Bearing:
    name: str
    balls: int
    ball_diameter_mm: float
    pitch_diameter_mm: float
    contact_angle_deg: float = 0.0

    def orders(self) -> FaultOrders:
        ratio = (
            self.ball_diameter_mm / self.pitch_diameter_mm * math.cos(math.radians(self.contact_angle_deg))
        )
        n = self.balls
        return FaultOrders(
            bpfo=n / 2.0 * (1.0 - ratio),
            bpfi=n / 2.0 * (1.0 + ratio),
            ftf=0.5 * (1.0 - ratio),
            bsf=self.pitch_diameter_mm / (2.0 * self.ball_diameter_mm) * (1.0 - ratio * ratio),
        )


# The drive-end bearing of the Case Western Reserve University bearing data set (the public benchmark whose
# .mat files `loaders.load_cwru` reads): 9 balls of 0.3126 in on a 1.537 in pitch diameter.
SKF_6205 = Bearing("SKF 6205-2RS JEM", balls=9, ball_diameter_mm=7.94, pitch_diameter_mm=39.04)
