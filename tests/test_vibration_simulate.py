"""The bearing simulator: kinematics against CWRU's published orders, the envelope spectrum of faulty
recordings (a line at the fault frequency and its harmonics), determinism and separate splits."""

from __future__ import annotations

import numpy as np
import pytest

from vibration.bearing import SKF_6205
from vibration.dataset import SplitSpec, make_windows, recordings
from vibration.envelope import envelope_spectrum
from vibration.simulate import SAMPLE_RATE_HZ, simulate


def test_fault_orders_match_the_cwru_bearing_table() -> None:
    # CWRU's table for the 6205-2RS JEM drive-end bearing (multiples of running speed): BPFI 5.4152,
    # BPFO 3.5848, FTF 0.39828, ball spin 4.7135 (CWRU lists twice our BSF: both races struck per spin).
    orders = SKF_6205.orders()
    assert orders.bpfi == pytest.approx(5.4152, rel=2e-3)
    assert orders.bpfo == pytest.approx(3.5848, rel=2e-3)
    assert orders.ftf == pytest.approx(0.39828, rel=2e-3)
    assert 2 * orders.bsf == pytest.approx(4.7135, rel=2e-3)


def _level_at(freqs: np.ndarray, amp: np.ndarray, f: float, tol: float) -> float:
    sel = np.abs(freqs - f) <= tol * f
    return float(amp[sel].max())


@pytest.mark.parametrize("condition", ["outer", "inner", "ball"])
def test_envelope_spectrum_peaks_at_the_fault_frequency_and_harmonics(condition: str) -> None:
    rec = simulate(condition, 3, seed=(7, 0, 3), duration_s=2.0)
    fault_hz = rec.spec.fault_hz
    expected = {
        "outer": SKF_6205.orders().bpfo,
        "inner": SKF_6205.orders().bpfi,
        "ball": 2 * SKF_6205.orders().bsf,
    }
    assert fault_hz == pytest.approx(expected[condition] * rec.spec.shaft_hz)
    # Band-pass around the resonance the recording was drawn with (what a diagnostician finds by kurtogram).
    resonance = rec.spec.resonance_hz[0]
    freqs, amp = envelope_spectrum(rec.g[0], SAMPLE_RATE_HZ, (resonance - 800.0, resonance + 800.0))
    floor = float(np.median(amp[(freqs > 5.0) & (freqs < 1000.0)]))
    tol = 0.02  # the slip (1-2 %) and the speed drift (0.5 %) smear the lines
    for harmonic in (1, 2):
        assert _level_at(freqs, amp, harmonic * fault_hz, tol) > 10 * floor, f"no line at {harmonic} x fault"
    # The strongest line between 0.8 x and 3.2 x the fault frequency is one of its harmonics.
    band = (freqs > 0.8 * fault_hz) & (freqs < 3.2 * fault_hz)
    peak = float(freqs[band][np.argmax(amp[band])])
    nearest = round(peak / fault_hz)
    assert nearest >= 1 and abs(peak - nearest * fault_hz) <= tol * nearest * fault_hz


def test_healthy_recording_has_no_line_at_the_fault_frequencies() -> None:
    rec = simulate("healthy", 0, seed=(7, 0, 0))
    resonance = rec.spec.resonance_hz[0]
    freqs, amp = envelope_spectrum(rec.g[0], SAMPLE_RATE_HZ, (resonance - 800.0, resonance + 800.0))
    floor = float(np.median(amp[(freqs > 5.0) & (freqs < 1000.0)]))
    orders = SKF_6205.orders()
    for order in (orders.bpfo, orders.bpfi, 2 * orders.bsf):
        assert _level_at(freqs, amp, order * rec.spec.shaft_hz, 0.02) < 10 * floor


def test_recordings_are_deterministic_and_int16() -> None:
    a = simulate("inner", 2, seed=(1, 2, 3))
    b = simulate("inner", 2, seed=(1, 2, 3))
    c = simulate("inner", 2, seed=(1, 2, 4))
    assert a.signal.dtype == np.int16 and a.signal.shape == (2, 2 * SAMPLE_RATE_HZ)
    assert np.array_equal(a.signal, b.signal) and a.spec == b.spec
    assert not np.array_equal(a.signal, c.signal)


def test_bad_arguments_are_refused() -> None:
    with pytest.raises(ValueError, match="condition"):
        simulate("cracked", 1, seed=(0,))
    with pytest.raises(ValueError, match="severity"):
        simulate("outer", 7, seed=(0,))


def test_splits_share_no_recording() -> None:
    draws = {}
    for split in ("train", "validation", "test"):
        spec = SplitSpec(split, recordings=1, duration_s=0.5)
        draws[split] = {(r.spec.shaft_hz, r.spec.load) for _, r in recordings(spec)}
    assert not draws["train"] & draws["validation"]
    assert not draws["train"] & draws["test"]
    assert not draws["validation"] & draws["test"]
    windows = make_windows(SplitSpec("test", recordings=1, duration_s=0.5))
    # 4 classes x 3 recordings (healthy 3 x 1, a fault 3 severities x 1), 2 windows of 2048 in 6,000 samples
    assert windows.x.shape == (24, 2, 2048) and windows.x.dtype == np.int16
    assert np.bincount(windows.y).tolist() == [6, 6, 6, 6]
