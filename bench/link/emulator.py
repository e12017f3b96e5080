"""`EmulatedLink`: an emulated network link between the benchmark's device side and its cloud side.

    device side (root ns)          link namespace                  root ns               services
    127.0.0.1:<port> ──► delaying proxy ──► veth (tbf each way) ──► forwarder ──► target host:port
                        (±jitter, in order)   10.201.n.2 → 10.201.n.1

The device side connects to `link.address(name)` on loopback; the proxy's upstream connections are made from
inside the link namespace, so every byte crosses the shaped veth pair. On the far side a plain forwarder (a
second proxy process, no delay) connects to the real target from the root namespace: services keep listening
where they already do (127.0.0.1 for the broker and the HTTP peer), none has to bind to the veth's address or
be started after the link. Both proxies are child processes, so their CPU time is not the benchmark's
(whose joules are estimated from its own CPU time).

Without root (or where `ip netns add` fails) the same proxy runs on loopback alone: delay and jitter hold,
rates do not, and an outage closes connections rather than losing packets; `mode` and `not_emulated` say so.
"""

from __future__ import annotations

import json
import logging
import os
import selectors
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

from bench.link import netns
from bench.link.errors import LinkError
from bench.link.profiles import LinkProfile, load_link_profile

logger = logging.getLogger(__name__)

MODES = ("auto", "netns", "proxy-only")
READY_TIMEOUT_S = 30.0  # two interpreters starting on a busy 2-core box
# The delaying proxy holds at most this many bytes per direction of a connection on an unshaped link; on a
# shaped one, twice the bytes the link carries in one delay (less would cap throughput below the rate).
UNSHAPED_QUEUE_BYTES = 4 << 20
MIN_QUEUE_BYTES = 256 << 10
# The forwarder delays nothing: a small bound, so that bytes waiting for the downlink wait behind TCP's
# window over the veth (which netns.window_bytes sizes to the shaping), not in a buffer in front of it.
FORWARDER_QUEUE_BYTES = 64 << 10
_REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Outage:
    """When the link went down and came back (`time.time()` seconds; `ended_at` None while it is down)."""

    started_at: float
    ended_at: Optional[float] = None

    @property
    def duration_s(self) -> Optional[float]:
        return None if self.ended_at is None else self.ended_at - self.started_at


def queue_bytes(mbit: float, delay_ms: float, jitter_ms: float) -> int:
    """The delaying proxy's per-direction bound for a link of `mbit` (0 = unlimited)."""
    if mbit <= 0:
        return UNSHAPED_QUEUE_BYTES
    return max(MIN_QUEUE_BYTES, int(2 * mbit * 1e6 / 8 * (delay_ms + jitter_ms) / 1e3))


class _Child:
    """A proxy process: started with its listening sockets, told `down`/`up` on stdin, ended by closing it."""

    def __init__(self, argv: Sequence[str], pass_fds: Sequence[int], what: str) -> None:
        self.what = what
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(_REPO_ROOT), env.get("PYTHONPATH")]))
        self._proc = subprocess.Popen(
            list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, pass_fds=pass_fds, env=env, bufsize=0
        )
        self._buffer = b""

    def expect(self, word: str, timeout_s: float = READY_TIMEOUT_S) -> str:
        """Wait for the line `word` (and what follows it on that line, returned) on the child's stdout."""
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout_s
        with selectors.DefaultSelector() as selector:
            selector.register(self._proc.stdout, selectors.EVENT_READ)
            while b"\n" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not selector.select(left):
                    raise LinkError(f"{self.what} did not answer {word!r} in {timeout_s:.0f} s")
                chunk = os.read(self._proc.stdout.fileno(), 4096)
                if not chunk:
                    raise LinkError(f"{self.what} exited (status {self._proc.wait()}) before {word!r}")
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        answer, _, rest = line.decode(errors="replace").strip().partition(" ")
        if answer != word:
            raise LinkError(f"{self.what} answered {line!r}, not {word!r}")
        return rest

    def command(self, word: str) -> str:
        assert self._proc.stdin is not None
        try:
            self._proc.stdin.write(word.encode() + b"\n")
        except OSError as exc:
            raise LinkError(f"{self.what} is gone: {exc}") from None
        return self.expect(word, timeout_s=10.0)

    def stop(self) -> None:
        """End of stdin ends the proxy; a proxy that does not end is killed."""
        if self._proc.stdin is not None:
            self._proc.stdin.close()
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        if self._proc.stdout is not None:
            self._proc.stdout.close()


