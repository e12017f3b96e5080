"""sd_notify for the services: READY=1 once serving, WATCHDOG=1 at half of WATCHDOG_USEC while healthy.

Written on the stdlib (one datagram to $NOTIFY_SOCKET) rather than a dependency: the protocol is three lines
and the device side must stay light. Without $NOTIFY_SOCKET every call is a no-op.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not running under systemd."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        sock.connect(path)
        sock.sendall(message.encode())
    return True


def watchdog_interval_s() -> Optional[float]:
    """Half of WATCHDOG_USEC (as systemd recommends), or None when no watchdog is configured for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 2e6


class Watchdog:
    """Pings WATCHDOG=1 while `healthy()` holds; stops pinging when the main loop is stuck.

    `healthy` should check a heartbeat the main loop updates (see `beat`), so a wedged loop lets systemd's
    timer expire and restart the service.
    """

    def __init__(self, healthy: Optional[Callable[[], bool]] = None, stale_after_s: Optional[float] = None) -> None:
        self.interval_s = watchdog_interval_s()
        self._last_beat = time.monotonic()
        self._stale_after_s = stale_after_s or (2 * self.interval_s if self.interval_s else 30.0)
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def beat(self) -> None:
        """Called by the main loop each time round."""
        self._last_beat = time.monotonic()

    def is_healthy(self) -> bool:
        fresh = time.monotonic() - self._last_beat < self._stale_after_s
        return fresh and (self._healthy is None or self._healthy())

    def ready(self, status: str = "serving") -> None:
        notify(f"READY=1\nSTATUS={status}")
        if self.interval_s and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        assert self.interval_s is not None
        while not self._stop.wait(self.interval_s):
            if self.is_healthy():
                notify("WATCHDOG=1")
            else:
                logger.error("main loop unhealthy: withholding WATCHDOG=1 so systemd restarts us")

    def stopping(self) -> None:
        self._stop.set()
        notify("STOPPING=1")
