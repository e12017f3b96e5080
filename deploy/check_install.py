"""Does the device install resolve where devices run? A pip dry run of the device extras per target.

    python -m deploy.check_install                    # = make check-device-install: every target, from PyPI
    python -m deploy.check_install --target jetpack5 --json

For each target (a JetPack release, an x86-64 device) pip resolves the extras a device installs
(`pip install .[device,jetson]`) as that machine would: `--platform` for its CPU and every manylinux tag its
glibc runs (manylinux_2_<glibc> down to manylinux2014), `--python-version` for its Python,
`--only-binary=:all:` (a Jetson should not compile numpy or OpenCV: a dependency without a wheel there is a
failure here), `--dry-run --ignore-installed --target` into a scratch folder (nothing is installed, this
environment's packages count for nothing) and `--isolated` (no pip configuration or local wheel folders of
this machine: only the index). The requirements are read from pyproject.toml, the project's own extras
expanded.

pip evaluates environment markers against the Python that runs it, not the target's, so this evaluates them
itself: a top-level requirement is kept or dropped by the target's markers, and after each resolution every
resolved package's own requirements are checked against the target; one the target needs that pip left out
(`importlib-resources; python_version < "3.9"` on a 3.11 host) is added and the resolution runs again.
Exit status: 0 when every target resolves, 1 when one does not (pip's reason is printed), 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import tomllib  # the checker runs on a developer's Python (>= 3.11), never on a device
from packaging.markers import Marker
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PYPI = "https://pypi.org/simple"
PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
MAX_ROUNDS = 4  # resolutions per target: each adds what markers pip could not see asked for


@dataclass(frozen=True)
class Target:
    """A machine a device runs on, as far as a wheel can tell: CPU, glibc, Python."""

    name: str
    machine: str  # platform_machine: aarch64, x86_64
    glibc: Tuple[int, int]  # the newest manylinux_2_x its glibc runs
    python: str  # 3.8
    python_full: str  # the distribution's build, for python_full_version markers
    extras: Tuple[str, ...]
    what: str

    def platforms(self) -> List[str]:
        """manylinux_2_<glibc> down to manylinux_2_17 and manylinux2014 (pip adds 2010/1 on x86-64)."""
        major, newest = self.glibc
        tags = [f"manylinux_{major}_{minor}_{self.machine}" for minor in range(newest, 16, -1)]
        return [*tags, f"manylinux2014_{self.machine}"]

    def marker_environment(self) -> Dict[str, str]:
        return {
            "implementation_name": "cpython",
            "implementation_version": self.python_full,
            "os_name": "posix",
            "platform_machine": self.machine,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": self.python_full,
            "python_version": self.python,
            "sys_platform": "linux",
        }


TARGETS: Dict[str, Target] = {
    t.name: t
    for t in (
        Target(
            "jetpack5",
            "aarch64",
            (2, 31),
            "3.8",
            "3.8.10",
            ("device", "jetson"),
            "JetPack 5.1.x: Jetson Linux (L4T) R35, Ubuntu 20.04, glibc 2.31, Python 3.8",
        ),
        Target(
            "jetpack6",
            "aarch64",
            (2, 35),
            "3.10",
            "3.10.12",
            ("device", "jetson"),
            "JetPack 6.x: Jetson Linux (L4T) R36, Ubuntu 22.04, glibc 2.35, Python 3.10",
        ),
        Target(
            "x86-64",
            "x86_64",
            (2, 31),
            "3.8",
            "3.8.10",
            ("device",),
            "an x86-64 device: Ubuntu 20.04, glibc 2.31, Python 3.8 (the oldest the device side runs on)",
        ),
    )
}


@dataclass
class Resolution:
    target: Target
    ok: bool
    packages: List[Tuple[str, str, str]] = field(default_factory=list)  # (name, version, wheel file)
    error: str = ""
    added: List[str] = field(default_factory=list)  # requirements markers asked for that pip left out
    rounds: int = 0

    def as_dict(self) -> Dict[str, Any]:
        return {
            "target": self.target.name,
            "what": self.target.what,
            "ok": self.ok,
            "packages": [{"name": n, "version": v, "wheel": w} for n, v, w in self.packages],
            "added_for_markers": self.added,
            "error": self.error,
            "rounds": self.rounds,
        }


def extra_requirements(pyproject: Path, extras: Sequence[str]) -> List[str]:
    """The requirement strings of `extras`, the project's own `name[extra]` references expanded."""
    project = tomllib.loads(pyproject.read_text())["project"]
    name = canonicalize_name(project["name"])
    optional: Dict[str, List[str]] = project.get("optional-dependencies", {})
    out: List[str] = list(project.get("dependencies", []))
    seen: set = set()
    todo = list(extras)
    while todo:
        extra = todo.pop(0)
        if extra in seen:
            continue
        if extra not in optional:
            raise ValueError(f"{pyproject} has no extra {extra!r}; it has {sorted(optional)}")
        seen.add(extra)
        for line in optional[extra]:
            requirement = Requirement(line)
            if canonicalize_name(requirement.name) == name:
                todo += sorted(requirement.extras)
            else:
                out.append(line)
    return out


def for_target(requirements: Sequence[str], target: Target) -> List[str]:
    """The requirements the target needs, markers evaluated for it and stripped (pip would use its own)."""
    out = []
    environment = target.marker_environment()
    for line in requirements:
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate(environment):
            continue
        requirement.marker = None
        out.append(str(requirement))
    return out