def _listening(host: str, window: int = 0) -> socket.socket:
    """A listening socket on an ephemeral port, in the namespace of this process (the root one)."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    netns.clamp_window(sock, window)
    sock.bind((host, 0))
    sock.listen(128)
    return sock


def _proxy_argv(maps: Sequence[Tuple[int, str, int]], *options: str) -> List[str]:
    argv = [sys.executable, "-m", "bench.link.proxy"]
    for fd, host, port in maps:
        argv += ["--map", f"{fd}={host}:{port}"]
    return argv + list(options)


class EmulatedLink:
    """One emulated link carrying one or more TCP services (`targets`: name -> (host, port)).

    `with EmulatedLink(load_link_profile("lte"), {"mqtt": ("127.0.0.1", 1883)}) as link:` then connect the
    device side to `link.address("mqtt")`. `mode` is "netns" (rates by tbf, outages lose packets) or
    "proxy-only" (see `not_emulated`); ask for one with `mode=`, or let "auto" fall back."""

    def __init__(
        self,
        profile: Union[LinkProfile, str, Path],
        targets: Mapping[str, Tuple[str, int]],
        *,
        mode: str = "auto",
        outage_at_s: Optional[float] = None,
        outage_s: float = 0.0,
        seed: Optional[int] = None,
        connect_timeout_s: float = 30.0,
    ) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if not targets:
            raise ValueError("an emulated link needs at least one target")
        for name, (host, port) in targets.items():
            if not host or not isinstance(port, int) or not 0 < port < 65536:
                raise ValueError(f"target {name!r}: expected (host, port), got {(host, port)!r}")
        if (outage_at_s is None) != (outage_s <= 0):
            raise ValueError("a scheduled outage needs both outage_at_s (>= 0) and outage_s (> 0)")
        if outage_at_s is not None and outage_at_s < 0:
            raise ValueError(f"outage_at_s must be >= 0, got {outage_at_s!r}")
        self.profile = profile if isinstance(profile, LinkProfile) else load_link_profile(profile)
        self.targets: Dict[str, Tuple[str, int]] = dict(targets)
        self.requested_mode = mode
        self.outage_at_s = outage_at_s
        self.outage_s = outage_s
        self.seed = seed
        self.connect_timeout_s = connect_timeout_s
        self.mode: Optional[str] = None  # "netns" or "proxy-only" once started
        self.fallback_reason = ""  # why "auto" did not get a namespace
        self.namespace: Optional[netns.Namespace] = None
        self._addresses: Dict[str, Tuple[str, int]] = {}
        self._children: List[_Child] = []
        self._delaying: Optional[_Child] = None  # the one that takes `down`/`up` in proxy-only mode
        self._lock = threading.Lock()
        self._outages: List[Outage] = []
        self._timers: List[threading.Timer] = []
        self._closed = False

    # -- lifetime ----------------------------------------------------------------------------------
    def __enter__(self) -> EmulatedLink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def start(self) -> EmulatedLink:
        """Set the link up (namespace, shaping, proxies); on any failure nothing is left behind."""
        if self.mode is not None:
            raise LinkError("this link was already started")
        try:
            self._start()
        except BaseException:
            self.close()
            raise
        if self.outage_at_s is not None:
            self._schedule(self.outage_at_s, lambda: self.outage(self.outage_s, wait=False))
        logger.info("%s", self.describe())
        return self

    def _start(self) -> None:
        if self.requested_mode != "proxy-only":
            reason = netns.unavailable_reason()
            if reason is None:
                try:
                    self.namespace = netns.Namespace.create(self.profile.up_mbit, self.profile.down_mbit)
                except LinkError as exc:
                    reason = str(exc)
            if self.namespace is None:
                if self.requested_mode == "netns":
                    raise LinkError(f"cannot set up a link namespace: {reason}")
                self.fallback_reason = reason or ""
        self.mode = "proxy-only" if self.namespace is None else "netns"
        upstream = self.targets if self.namespace is None else self._start_forwarder(self.namespace)
        device_side = {name: _listening("127.0.0.1") for name in self.targets}
        try:
            p = self.profile
            argv = _proxy_argv(
                [(device_side[n].fileno(), *upstream[n]) for n in self.targets],
                *("--delay-ms", str(p.delay_ms), "--jitter-ms", str(p.jitter_ms)),
                *("--up-queue-bytes", str(queue_bytes(p.up_mbit, p.delay_ms, p.jitter_ms))),
                *("--down-queue-bytes", str(queue_bytes(p.down_mbit, p.delay_ms, p.jitter_ms))),
                *("--connect-timeout-s", str(self.connect_timeout_s)),
                *(("--seed", str(self.seed)) if self.seed is not None else ()),
            )
            if self.namespace is not None:  # its upstream connections receive the downlink over the veth
                argv += ["--upstream-window", str(netns.window_bytes(p.down_mbit))]
                argv = ["ip", "netns", "exec", self.namespace.name, *argv]
            self._delaying = self._spawn(argv, device_side.values(), "the link's delaying proxy")
            self._addresses = {n: ("127.0.0.1", s.getsockname()[1]) for n, s in device_side.items()}
        finally:
            for sock in device_side.values():  # the child holds its own copies now
                sock.close()

    def _start_forwarder(self, ns: netns.Namespace) -> Dict[str, Tuple[str, int]]:
        """The far side's forwarder, listening on the veth's root end; returns where each target is from the
        link namespace."""
        # Its connections receive the uplink over the veth: their window is clamped on the listening socket,
        # which the accepted ones inherit (their SYN-ACK's window included).
        window = netns.window_bytes(self.profile.up_mbit)
        far_side = {name: _listening(ns.root_address, window) for name in self.targets}
        try:
            argv = _proxy_argv(
                [(far_side[n].fileno(), *self.targets[n]) for n in self.targets],
                *("--up-queue-bytes", str(FORWARDER_QUEUE_BYTES)),
                *("--down-queue-bytes", str(FORWARDER_QUEUE_BYTES)),
                *("--connect-timeout-s", str(self.connect_timeout_s)),
            )
            self._spawn(argv, far_side.values(), "the link's forwarder")
            return {n: (ns.root_address, sock.getsockname()[1]) for n, sock in far_side.items()}
        finally:
            for sock in far_side.values():
                sock.close()

    def _spawn(self, argv: List[str], sockets: Iterable[socket.socket], what: str) -> _Child:
        child = _Child(argv, [s.fileno() for s in sockets], what)
        self._children.append(child)
        child.expect("ready")
        return child

    def close(self) -> None:
        """Stop the proxies and remove the namespace (and with it the veth pair and its qdiscs)."""
        with self._lock:
            self._closed = True
            timers, self._timers = self._timers, []
        for timer in timers:
            timer.cancel()
        self._delaying = None
        while self._children:  # the delaying proxy first: its connections go before the forwarder's
            self._children.pop().stop()
        if self.namespace is not None:
            self.namespace.destroy()
        with self._lock:
            for outage in self._outages:
                if outage.ended_at is None:
                    outage.ended_at = time.time()

    # -- what the device side uses -------------------------------------------------------------------
    def address(self, name: str) -> Tuple[str, int]:
        """Where the device side connects for target `name` (loopback, in the root namespace)."""
        if name not in self._addresses:
            raise KeyError(f"no target {name!r} on this link (targets: {', '.join(self.targets)})")
        return self._addresses[name]

    @property
    def addresses(self) -> Dict[str, Tuple[str, int]]:
        return dict(self._addresses)

    def traffic(self) -> List[Tuple[float, int, int]]:
        """Every byte the link carried so far, as (unix s, bytes up, bytes down) per 0.1 s with traffic (the
        delaying proxy counts what it releases onto the link: the payload, not TCP/IP headers)."""
        with self._lock:
            if self._delaying is None:
                raise LinkError("the link is not running")
            answer = self._delaying.command("traffic")
        return [(float(t), int(up), int(down)) for t, up, down in json.loads(answer)]

    @property
    def upstream_host(self) -> Optional[str]:
        """The root end of the veth (10.201.n.1), where the forwarder listens; None in proxy-only mode."""
        return None if self.namespace is None else self.namespace.root_address

    @property
    def not_emulated(self) -> str:
        """A sentence for the benchmark's output: what this link does not reproduce."""
        if self.mode == "netns":
            return (
                "Not emulated: random packet loss (only outages lose packets), and the delay is added by a "
                "proxy that ends the device's TCP connection, so the device's TCP sees a loopback round trip."
            )
        up, down = self.profile.up_mbit, self.profile.down_mbit
        rates = f" (asked: up {_rate(up)}, down {_rate(down)})" if self.profile.shaped else ""
        why = f" because {self.fallback_reason}" if self.fallback_reason else ""
        return (
            f"Not emulated{why}: rate limits{rates} and packet loss; an outage closes connections and "
            "refuses new ones instead of losing packets."
        )

    def describe(self) -> str:
        p = self.profile
        where = (
            f"namespace {self.namespace.name}, veth {self.namespace.root_if}/{self.namespace.link_if}"
            if self.namespace is not None
            else "loopback proxy"
        )
        shaping = f"up {_rate(p.up_mbit)}, down {_rate(p.down_mbit)}"
        return (
            f"link {p.name!r} ({self.mode}, {where}): one-way delay {p.delay_ms:g} ms ± {p.jitter_ms:g} ms "
            f"each way, {shaping}. {self.not_emulated}"
        )

    # -- outages ---------------------------------------------------------------------------------------
    @property
    def outages(self) -> List[Outage]:
        """Every outage so far, oldest first (copies)."""
        with self._lock:
            return [Outage(o.started_at, o.ended_at) for o in self._outages]

    @property
    def is_down(self) -> bool:
        with self._lock:
            return bool(self._outages) and self._outages[-1].ended_at is None

    def down(self) -> Outage:
        """Take the link down until `up()`: the returned outage's `started_at` is when it took effect."""
        with self._lock:
            if self._closed or self.mode is None:
                raise LinkError("the link is not running")
            if self._outages and self._outages[-1].ended_at is None:
                raise LinkError("the link is already down")
            if self.namespace is not None:
                self.namespace.set_up(False)
            elif self._delaying is not None:
                self._delaying.command("down")
            outage = Outage(time.time())
            self._outages.append(outage)
            return Outage(outage.started_at)

    def up(self) -> Outage:
        """End the current outage; returns it with `ended_at` (when the link carried packets again)."""
        with self._lock:
            if not self._outages or self._outages[-1].ended_at is not None:
                raise LinkError("the link is not down")
            if self.namespace is not None:
                self.namespace.set_up(True)
            elif self._delaying is not None:
                self._delaying.command("up")
            outage = self._outages[-1]
            outage.ended_at = time.time()
            return Outage(outage.started_at, outage.ended_at)

    def outage(self, seconds: float, *, wait: bool = True) -> Outage:
        """Down for `seconds`, then up; `wait=False` returns once it is down (`outages` tells the end)."""
        if not seconds > 0:
            raise ValueError(f"an outage lasts > 0 s, got {seconds!r}")
        started = self.down()
        timer = self._schedule(seconds, self.up)
        if not wait:
            return started
        timer.join()
        return self.outages[-1]

    def _schedule(self, delay_s: float, action: Callable[[], object]) -> threading.Timer:
        def run() -> None:
            try:
                action()
            except LinkError as exc:  # the link was closed meanwhile: nothing left to take down
                logger.warning("scheduled link change not made: %s", exc)

        timer = threading.Timer(delay_s, run)
        timer.daemon = True
        with self._lock:
            if self._closed:
                raise LinkError("the link is closed")
            self._timers.append(timer)
        timer.start()
        return timer


def _rate(mbit: float) -> str:
    return f"{mbit:g} Mbit/s" if mbit > 0 else "unlimited"
