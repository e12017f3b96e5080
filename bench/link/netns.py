"""A link's network namespace: a veth pair to the root namespace, rate limits by tbf, outages by link state.

    root namespace                                 link namespace  ec-link-<pid>-<n>
    forwarder -> the services        veth          delaying proxy's upstream connections
    10.201.<n>.1/30  ec<pid>-<n>h  <========>  ec<pid>-<n>l  10.201.<n>.2/30
         egress: tbf at down_mbit                  egress: tbf at up_mbit

Every command is `ip` or `tc`, run as root; a failure becomes a `LinkError` with the tool's own message.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import logging
import os
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Set

from bench.link.errors import LinkError

logger = logging.getLogger(__name__)

NAME_PATTERN = re.compile(r"^ec-link-(\d+)-(\d+)$")
SUBNET_PREFIX = "10.201"  # 10.201.<n>.0/30, n = 0..255: private, and unlikely to be a real network here
MAX_LINKS = 256

# tbf: a bucket of 5 ms at the link's rate (at least 4 full frames, so slow links can still send one frame
# after another at line rate): short bursts as a radio scheduler grants, not seconds of them at full speed.
BURST_S = 0.005
MIN_BURST_BYTES = 4 * 1514
# A queue of 50 ms at the rate before tbf drops: a moderately buffered access link. More would add seconds of
# queueing under load on the slow profiles; less would drop before TCP over the (short) veth path can react.
QUEUE_LATENCY_MS = 50


def _run(*args: str) -> str:
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise LinkError(f"{' '.join(args)}: {exc}") from None
    if done.returncode != 0:
        raise LinkError(f"{' '.join(args)}: {done.stderr.strip() or f'exit status {done.returncode}'}")
    return done.stdout


def unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be used here (None: they may be; creating one is the real test)."""
    if os.geteuid() != 0:
        return "not root"
    for tool in ("ip", "tc"):
        if shutil.which(tool) is None:
            return f"no `{tool}` command"
    return None


def namespaces() -> List[str]:
    """Every named network namespace (`ip netns list` prints `name (id: N)`)."""
    return [line.split()[0] for line in _run("ip", "netns", "list").splitlines() if line.strip()]


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def cleanup_stale() -> List[str]:
    """Delete the link namespaces whose creating process is dead (a run killed before its teardown); their
    veth pairs go with them."""
    removed = []
    for name in namespaces():
        match = NAME_PATTERN.match(name)
        if match and not _alive(int(match.group(1))):
            with contextlib.suppress(LinkError):
                _run("ip", "netns", "del", name)
                removed.append(name)
    if removed:
        logger.info("removed link namespaces left by dead processes: %s", ", ".join(removed))
    return removed


@contextlib.contextmanager
def _allocation_lock() -> Iterator[None]:
    """One process at a time picks a subnet and claims it (parallel runs would otherwise pick the same)."""
    directory = Path("/run/lock") if os.access("/run/lock", os.W_OK) else Path(tempfile.gettempdir())
    with open(directory / "edgecascade-link.lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _used_indices() -> Set[int]:
    """Subnets taken: by a link namespace (even while its veth is down and its routes gone) or by any route
    of the root namespace that overlaps one (ours, or a real network that happens to use 10.201/16)."""
    used = {int(m.group(2)) for m in map(NAME_PATTERN.match, namespaces()) if m}
    ours = ipaddress.ip_network(f"{SUBNET_PREFIX}.0.0/16")
    for line in _run("ip", "-4", "-o", "route", "show", "table", "all").splitlines():
        words = line.split()
        if words and words[0] in {"local", "broadcast", "unicast", "anycast", "multicast", "blackhole"}:
            words = words[1:]
        if not words or words[0] == "default":
            continue
        try:
            network = ipaddress.ip_network(words[0], strict=False)
        except ValueError:
            continue
        if network.overlaps(ours):
            first = max(int(network.network_address), int(ours.network_address))
            last = min(int(network.broadcast_address), int(ours.broadcast_address))
            used.update(range((first >> 8) & 0xFF, ((last >> 8) & 0xFF) + 1))
    return used


def _burst_bytes(mbit: float) -> int:
    return max(int(mbit * 1e6 / 8 * BURST_S), MIN_BURST_BYTES)


def _tbf(mbit: float) -> List[str]:
    return [
        "tbf",
        "rate",
        f"{int(mbit * 1e6)}bit",
        "burst",
        str(_burst_bytes(mbit)),
        "latency",
        f"{QUEUE_LATENCY_MS}ms",
    ]


def window_bytes(mbit: float) -> int:
    """Receive buffer and window clamp for the receiving end of a veth direction shaped at `mbit` (0: leave
    the kernel's), set with `clamp_window`.

    The TCP connection across the veth has a round trip of microseconds, so its sender would push until tbf's
    queue overflows and then stall on retransmission timeouts (measured: 10 Mbit/s shaped gave 8.3 in a third
    of the runs). A receive window of a third of the queue keeps fewer bytes in flight than the queue holds,
    from the first round trip on: no drops, the full rate, and a standing queue of about QUEUE_LATENCY_MS / 3.
    (The kernel makes the window about 1.5 times what is asked: still under half the queue.)"""
    if mbit <= 0:
        return 0
    queue = int(mbit * 1e6 / 8 * QUEUE_LATENCY_MS / 1e3) + _burst_bytes(mbit)
    return max(MIN_BURST_BYTES, queue // 3)


def clamp_window(sock: socket.socket, window: int) -> None:
    """Limit what a receiving socket lets its peer have in flight (before connect or listen, so that the
    handshake already advertises it; accepted sockets inherit a listener's). The clamp alone does not hold:
    receive-buffer autotuning raises it again, which a fixed SO_RCVBUF switches off."""
    if window > 0:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, window)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_WINDOW_CLAMP, window)


