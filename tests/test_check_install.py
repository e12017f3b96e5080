"""`make check-device-install` (deploy.check_install): the device extras resolve for JetPack 5, JetPack 6 and
an x86-64 device, and a dependency with no wheel for a Jetson fails the check.

Two kinds of test. The first kind runs pip against a folder of wheels made here (no network): it pins the
checker's logic (platform tags per glibc, markers evaluated for the target, a missing wheel is a failure). The
second kind asks PyPI, because what a Jetson can install is what PyPI serves: the project's own extras, and
the same with onnxruntime-gpu added (PyPI has no aarch64 wheel of it). Those need PyPI and do not skip when it
cannot be reached: they fail, saying so (marker `network`; `-m "not network"` leaves them out on purpose).
"""

from __future__ import annotations

import socket
import zipfile
from pathlib import Path
from typing import Dict, List, Sequence

import pytest

from deploy.check_install import (
    PYPROJECT,
    TARGETS,
    Resolution,
    check,
    extra_requirements,
    for_target,
    main,
)

JETSONS = ("jetpack5", "jetpack6")


def _wheel(folder: Path, name: str, tag: str, requires: Sequence[str] = ()) -> None:
    """A minimal valid wheel: METADATA (with its requirements), WHEEL, RECORD; no code."""
    dist = name.replace("-", "_")
    info = f"{dist}-1.0.dist-info"
    metadata = "Metadata-Version: 2.1\nName: {}\nVersion: 1.0\n{}".format(
        name, "".join(f"Requires-Dist: {r}\n" for r in requires)
    )
    wheel = f"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: {tag}\n"
    with zipfile.ZipFile(folder / f"{dist}-1.0-{tag}.whl", "w") as z:
        z.writestr(f"{info}/METADATA", metadata)
        z.writestr(f"{info}/WHEEL", wheel)
        z.writestr(f"{info}/RECORD", "")


def _pyproject(folder: Path, device: List[str]) -> Path:
    lines = ", ".join(f'"{r}"' for r in device)
    path = folder / "pyproject.toml"
    path.write_text(
        '[project]\nname = "edgecascade"\nversion = "0"\n'
        f'[project.optional-dependencies]\ndevice = [{lines}]\njetson = ["edgecascade[device]"]\n'
    )
    return path


@pytest.fixture
def wheels(tmp_path: Path) -> Path:
    folder = tmp_path / "wheels"
    folder.mkdir()
    _wheel(folder, "ec-pure", "py3-none-any", ['ec-backport; python_version < "3.9"'])
    _wheel(folder, "ec-backport", "py3-none-any")
    # A native wheel for glibc 2.28 on aarch64: JetPack 5 (glibc 2.31) runs it; manylinux2014 alone misses it.
    _wheel(folder, "ec-arm", "cp38-cp38-manylinux_2_28_aarch64")
    _wheel(folder, "ec-arm", "cp310-cp310-manylinux_2_28_aarch64")
    # A dependency built for x86-64 only: what a Jetson cannot install.
    _wheel(folder, "ec-native", "cp38-cp38-manylinux_2_17_x86_64.manylinux2014_x86_64")
    return folder


def _by_target(results: List[Resolution]) -> Dict[str, Resolution]:
    return {r.target.name: r for r in results}


def _names(r: Resolution) -> List[str]:
    return sorted(name for name, _, _ in r.packages)


def test_the_device_extras_resolve_for_every_target_from_wheels(wheels: Path, tmp_path: Path) -> None:
    pyproject = _pyproject(tmp_path, ["ec-pure", "ec-arm; platform_machine == 'aarch64'"])
    results = _by_target(check(list(TARGETS.values()), pyproject, find_links=str(wheels)))
    assert all(r.ok for r in results.values()), {n: r.error for n, r in results.items()}
    # Markers are the target's: Python 3.8 needs the backport (pip on this Python would not ask for it),
    # 3.10 does not; only the Jetsons take the aarch64 wheel.
    assert _names(results["jetpack5"]) == ["ec-arm", "ec-backport", "ec-pure"]
    assert results["jetpack5"].added == ["ec-backport"]
    assert _names(results["jetpack6"]) == ["ec-arm", "ec-pure"]
    assert _names(results["x86-64"]) == ["ec-backport", "ec-pure"]
    assert dict((n, w) for n, _, w in results["jetpack5"].packages)["ec-arm"].endswith(
        "manylinux_2_28_aarch64.whl"
    )


def test_a_dependency_without_a_jetson_wheel_fails_the_check(wheels: Path, tmp_path: Path) -> None:
    pyproject = _pyproject(tmp_path, ["ec-pure", "ec-native"])
    results = _by_target(check(list(TARGETS.values()), pyproject, find_links=str(wheels)))
    for name in JETSONS:
        assert not results[name].ok and "ec-native" in results[name].error, results[name].error
    assert results["x86-64"].ok
    assert main(["--pyproject", str(pyproject), "--find-links", str(wheels)]) == 1
    assert main(["--pyproject", str(pyproject), "--find-links", str(wheels), "--target", "x86-64"]) == 0


def test_the_requirements_are_the_extras_with_the_project_s_own_expanded() -> None:
    device = extra_requirements(PYPROJECT, ["device"])
    assert any(r.startswith("onnxruntime") for r in device)
    cloud = extra_requirements(PYPROJECT, ["cloud"])
    assert set(device) < set(cloud) and not any(r.startswith("edgecascade") for r in cloud)
    # tomli is for Python < 3.11: the 3.8 device gets it, markers stripped
    assert "tomli>=2.0" in for_target(device, TARGETS["jetpack5"])
    with pytest.raises(SystemExit) as refused:
        main(["--target", "no-such"])
    assert refused.value.code == 2
    assert main(["--pyproject", "/nonexistent/pyproject.toml"]) == 2


def _pypi_reachable() -> None:
    try:
        socket.create_connection(("pypi.org", 443), timeout=10).close()
    except OSError as exc:
        pytest.fail(f"this test asks PyPI what a Jetson can install, and PyPI cannot be reached: {exc}")


@pytest.mark.network
def test_the_project_s_device_extras_resolve_on_pypi_for_every_target() -> None:
    _pypi_reachable()
    results = _by_target(check(list(TARGETS.values())))
    assert all(r.ok for r in results.values()), {n: r.error for n, r in results.items()}
    for name in JETSONS:
        wheels = dict((n, w) for n, _, w in results[name].packages)
        assert "aarch64" in wheels["onnxruntime"] and "jetson-stats" in wheels


@pytest.mark.network
def test_onnxruntime_gpu_added_to_the_device_extra_fails_on_the_jetsons(tmp_path: Path) -> None:
    _pypi_reachable()
    text = PYPROJECT.read_text()
    assert '    "scipy>=1.10",\n' in text
    pyproject = tmp_path / "pyproject.toml"
    pyproject.write_text(
        text.replace('    "scipy>=1.10",\n', '    "scipy>=1.10",\n    "onnxruntime-gpu>=1.16",\n')
    )
    results = _by_target(check(list(TARGETS.values()), pyproject))
    for name in JETSONS:  # PyPI has no aarch64 wheel of it: NVIDIA's Jetson builds come from elsewhere
        assert not results[name].ok and "onnxruntime-gpu" in results[name].error, results[name].error
    assert results["x86-64"].ok and "onnxruntime-gpu" in _names(results["x86-64"])
