"""One recording of a rotating machine with a healthy or a faulty rolling-element bearing (synthetic).

The model is the one of McFadden & Smith, "Model for the vibration produced by a single point defect in a
rolling element bearing", J. Sound and Vibration 96(1) 1984, 69-82, with the random slip of Antoni & Randall
as summarised in Randall & Antoni, "Rolling element bearing diagnostics — A tutorial", MSSP 25 (2011):

- a local defect makes an impact each time a rolling element passes it: an impulse train at the fault
  characteristic frequency (`bearing`: BPFO, BPFI, 2 x BSF for a ball that strikes both races);
- each impact rings the machine's structural resonance: a decaying sinusoid (a two-pole resonator), with
  another resonance and gain per accelerometer axis (another transmission path);
- the impact strength follows the load on the defect (Stribeck's load-zone distribution
  q(θ) = q_max [1 - (1 - cos θ) / (2ε)]^1.5): constant for an outer-race defect (fixed in the load zone),
  modulated at shaft speed for an inner-race defect and at the cage frequency (FTF) for a ball defect;
- the spacing of the impacts jitters randomly by 1-2 % (slip), so the train is cyclostationary, not periodic;
- the shaft speed and load differ per recording and the speed drifts slowly within one;
- shaft harmonics (unbalance, misalignment), another machine's gear mesh tone with sidebands, the electrical
  twice-line tone, random non-periodic shocks (roughness, other machinery) and sensor noise are added to every
  recording, healthy or not; the result is quantised to int16 counts like a MEMS accelerometer's ADC.

Everything is drawn from a numpy Generator seeded by the caller: a recording is a pure function of its seed.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Sequence

import numpy as np
from scipy.signal import lfilter

from vibration.bearing import SKF_6205, Bearing

CONDITIONS = ("healthy", "inner", "outer", "ball")  # class index = position
SEVERITIES = (1, 2, 3)  # incipient, moderate, severe (healthy recordings carry severity 0)
SAMPLE_RATE_HZ = 12_000  # the CWRU drive-end sampling rate; the sensor's rate in the benchmark
FULL_SCALE_G = 16.0  # ±16 g MEMS accelerometer, int16 counts
COUNTS_PER_G = 32767.0 / FULL_SCALE_G
# Impact strength (g at the sensor, before the path's gain) per severity: incipient faults barely stand out
# of the noise; severe ones dominate the resonance band.
SEVERITY_G = {1: 0.5, 2: 1.0, 3: 2.0}
# Inner-race and ball impacts travel through more interfaces to the housing than outer-race ones
# (Randall & Antoni 2011, sec. 2): they arrive weaker.
PATH_GAIN = {"outer": 1.0, "inner": 0.75, "ball": 0.7}


@dataclass(frozen=True)
class RecordingSpec:
    """What a recording was drawn with: enough to explain it and to check its spectrum."""

    condition: str
    severity: int
    seed: Sequence[int]
    sample_rate_hz: int
    duration_s: float
    shaft_hz: float
    load: float  # 0..3, like CWRU's motor load in hp
    fault_hz: float  # the impact rate (0 for healthy)
    resonance_hz: List[float]
    slip: float
    noise_g: float
    extra: Dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> Dict[str, Any]:
        out = asdict(self)
        out["seed"] = list(self.seed)
        return out


@dataclass(frozen=True)
class Recording:
    signal: np.ndarray  # int16 [channels, samples]
    spec: RecordingSpec

    @property
    def g(self) -> np.ndarray:
        """The signal in g (float32)."""
        return (self.signal.astype(np.float32) / COUNTS_PER_G).astype(np.float32)


def load_zone(theta: np.ndarray, epsilon: float) -> np.ndarray:
    """Stribeck's load distribution over the angle from the load direction, normalised to 1 at θ = 0."""
    q = 1.0 - (1.0 - np.cos(theta)) / (2.0 * epsilon)
    return np.where(q > 0, np.abs(q) ** 1.5, 0.0)


def _resonator(x: np.ndarray, freq_hz: float, damping: float, fs: float) -> np.ndarray:
    """x through a two-pole resonator: each unit impulse becomes exp(-ζωt)·sin(ω_d t) (peak about 1)."""
    w = 2.0 * math.pi * freq_hz / fs
    r = math.exp(-damping * w)
    wd = w * math.sqrt(1.0 - damping * damping)
    return lfilter([0.0, math.sin(wd)], [1.0, -2.0 * r * math.cos(wd), r * r], x)


