"""CWRU `.mat` and MaFaulDa CSV loaders, on fixtures in those exact formats (tests/data/, written by
tests/data/make_vibration_fixtures.py with scipy.io.savemat and numpy.savetxt)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from scipy.io import savemat

from vibration.loaders import LoaderError, load_cwru, load_mafaulda, to_sensor_signal, to_sensor_windows

DATA = Path(__file__).resolve().parent / "data"


def test_cwru_mat_channels_rpm_and_sensor_windows() -> None:
    rec = load_cwru(DATA / "cwru_130.mat")
    assert rec.channels == ["DE", "FE"]
    assert rec.signal.shape == (2, 4096) and rec.signal.dtype == np.float32
    assert rec.shaft_hz == pytest.approx(1797.0 / 60.0)
    assert rec.sample_rate_hz == 12_000
    windows = to_sensor_windows(rec, ["DE", "FE"])
    assert windows.shape == (2, 2, 2048) and windows.dtype == np.int16
    # 12 kHz in, 12 kHz out: the counts are the g values x 2047.9 counts/g, rounded
    assert np.abs(windows[0, 0] / 2047.9375 - rec.signal[0, :2048]).max() < 1e-3


def test_cwru_48k_file_is_resampled_to_the_sensor_rate() -> None:
    rec = load_cwru(DATA / "cwru_130.mat", sample_rate_hz=48_000)
    signal = to_sensor_signal(rec, ["DE"])
    assert signal.shape == (1, 1024) and signal.dtype == np.int16  # 4,096 samples at 48 kHz = 1,024 at 12
    assert to_sensor_windows(rec, ["DE"]).shape == (0, 1, 2048)  # shorter than a window: none


def test_cwru_errors_say_what_is_wrong(tmp_path: Path) -> None:
    with pytest.raises(LoaderError, match="12000 or 48000"):
        load_cwru(DATA / "cwru_130.mat", sample_rate_hz=20_000)
    savemat(tmp_path / "other.mat", {"vibration": np.zeros((10, 1))})
    with pytest.raises(LoaderError, match="no X<nnn>_DE_time"):
        load_cwru(tmp_path / "other.mat")
    savemat(tmp_path / "two.mat", {"X097_DE_time": np.zeros((10, 1)), "X098_DE_time": np.zeros((10, 1))})
    with pytest.raises(LoaderError, match="records \\[97, 98\\]"):
        load_cwru(tmp_path / "two.mat")
    assert load_cwru(tmp_path / "two.mat", record=98).shaft_hz is None  # no X098RPM in it
    (tmp_path / "junk.mat").write_bytes(b"not matlab")
    with pytest.raises(LoaderError, match="not a readable MATLAB file"):
        load_cwru(tmp_path / "junk.mat")
    rec = load_cwru(DATA / "cwru_130.mat")
    with pytest.raises(LoaderError, match="no channel \\['BA'\\]"):
        to_sensor_windows(rec, ["BA"])


def test_mafaulda_csv_columns_tachometer_and_resampling() -> None:
    rec = load_mafaulda(DATA / "mafaulda_normal_12.csv")
    assert rec.signal.shape == (8, 2000)
    assert rec.channels[0] == "tachometer" and rec.channels[-1] == "microphone"
    assert rec.shaft_hz == pytest.approx(50.0, rel=1e-3)
    # 2,000 samples at 50 kHz -> 480 at 12 kHz: less than one window
    assert to_sensor_windows(rec, ["underhang_radial", "underhang_tangential"]).shape[0] == 0
    assert to_sensor_signal(rec, ["underhang_radial"]).shape == (1, 480)


def test_mafaulda_errors(tmp_path: Path) -> None:
    (tmp_path / "seven.csv").write_text("1,2,3,4,5,6,7\n1,2,3,4,5,6,7\n")
    with pytest.raises(LoaderError, match="7 columns, a MaFaulDa CSV has 8"):
        load_mafaulda(tmp_path / "seven.csv")
    (tmp_path / "text.csv").write_text("a,b,c,d,e,f,g,h\n")
    with pytest.raises(LoaderError, match="not a numeric CSV"):
        load_mafaulda(tmp_path / "text.csv")
    (tmp_path / "nan.csv").write_text("1,2,3,4,5,6,7,nan\n")
    with pytest.raises(LoaderError, match="non-finite"):
        load_mafaulda(tmp_path / "nan.csv")