class Namespace:
    """One link's namespace and veth pair, created by `create` and removed by `destroy`."""

    def __init__(self, index: int) -> None:
        pid = os.getpid()
        self.index = index
        self.name = f"ec-link-{pid}-{index}"
        self.root_if = f"ec{pid}-{index}h"  # <= 15 characters (IFNAMSIZ) for any pid and index
        self.link_if = f"ec{pid}-{index}l"
        self.root_address = f"{SUBNET_PREFIX}.{index}.1"
        self.link_address = f"{SUBNET_PREFIX}.{index}.2"

    @classmethod
    def create(cls, up_mbit: float, down_mbit: float) -> Namespace:
        """A fresh namespace on a free subnet, joined and shaped; nothing is left behind if a step fails."""
        with _allocation_lock():
            cleanup_stale()
            free = sorted(set(range(MAX_LINKS)) - _used_indices())
            if not free:
                raise LinkError(f"no free subnet left in {SUBNET_PREFIX}.0.0/16 for another link")
            ns = cls(free[0])
            _run("ip", "netns", "add", ns.name)  # claims the index for the processes that come after
        try:
            ns._join(up_mbit, down_mbit)
        except BaseException:
            ns.destroy()
            raise
        return ns

    def _join(self, up_mbit: float, down_mbit: float) -> None:
        n = self.name
        _run("ip", "link", "add", self.root_if, "type", "veth", "peer", "name", self.link_if, "netns", n)
        # No IPv6 link-local addresses: their router and neighbour solicitations would cross the shaped link.
        _run("ip", "link", "set", self.root_if, "addrgenmode", "none")
        _run("ip", "-n", n, "link", "set", self.link_if, "addrgenmode", "none")
        _run("ip", "addr", "add", f"{self.root_address}/30", "dev", self.root_if)
        _run("ip", "-n", n, "addr", "add", f"{self.link_address}/30", "dev", self.link_if)
        if down_mbit > 0:  # the root end's egress carries cloud -> device
            _run("tc", "qdisc", "replace", "dev", self.root_if, "root", *_tbf(down_mbit))
        if up_mbit > 0:  # the link end's egress carries device -> cloud
            _run("tc", "-n", n, "qdisc", "replace", "dev", self.link_if, "root", *_tbf(up_mbit))
        _run("ip", "-n", n, "link", "set", "lo", "up")
        _run("ip", "-n", n, "link", "set", self.link_if, "up")
        _run("ip", "link", "set", self.root_if, "up")

    def set_up(self, up: bool) -> None:
        """Bring the link down (every packet either way is lost) or back up.

        Only the root end goes down: the link end then has no carrier but keeps its address and route, so
        its TCP connections retransmit (and new ones retry their SYN) until the link returns, as over a dead
        radio, instead of failing at once with "network unreachable"."""
        _run("ip", "link", "set", self.root_if, "up" if up else "down")

    def qdiscs(self, stats: bool = False) -> str:
        """`tc [-s] qdisc show` of both ends, for a description or a check."""
        s = ["-s"] if stats else []
        return _run("tc", *s, "qdisc", "show", "dev", self.root_if) + _run(
            "tc", *s, "-n", self.name, "qdisc", "show", "dev", self.link_if
        )

    def drops(self) -> int:
        """Packets the shaping dropped so far, both ways (0 is what `window_bytes` is for)."""
        return sum(int(n) for n in re.findall(r"dropped (\d+)", self.qdiscs(stats=True)))

    def destroy(self) -> None:
        """Remove the namespace; its veth pair, addresses and qdiscs go with it."""
        with contextlib.suppress(LinkError):
            _run("ip", "netns", "del", self.name)
        # A process still inside keeps the namespace (and so the veth) alive: remove the root end explicitly.
        with contextlib.suppress(LinkError):
            if Path("/sys/class/net", self.root_if).exists():
                _run("ip", "link", "del", self.root_if)
