"""Writes the small CWRU `.mat` and MaFaulDa CSV fixtures beside this file (tests/test_vibration_loaders.py).

Their content is simulated (vibration.simulate: an outer-race fault at 1797 rpm, CWRU's 0 hp speed), their
format is the real one: `python tests/data/make_vibration_fixtures.py` rewrites them identically.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.io import savemat

from vibration.simulate import COUNTS_PER_G, simulate

HERE = Path(__file__).resolve().parent


def main() -> None:
    rec = simulate("outer", 3, seed=(20, 0), duration_s=0.5)
    g = rec.signal.astype(np.float64) / COUNTS_PER_G
    # CWRU: column vectors [N, 1] of float64 in g, the record number in every key, RPM as a 1x1 matrix.
    savemat(
        HERE / "cwru_130.mat",
        {
            "X130_DE_time": g[0][:4096, None],
            "X130_FE_time": g[1][:4096, None],
            "X130RPM": np.array([[1797.0]]),
        },
    )
    # MaFaulDa: no header, 8 columns at 50 kHz (here 0.04 s, 2,000 rows); the tachometer one pulse per turn.
    rows = 2000
    t = np.arange(rows) / 50_000.0
    tach = np.where((t * 50.0 + 0.5) % 1.0 < 0.1, 4.5, 0.1)  # 50 rev/s, rising edges at rows 500, 1500
    x = np.interp(np.arange(rows) * 12_000 / 50_000, np.arange(g.shape[1]), g[0])
    y = np.interp(np.arange(rows) * 12_000 / 50_000, np.arange(g.shape[1]), g[1])
    cols = [tach, 0.3 * x, x, y, 0.2 * x, 0.5 * x, 0.5 * y, 0.01 * np.sin(2 * np.pi * 440 * t)]
    np.savetxt(HERE / "mafaulda_normal_12.csv", np.stack(cols, axis=1), delimiter=",", fmt="%.5e")


if __name__ == "__main__":
    main()
