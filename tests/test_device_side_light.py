"""The device side stays light: no torch, SQLAlchemy or matplotlib, and Python 3.8-compatible source."""

from __future__ import annotations

import pkgutil
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEVICE_PACKAGES = ("device_agent", "protocol", "metering", "video")
HEAVY = ("torch", "torchvision", "sqlalchemy", "matplotlib")


def _modules(package: str) -> list[str]:
    path = REPO / package
    names = [package] + [f"{package}.{m.name}" for m in pkgutil.iter_modules([str(path)])]
    return [n for n in names if not n.endswith("__main__")]


def _heavy_after_import(modules: list[str]) -> list[str]:
    code = (
        "import importlib, sys\n"
        f"for m in {modules!r}: importlib.import_module(m)\n"
        f"print(','.join(sorted(h for h in {HEAVY!r} if h in sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    return [h for h in out.stdout.strip().split(",") if h]


@pytest.mark.parametrize("package", DEVICE_PACKAGES)
def test_device_package_imports_nothing_heavy(package: str) -> None:
    assert _heavy_after_import(_modules(package)) == []


def test_the_check_catches_a_heavy_import(tmp_path: Path) -> None:
    """Plant `import torch` in a copy of device_agent: both the import check and vermin must object."""
    copy = tmp_path / "device_agent"
    shutil.copytree(REPO / "device_agent", copy)
    # `import torch` for the import check; a dict union (Python 3.9+) for vermin.
    (copy / "planted.py").write_text("import torch\nmerged = {'a': 1} | {'b': 2}\n")
    code = (
        f"import sys; sys.path.insert(0, {str(tmp_path)!r}); import device_agent.planted; "
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("True")
    vermin = subprocess.run(
        [
            str(Path(sys.executable).parent / "vermin"),
            "--target=3.8-",
            "--no-tips",
            "--violations",
            str(copy),
        ],
        capture_output=True,
        text=True,
    )
    assert vermin.returncode != 0, vermin.stdout
    assert "dict union" in vermin.stdout


def test_device_packages_pass_vermin_for_python_38() -> None:
    result = subprocess.run(
        [
            str(Path(sys.executable).parent / "vermin"),
            "--target=3.8-",
            "--no-tips",
            "--violations",
            "--eval-annotations",
            *DEVICE_PACKAGES,
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
