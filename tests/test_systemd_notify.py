"""sd_notify/watchdog messages of edgecascade.systemd, read from a fake $NOTIFY_SOCKET datagram socket.

systemd itself is not needed: the protocol is datagrams on the socket named by $NOTIFY_SOCKET, and the
watchdog's period comes from $WATCHDOG_USEC / $WATCHDOG_PID, which the tests set as systemd would.
"""

from __future__ import annotations

import os
import socket
import time
import uuid
from pathlib import Path
from typing import Iterator, List

import pytest

from edgecascade import systemd
from edgecascade.systemd import Watchdog

# A 0.2 s watchdog: WATCHDOG=1 every 0.1 s, a heartbeat is stale after 0.2 s.
WATCHDOG_USEC = 200_000


class FakeNotifySocket:
    """The receiving end systemd would hold: a bound AF_UNIX datagram socket."""

    def __init__(self, address: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(address)
        self.received: List[str] = []

    def drain(self, wait_s: float = 0.0) -> List[str]:
        """Messages that arrived so far (waiting up to `wait_s` for the first one)."""
        out: List[str] = []
        self.sock.settimeout(wait_s)  # 0.0 = non-blocking
        try:
            while True:
                out.append(self.sock.recv(4096).decode())
                self.sock.settimeout(0.0)
        except (BlockingIOError, socket.timeout):
            pass
        self.received += out
        return out

    def wait_for(self, message: str, timeout_s: float = 10.0) -> List[str]:
        """Collect messages until one equal to `message` arrives (generous timeout: 2 shared cores)."""
        deadline = time.monotonic() + timeout_s
        got: List[str] = []
        while time.monotonic() < deadline:
            got += self.drain(wait_s=0.05)
            if message in got:
                return got
        raise AssertionError(f"no {message!r} within {timeout_s}s; got {got!r}")


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeNotifySocket]:
    path = tmp_path / "notify.sock"
    if len(str(path)) > 100:  # sun_path holds 108 bytes
        path = Path("/tmp") / f"ec-notify-{uuid.uuid4().hex[:8]}.sock"
    fake = FakeNotifySocket(str(path))
    monkeypatch.setenv("NOTIFY_SOCKET", str(path))
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    yield fake
    fake.sock.close()
    path.unlink(missing_ok=True)


def test_ready_once_then_watchdog_at_half_the_period_while_the_loop_beats(
    notify_socket: FakeNotifySocket,
) -> None:
    dog = Watchdog()
    assert dog.interval_s == pytest.approx(0.1)  # half of WATCHDOG_USEC, as systemd recommends
    dog.ready("serving test")
    dog.ready("serving again")  # a second call must not send READY=1 again
    first = notify_socket.drain(wait_s=1.0)
    assert first[0] == "READY=1\nSTATUS=serving test"

    pings = 0
    deadline = time.monotonic() + 20.0
    while pings < 3 and time.monotonic() < deadline:  # the main loop keeps beating
        dog.beat()
        pings += notify_socket.drain(wait_s=0.05).count("WATCHDOG=1")
    dog.stopping()
    notify_socket.drain(wait_s=0.2)

    assert pings >= 3, notify_socket.received
    assert sum(m.startswith("READY=1") for m in notify_socket.received) == 1
    assert "STATUS=serving again" in notify_socket.received
    assert notify_socket.received[-1] == "STOPPING=1\nSTATUS=stopping"
    assert dog.pings >= 3


def test_no_watchdog_ping_once_the_heartbeat_is_stale(notify_socket: FakeNotifySocket) -> None:
    dog = Watchdog()
    dog.ready()
    notify_socket.wait_for("WATCHDOG=1")  # pings flow while fresh
    # The main loop wedges: no more beat(). After the heartbeat goes stale (0.2 s) and one more ping interval,
    # whatever was in flight has arrived; from then on nothing may come.
    time.sleep(0.2 + 0.1 + 0.5)
    notify_socket.drain()
    assert not dog.is_healthy()
    time.sleep(0.6)  # six ping intervals
    assert "WATCHDOG=1" not in notify_socket.drain()

    dog.beat()  # the loop recovers: pings resume
    notify_socket.wait_for("WATCHDOG=1")
    dog.stopping()


def test_no_ping_while_the_health_check_fails(notify_socket: FakeNotifySocket) -> None:
    connected = {"up": True}
    dog = Watchdog(healthy=lambda: connected["up"], stale_after_s=60.0)
    dog.ready()
    notify_socket.wait_for("WATCHDOG=1")
    connected["up"] = False
    time.sleep(0.1 + 0.5)
    notify_socket.drain()
    time.sleep(0.6)
    assert "WATCHDOG=1" not in notify_socket.drain()
    dog.stopping()


def test_a_raising_health_check_counts_as_unhealthy(notify_socket: FakeNotifySocket) -> None:
    def broken() -> bool:
        raise RuntimeError("boom")

    assert not Watchdog(healthy=broken).is_healthy()
    assert Watchdog(healthy=lambda: True).is_healthy()


def test_watchdog_for_another_pid_or_none_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", str(WATCHDOG_USEC))
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))  # systemd addressed a different process
    assert systemd.watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "garbage")
    assert systemd.watchdog_interval_s() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert systemd.watchdog_interval_s() is None
    assert Watchdog().interval_s is None


def test_without_systemd_everything_is_a_no_op(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    assert systemd.notify("READY=1") is False
    dog = Watchdog()
    dog.ready()
    dog.beat()
    dog.stopping()
    assert dog.pings == 0


def test_a_vanished_socket_is_logged_not_raised(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert systemd.notify("READY=1") is False
    assert "sd_notify 'READY=1'" in caplog.text


def test_abstract_namespace_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"edgecascade-test-{uuid.uuid4().hex}"
    fake = FakeNotifySocket("\0" + name)
    try:
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)  # how systemd writes an abstract address
        assert systemd.notify("READY=1")
        assert fake.drain(wait_s=1.0) == ["READY=1"]
    finally:
        fake.sock.close()


def test_credential_path(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert systemd.credential_path("mqtt-password") is None
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert systemd.credential_path("mqtt-password") == tmp_path / "mqtt-password"