def simulate(
    condition: str,
    severity: int,
    seed: Sequence[int],
    *,
    duration_s: float = 2.0,
    sample_rate_hz: int = SAMPLE_RATE_HZ,
    channels: int = 2,
    bearing: Bearing = SKF_6205,
) -> Recording:
    """One recording; `seed` (a sequence of ints) fixes everything drawn."""
    if condition not in CONDITIONS:
        raise ValueError(f"condition must be one of {', '.join(CONDITIONS)}, got {condition!r}")
    if condition == "healthy":
        severity = 0
    elif severity not in SEVERITIES:
        raise ValueError(f"severity must be one of {SEVERITIES} for a fault, got {severity!r}")
    if duration_s <= 0 or sample_rate_hz <= 0 or channels < 1:
        raise ValueError("duration_s, sample_rate_hz and channels must be positive")
    rng = np.random.default_rng(list(seed))
    fs = float(sample_rate_hz)
    n = int(round(duration_s * fs))
    t = np.arange(n) / fs

    load = float(rng.uniform(0.0, 3.0))
    # A 4-pole induction motor on a 60 Hz supply: just under 30 rev/s unloaded, slower under load (CWRU's
    # 1797-1730 rpm for 0-3 hp), with a spread between machines.
    shaft0 = float(rng.uniform(27.5, 30.0)) * (1.0 - 0.012 * load)
    drift = 0.005 * np.sin(2.0 * math.pi * t / rng.uniform(1.0, 4.0) + rng.uniform(0, 2 * math.pi))
    shaft_hz_t = shaft0 * (1.0 + drift)
    theta = 2.0 * math.pi * np.cumsum(shaft_hz_t) / fs  # shaft angle
    orders = bearing.orders()
    slip = float(rng.uniform(0.01, 0.02))
    epsilon = 0.3 + 0.07 * load  # more load, wider load zone
    resonances = [float(rng.uniform(2500.0, 4500.0)) for _ in range(channels)]
    dampings = [float(rng.uniform(0.03, 0.08)) for _ in range(channels)]
    gains = [1.0] + [float(rng.uniform(0.4, 0.9)) for _ in range(channels - 1)]

    impulses = np.zeros(n)
    fault_hz = 0.0
    if condition != "healthy":
        rate_order = {"outer": orders.bpfo, "inner": orders.bpfi, "ball": 2.0 * orders.bsf}[condition]
        fault_hz = rate_order * shaft0
        strength = SEVERITY_G[severity] * PATH_GAIN[condition] * rng.uniform(0.7, 1.3) * (1 + 0.15 * load)
        phase = rng.uniform(0, 2 * math.pi)
        cage = orders.ftf
        time_s = rng.uniform(0.0, 1.0 / fault_hz)
        k = 0
        while time_s < duration_s:
            i = int(time_s * fs)
            if condition == "outer":
                amp = 1.0  # the defect sits in the middle of the load zone
            elif condition == "inner":
                amp = 0.1 + 0.9 * float(load_zone(np.asarray(theta[i] + phase), epsilon))
            else:  # ball: carried through the load zone by the cage; strikes outer and inner race in turn
                amp = (1.0 if k % 2 == 0 else 0.6) * (
                    0.1 + 0.9 * float(load_zone(np.asarray(cage * theta[i] + phase), epsilon))
                )
            impulses[i] += strength * amp * (1.0 + 0.1 * rng.standard_normal())
            # the next impact: one nominal spacing at the present speed, jittered by the slip
            time_s += (1.0 + slip * rng.standard_normal()) / (rate_order * shaft_hz_t[i])
            k += 1

    # Random shocks, faulty or not: roughness and other machinery (Poisson in time, exponential in size).
    shocks = np.zeros(n)
    count = rng.poisson(rng.uniform(2.0, 20.0) * duration_s)
    shocks[rng.integers(0, n, size=count)] += rng.exponential(0.15, size=count) * rng.choice([-1, 1], count)

    # Other machinery and the motor: shaft harmonics, a gear mesh with sidebands at its shaft, 2 x line.
    tones = np.zeros(n)
    for harmonic, scale in ((1, 0.4), (2, 0.2), (3, 0.1)):
        tones += scale * rng.uniform(0.2, 1.0) * np.sin(harmonic * theta + rng.uniform(0, 2 * math.pi))
    mesh_hz, mesh_shaft_hz = rng.uniform(400.0, 1500.0), rng.uniform(10.0, 40.0)
    tones += (
        rng.uniform(0.05, 0.3)
        * (1.0 + 0.3 * np.sin(2 * math.pi * mesh_shaft_hz * t))
        * np.sin(2 * math.pi * mesh_hz * t + rng.uniform(0, 2 * math.pi))
    )
    line_hz = float(rng.choice([50.0, 60.0]))
    tones += rng.uniform(0.02, 0.1) * np.sin(2 * math.pi * 2 * line_hz * t)

    noise_g = float(rng.uniform(0.05, 0.2))
    out = np.empty((channels, n), dtype=np.int16)
    for c in range(channels):
        ringing = _resonator(impulses + shocks, resonances[c], dampings[c], fs)
        x = gains[c] * (ringing + tones * rng.uniform(0.5, 1.0)) + noise_g * rng.standard_normal(n)
        out[c] = np.clip(np.round(x * COUNTS_PER_G), -32768, 32767).astype(np.int16)

    spec = RecordingSpec(
        condition=condition,
        severity=severity,
        seed=tuple(int(s) for s in seed),
        sample_rate_hz=int(sample_rate_hz),
        duration_s=float(duration_s),
        shaft_hz=shaft0,
        load=load,
        fault_hz=fault_hz,
        resonance_hz=resonances,
        slip=slip,
        noise_g=noise_g,
        extra={"orders": asdict(orders), "mesh_hz": float(mesh_hz), "line_hz": line_hz},
    )
    return Recording(out, spec)
