"""Waiting on an observable condition, the one way every test does it (never a fixed sleep)."""

from __future__ import annotations

import time
from typing import Callable


def wait_for(condition: Callable[[], object], timeout_s: float = 60.0, what: str = "condition") -> None:
    """Poll until `condition()` holds; fail (not a timing assertion: a generous deadline) otherwise."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)
