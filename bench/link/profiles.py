"""Link profiles: one-way delay, jitter, rates and radio kind, as plain TOML in bench/profiles/links/."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Union

from bench.link.errors import LinkProfileError

if sys.version_info >= (3, 11):
    import tomllib
else:  # the device extra installs tomli on older Pythons (as device_agent.config reads device profiles)
    import tomli as tomllib

# Beside the device profiles (bench/profiles/*.toml), so that one `--profile`-style name finds each kind.
PROFILE_DIR = Path(__file__).resolve().parent.parent / "profiles" / "links"

RADIOS = ("none", "wifi", "lte")  # the kinds metering.radio may model; "none" = no radio energy


@dataclass(frozen=True)
class LinkProfile:
    """One emulated link. Delay and jitter are one-way, applied to each direction; a rate of 0 = unlimited."""

    name: str
    delay_ms: float = 0.0
    jitter_ms: float = 0.0
    up_mbit: float = 0.0  # device -> cloud
    down_mbit: float = 0.0  # cloud -> device
    radio: str = "none"

    def __post_init__(self) -> None:
        for key in ("delay_ms", "jitter_ms", "up_mbit", "down_mbit"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise LinkProfileError(
                    f"link profile {self.name!r}: {key} must be a finite number, got {value!r}"
                )
            if value < 0:
                raise LinkProfileError(f"link profile {self.name!r}: {key} must be >= 0, got {value!r}")
        if self.radio not in RADIOS:
            raise LinkProfileError(
                f"link profile {self.name!r}: radio must be one of {', '.join(RADIOS)}, got {self.radio!r}"
            )

    @property
    def shaped(self) -> bool:
        """Whether either direction has a rate limit."""
        return self.up_mbit > 0 or self.down_mbit > 0


def known_profiles() -> List[str]:
    """The names `load_link_profile` accepts without a path."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.toml")) if PROFILE_DIR.is_dir() else []


def load_link_profile(name_or_path: Union[str, Path]) -> LinkProfile:
    """A link profile by name from bench/profiles/links/ (`lan`, `wifi`, `lte`, `satellite`) or by path."""
    path = Path(name_or_path)
    if not path.suffix and not path.exists():
        path = PROFILE_DIR / f"{name_or_path}.toml"
    if not path.is_file():
        known = ", ".join(known_profiles()) or "none"
        raise LinkProfileError(
            f"no link profile {str(name_or_path)!r} (known: {known}; or a path to a .toml)"
        )
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise LinkProfileError(f"cannot read link profile {path}: {exc}") from None
    table: Any = data.get("link")
    if not isinstance(table, dict):
        raise LinkProfileError(f"link profile {path} has no [link] table")
    unknown = sorted(set(table) - {"name", "delay_ms", "jitter_ms", "up_mbit", "down_mbit", "radio"})
    if unknown:  # a typo (`delay = 40`) would otherwise silently mean "no delay"
        raise LinkProfileError(f"link profile {path}: unknown keys {', '.join(unknown)}")
    return LinkProfile(
        name=str(table.get("name", path.stem)),
        delay_ms=table.get("delay_ms", 0.0),
        jitter_ms=table.get("jitter_ms", 0.0),
        up_mbit=table.get("up_mbit", 0.0),
        down_mbit=table.get("down_mbit", 0.0),
        radio=table.get("radio", "none"),
    )
