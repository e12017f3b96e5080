"""The envelope spectrum: band-pass around the resonance, Hilbert envelope, its spectrum (Randall & Antoni
2011, sec. 3): where bearing impacts show as lines at the fault frequency and its harmonics."""

from __future__ import annotations

from typing import Tuple

import numpy as np
from scipy.signal import butter, hilbert, sosfiltfilt


def envelope_spectrum(
    x: np.ndarray, sample_rate_hz: float, band_hz: Tuple[float, float] = (2000.0, 5000.0)
) -> Tuple[np.ndarray, np.ndarray]:
    """(frequencies in Hz, amplitude) of the squared envelope of `x` (1-D) band-passed to `band_hz`."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 1 or x.size < 64:
        raise ValueError(f"want a 1-D signal of at least 64 samples, got shape {x.shape}")
    low, high = band_hz
    if not 0 < low < high < sample_rate_hz / 2:
        raise ValueError(f"band {band_hz} must lie within (0, {sample_rate_hz / 2}) Hz")
    sos = butter(4, [low, high], btype="bandpass", fs=sample_rate_hz, output="sos")
    envelope = np.abs(hilbert(sosfiltfilt(sos, x - x.mean()))) ** 2
    envelope -= envelope.mean()
    amplitude = np.abs(np.fft.rfft(envelope * np.hanning(envelope.size))) / envelope.size
    return np.fft.rfftfreq(envelope.size, 1.0 / sample_rate_hz), amplitude
