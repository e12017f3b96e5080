"""Loaders for the real bearing data users have: CWRU `.mat` files and MaFaulDa CSV files.

- CWRU (Case Western Reserve University Bearing Data Center): one MATLAB file per recording with the
  accelerometers as column vectors in g, `X<nnn>_DE_time` (drive end), `X<nnn>_FE_time` (fan end),
  `X<nnn>_BA_time` (base), and the motor speed `X<nnn>RPM`; 12 kHz or 48 kHz, which the file does not say.
- MaFaulDa (Machinery Fault Database, UFRJ): one CSV per recording, no header, 8 columns at 50 kHz for 5 s:
  tachometer, underhang bearing accelerometer (axial, radial, tangential), overhang bearing accelerometer
  (axial, radial, tangential), microphone.

`to_sensor_windows` turns either into what the fault models take: two axes resampled to the sensor's 12 kHz,
int16 counts of the ±16 g accelerometer the simulator models, cut into windows.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from vibration.dataset import WINDOW, cut
from vibration.simulate import COUNTS_PER_G, SAMPLE_RATE_HZ

CWRU_RATES_HZ = (12_000, 48_000)
MAFAULDA_RATE_HZ = 50_000
MAFAULDA_COLUMNS = (
    "tachometer",
    "underhang_axial",
    "underhang_radial",
    "underhang_tangential",
    "overhang_axial",
    "overhang_radial",
    "overhang_tangential",
    "microphone",
)
_CWRU_KEY = re.compile(r"^X(\d{3})_(DE|FE|BA)_time$")


class LoaderError(ValueError):
    """A file that is not the format it should be (the message says what is wrong)."""


@dataclass(frozen=True)
class RealRecording:
    signal: np.ndarray  # float32 [channels, samples], accelerometers in g (MaFaulDa: as stored)
    channels: List[str]
    sample_rate_hz: int
    shaft_hz: Optional[float]  # from the file's RPM (CWRU) or its tachometer (MaFaulDa), when known
    source: str


def load_cwru(
    path: Union[str, Path], sample_rate_hz: int = 12_000, record: Optional[int] = None
) -> RealRecording:
    """A CWRU `.mat` recording: its DE/FE/BA channels (those present, in that order) and RPM."""
    from scipy.io import loadmat  # scipy is a device dependency; imported here as only this loader needs it
    from scipy.io.matlab import MatReadError

    if sample_rate_hz not in CWRU_RATES_HZ:
        raise LoaderError(f"CWRU recordings are sampled at 12000 or 48000 Hz, not {sample_rate_hz}")
    path = Path(path)
    try:
        data = loadmat(str(path))
    except (OSError, ValueError, TypeError, MatReadError) as exc:
        raise LoaderError(f"{path}: not a readable MATLAB file ({exc})") from exc
    found: Dict[int, Dict[str, str]] = {}
    for key in data:
        match = _CWRU_KEY.match(key)
        if match:
            found.setdefault(int(match.group(1)), {})[match.group(2)] = key
    if not found:
        raise LoaderError(f"{path}: no X<nnn>_DE_time / _FE_time / _BA_time variables (has {sorted(data)})")
    if record is None:
        if len(found) > 1:
            raise LoaderError(f"{path} holds records {sorted(found)}: pass record= to choose one")
        record = next(iter(found))
    if record not in found:
        raise LoaderError(f"{path}: no record {record} (has {sorted(found)})")
    names, columns = [], []
    for position in ("DE", "FE", "BA"):
        key = found[record].get(position)
        if key is None:
            continue
        column = np.asarray(data[key], dtype=np.float64).reshape(-1)
        if not np.isfinite(column).all():
            raise LoaderError(f"{path}: {key} holds non-finite values")
        names.append(position)
        columns.append(column)
    length = min(c.size for c in columns)
    if length == 0:
        raise LoaderError(f"{path}: record {record} has no samples")
    rpm_key = f"X{record:03d}RPM"
    shaft_hz = float(np.asarray(data[rpm_key]).reshape(-1)[0]) / 60.0 if rpm_key in data else None
    signal = np.stack([c[:length] for c in columns]).astype(np.float32)
    return RealRecording(signal, names, sample_rate_hz, shaft_hz, f"cwru:{path.name}")


def load_mafaulda(path: Union[str, Path], sample_rate_hz: int = MAFAULDA_RATE_HZ) -> RealRecording:
    """A MaFaulDa CSV recording: its 8 columns as channels; the shaft speed from the tachometer."""
    path = Path(path)
    try:
        table = np.loadtxt(str(path), delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError) as exc:
        raise LoaderError(f"{path}: not a numeric CSV ({exc})") from exc
    if table.shape[1] != len(MAFAULDA_COLUMNS):
        raise LoaderError(f"{path}: {table.shape[1]} columns, a MaFaulDa CSV has {len(MAFAULDA_COLUMNS)}")
    if not np.isfinite(table).all():
        raise LoaderError(f"{path}: non-finite values")
    signal = table.T.astype(np.float32)
    return RealRecording(
        signal,
        list(MAFAULDA_COLUMNS),
        sample_rate_hz,
        tachometer_hz(signal[0], sample_rate_hz),
        f"mafaulda:{path.name}",
    )


def tachometer_hz(tach: np.ndarray, sample_rate_hz: float) -> Optional[float]:
    """Revolutions per second of a once-per-revolution pulse train (rising edges through mid-level)."""
    level = (float(tach.max()) + float(tach.min())) / 2.0
    high = tach > level
    rising = np.flatnonzero(high[1:] & ~high[:-1])
    if rising.size < 2:
        return None
    return float(sample_rate_hz * (rising.size - 1) / (rising[-1] - rising[0]))


def to_sensor_windows(
    recording: RealRecording,
    channels: Sequence[str],
    hop: int = WINDOW,
    counts_per_unit: float = COUNTS_PER_G,
) -> np.ndarray:
    """int16 windows [K, len(channels), WINDOW] at the sensor's rate."""
    return cut(to_sensor_signal(recording, channels, counts_per_unit), hop)


def to_sensor_signal(
    recording: RealRecording, channels: Sequence[str], counts_per_unit: float = COUNTS_PER_G
) -> np.ndarray:
    """int16 [len(channels), samples] at the sensor's rate (polyphase resampling), in accelerometer counts."""
    from math import gcd

    from scipy.signal import resample_poly

    missing = [c for c in channels if c not in recording.channels]
    if missing:
        raise LoaderError(f"{recording.source} has no channel {missing} (has {recording.channels})")
    picked = np.stack([recording.signal[recording.channels.index(c)] for c in channels]).astype(np.float64)
    divisor = gcd(SAMPLE_RATE_HZ, recording.sample_rate_hz)
    up, down = SAMPLE_RATE_HZ // divisor, recording.sample_rate_hz // divisor
    resampled = resample_poly(picked, up, down, axis=1) if (up, down) != (1, 1) else picked
    return np.clip(np.round(resampled * counts_per_unit), -32768, 32767).astype(np.int16)
