"""`edgecascade fault`: simulated windows to .npy, clear errors for bad input files."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest

from vibration import cli


def _parse(argv: list) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="edgecascade fault")
    cli.add_arguments(parser)
    return parser.parse_args(argv)


def test_simulate_writes_windows_and_labels(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _parse(["simulate", "--split", "validation", "--recordings", "1", "--out", str(tmp_path)])
    assert cli.run(args) == 0
    x = np.load(tmp_path / "validation.windows.npy")
    y = np.load(tmp_path / "validation.labels.npy")
    assert x.dtype == np.int16 and x.shape == (36, 2, 2048) and np.bincount(y).tolist() == [9, 9, 9, 9]
    assert json.loads(capsys.readouterr().out)["data"] == "synthetic"


def test_sensor_with_a_file_that_is_not_cwru_says_so(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "pw").write_text("secret\n")
    (tmp_path / "bad.mat").write_bytes(b"not matlab")
    args = _parse(
        [
            "sensor",
            "--device-id",
            "pump-7",
            "--password-file",
            str(tmp_path / "pw"),
            "--cwru",
            str(tmp_path / "bad.mat"),
        ]
    )
    assert cli.run(args) == 2
    assert "not a readable MATLAB file" in capsys.readouterr().err


def test_gateway_forward_needs_its_password(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "pw").write_text("secret\n")
    args = _parse(
        ["gateway", "--user", "gateway", "--password-file", str(tmp_path / "pw"), "--forward-device", "gw1"]
    )
    assert cli.run(args) == 2
    assert "--forward-password-file" in capsys.readouterr().err
