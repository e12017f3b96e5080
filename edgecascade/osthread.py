"""The OS name of the calling thread (Linux `prctl(PR_SET_NAME)`, at most 15 bytes), so that `top -H`,
`ps -L`, py-spy and cgroup tools can tell a service's threads apart: Python's own thread names stay inside
Python (before 3.14). Hand-written: one libc call, no dependency; a no-op where it is not available.
"""

from __future__ import annotations

import ctypes
import sys

PR_SET_NAME = 15


def name_os_thread(name: str) -> bool:
    """Name the calling OS thread `name` (truncated to 15 bytes); whether it worked."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False
