"""sd_notify for the services: READY=1 once serving, WATCHDOG=1 at half of WATCHDOG_USEC while healthy.

Written on the stdlib (one datagram to $NOTIFY_SOCKET) rather than a dependency: the protocol is three lines
and the device side must stay light (Python 3.8). Without $NOTIFY_SOCKET every call is a no-op, so the same
code runs under systemd, in tests and by hand.

The units in deploy/ set `Type=notify`, `NotifyAccess=main` and `WatchdogSec=30s`: systemd then exports
WATCHDOG_USEC=30000000 and WATCHDOG_PID, and restarts the service when 30 s pass without WATCHDOG=1.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from pathlib import Path
from typing import Callable, Optional

logger = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send one sd_notify datagram; False when not running under systemd or when the socket is gone.

    A failure is logged, never raised: losing a notification must not take the service down (systemd will
    notice a missing READY=1 or WATCHDOG=1 by itself).
    """
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    if path.startswith("@"):  # abstract namespace socket
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(message.encode(), path)
    except OSError as exc:
        logger.warning("sd_notify %r to %s failed: %s", message.split("\n", 1)[0], path.lstrip("\0"), exc)
        return False
    return True


def watchdog_interval_s() -> Optional[float]:
    """Half of WATCHDOG_USEC (as systemd recommends), or None when no watchdog is configured for us."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or (pid and pid != str(os.getpid())):
        return None
    try:
        value = int(usec)
    except ValueError:
        logger.warning("ignoring WATCHDOG_USEC=%r: not an integer", usec)
        return None
    return value / 2e6 if value > 0 else None


def credential_path(name: str) -> Optional[Path]:
    """Where systemd put credential `name` (LoadCredential=/SetCredential=), or None outside such a unit."""
    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    return Path(directory) / name if directory else None


class Watchdog:
    """Pings WATCHDOG=1 while the main loop beats and `healthy()` holds; stops pinging when the loop is stuck.

    The main loop calls `beat()` each time round, including when it is idle (wait with a timeout, not
    forever). A heartbeat older than `stale_after_s` (default: the full WATCHDOG_USEC, i.e. two ping
    intervals) withholds the ping, so a wedged loop lets systemd's timer expire and restart the service.
    `healthy` adds a check of its own; an exception from it counts as unhealthy.
    """

    def __init__(
        self, healthy: Optional[Callable[[], bool]] = None, stale_after_s: Optional[float] = None
    ) -> None:
        self.interval_s = watchdog_interval_s()
        self._last_beat = time.monotonic()
        self._stale_after_s = stale_after_s or (2 * self.interval_s if self.interval_s else 30.0)
        self._healthy = healthy
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._ready_sent = False
        self._withholding = False
        self.pings = 0

    def beat(self) -> None:
        """Called by the main loop each time round."""
        self._last_beat = time.monotonic()

    def is_healthy(self) -> bool:
        """True when the last beat is fresh and the `healthy` callback (if any) agrees."""
        if time.monotonic() - self._last_beat >= self._stale_after_s:
            return False
        if self._healthy is None:
            return True
        try:
            return bool(self._healthy())
        except Exception:
            logger.exception("health check raised; counting it as unhealthy")
            return False

    def ready(self, status: str = "serving") -> None:
        """Tell systemd we serve (once; later calls only update STATUS=) and start the ping thread."""
        self.beat()
        if self._ready_sent:
            self.status(status)
            return
        self._ready_sent = True
        notify(f"READY=1\nSTATUS={status}")
        if self.interval_s and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="sd-watchdog", daemon=True)
            self._thread.start()

    def status(self, text: str) -> None:
        """Free-form one-line status shown by `systemctl status`."""
        notify(f"STATUS={text}")

    def _run(self) -> None:
        assert self.interval_s is not None
        while not self._stop.wait(self.interval_s):
            if self.is_healthy():
                if self._withholding:
                    logger.warning("main loop healthy again: resuming WATCHDOG=1")
                    self._withholding = False
                if notify("WATCHDOG=1"):
                    self.pings += 1
            elif not self._withholding:  # log once per episode, not every interval
                self._withholding = True
                logger.error(
                    "main loop unhealthy (no beat for %.1f s or health check failed): withholding "
                    "WATCHDOG=1 so systemd restarts us",
                    time.monotonic() - self._last_beat,
                )

    def stopping(self, status: str = "stopping") -> None:
        """Stop pinging and tell systemd a stop is in progress (call first thing when shutting down)."""
        self._stop.set()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout=1.0)
            self._thread = None
        notify(f"STOPPING=1\nSTATUS={status}")
