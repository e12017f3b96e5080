"""The link emulator's one error family: what the benchmark catches to say "no emulated link"."""

from __future__ import annotations


class LinkError(RuntimeError):
    """A link profile cannot be read, or the emulated link cannot be set up or driven."""


class LinkProfileError(LinkError, ValueError):
    """A link profile that does not exist or does not validate (the message lists the known names)."""