def pip_command(
    target: Target,
    requirements: Sequence[str],
    scratch: Path,
    *,
    index_url: str = PYPI,
    find_links: Optional[str] = None,
) -> List[str]:
    """pip's dry run of `requirements` for the target: resolves, downloads metadata, installs nothing."""
    command = [sys.executable, "-m", "pip", "install", "--isolated", "--disable-pip-version-check"]
    command += ["--dry-run", "--ignore-installed", "--target", str(scratch / "target")]
    command += ["--report", str(scratch / "report.json"), "--quiet", "--only-binary=:all:"]
    command += ["--python-version", target.python, "--implementation", "cp"]
    for platform in target.platforms():
        command += ["--platform", platform]
    command += ["--no-index", "--find-links", find_links] if find_links else ["--index-url", index_url]
    if os.environ.get("PIP_CERT"):  # a proxy's CA: --isolated would drop it
        command += ["--cert", os.environ["PIP_CERT"]]
    return [*command, *requirements]


def _missing_for_markers(report: Dict[str, Any], target: Target) -> List[str]:
    """Requirements of the resolved packages that the target's markers ask for and pip did not resolve."""
    installed = {canonicalize_name(item["metadata"]["name"]) for item in report.get("install", [])}
    environment = target.marker_environment()
    missing: List[str] = []
    for item in report.get("install", []):
        extras = [""] + list(item.get("requested_extras") or [])
        for line in item["metadata"].get("requires_dist") or []:
            requirement = Requirement(line)
            marker: Optional[Marker] = requirement.marker
            if marker is not None and not any(marker.evaluate({**environment, "extra": e}) for e in extras):
                continue
            if canonicalize_name(requirement.name) in installed:
                continue
            requirement.marker = None
            missing.append(str(requirement))
    return sorted(set(missing))


def _pip_error(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("ERROR")]
    return "\n".join(errors or lines[-5:])


def resolve(
    target: Target,
    requirements: Sequence[str],
    *,
    index_url: str = PYPI,
    find_links: Optional[str] = None,
    timeout_s: float = 300.0,
) -> Resolution:
    """Resolve `requirements` (markers already evaluated for the target) as the target would."""
    wanted = list(requirements)
    result = Resolution(target, ok=False)
    with tempfile.TemporaryDirectory(prefix=f"check-install-{target.name}-") as tmp:
        scratch = Path(tmp)
        for rounds in range(1, MAX_ROUNDS + 1):
            result.rounds = rounds
            command = pip_command(target, wanted, scratch, index_url=index_url, find_links=find_links)
            done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
            if done.returncode != 0:
                result.error = _pip_error(done.stderr) or f"pip exited {done.returncode}"
                return result
            report = json.loads((scratch / "report.json").read_text())
            missing = _missing_for_markers(report, target)
            if not missing:
                result.ok = True
                result.packages = sorted(
                    (
                        item["metadata"]["name"],
                        item["metadata"]["version"],
                        item["download_info"]["url"].rsplit("/", 1)[-1],
                    )
                    for item in report["install"]
                )
                return result
            result.added += missing
            wanted += missing
    result.error = f"still missing after {MAX_ROUNDS} resolutions: {result.added}"
    return result


def check(
    targets: Sequence[Target],
    pyproject: Path = PYPROJECT,
    *,
    index_url: str = PYPI,
    find_links: Optional[str] = None,
) -> List[Resolution]:
    """Every target's resolution, side by side (each is a pip process that mostly waits on the index)."""
    with ThreadPoolExecutor(max_workers=len(targets) or 1) as pool:
        futures = [
            pool.submit(
                resolve,
                t,
                for_target(extra_requirements(pyproject, t.extras), t),
                index_url=index_url,
                find_links=find_links,
            )
            for t in targets
        ]
        return [f.result() for f in futures]


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deploy.check_install",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--target", action="append", choices=sorted(TARGETS), help="default: all")
    parser.add_argument("--pyproject", type=Path, default=PYPROJECT, help="default: the project's")
    parser.add_argument("--index-url", default=PYPI, help=f"the package index (default {PYPI})")
    parser.add_argument("--find-links", help="a folder of wheels to use instead of any index")
    parser.add_argument("--json", action="store_true", help="print the resolutions as JSON on stdout")
    args = parser.parse_args(argv)
    targets = [TARGETS[name] for name in (args.target or TARGETS)]
    try:
        results = check(targets, args.pyproject, index_url=args.index_url, find_links=args.find_links)
    except (OSError, ValueError, KeyError, tomllib.TOMLDecodeError) as exc:
        print(f"check_install: {exc}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([r.as_dict() for r in results], indent=2))
    for r in results:
        extras = ",".join(r.target.extras)
        if r.ok:
            note = f"; added for the target's markers: {', '.join(r.added)}" if r.added else ""
            print(
                f"ok    {r.target.name:9} .[{extras}] {len(r.packages)} wheels ({r.target.what}){note}",
                file=sys.stderr,
            )
            for name, version, wheel in r.packages:
                print(f"        {name} {version}  {wheel}", file=sys.stderr)
        else:
            print(f"FAIL  {r.target.name:9} .[{extras}] ({r.target.what})", file=sys.stderr)
            print("      " + r.error.replace("\n", "\n      "), file=sys.stderr)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
