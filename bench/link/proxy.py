"""The delaying TCP proxy: one child process per side of a link, driven by `EmulatedLink`.

Hand-written because this kernel has no netem and toxiproxy has no package here: delay and jitter are applied
in user space, per chunk read, in each direction.

`python -m bench.link.proxy --map FD=HOST:PORT ... [--delay-ms D --jitter-ms J]` accepts on the
listening sockets it inherits (file descriptors FD: a socket stays in the network namespace it was made in,
so the parent makes them in the root namespace) and connects each accepted connection to HOST:PORT from the
namespace this process runs in (the link's, under `ip netns exec`). Each chunk is released at
max(previous release, arrival + delay ± uniform jitter): jitter varies the delay, never the order of a
stream's bytes. A new connection is accepted here at once, so its handshake is what the proxy adds too: the
first bytes towards the cloud count as arriving one round trip (a delay each way) after the accept, as a
client's first segment leaves only after the SYN went up and the SYN-ACK came down. A client that opens a
connection per request pays that round trip each time, as over a real link.

Control is on stdin, one word a line, answered on stdout with the same word: `down` closes every connection
and refuses new ones (the outage of the proxy-only mode), `up` ends that; `traffic` is answered with the word
and a JSON list of [unix s, bytes up, bytes down] per 0.1 s in which bytes were released onto the link (what a
radio model needs: when, and how much). End of stdin (the parent closed it,
or died) ends the process, so no proxy outlives its link.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import logging
import random
import socket
import sys
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Callable, Coroutine, Deque, Dict, List, Optional, Set, Tuple

from bench.link.netns import clamp_window

logger = logging.getLogger(__name__)

CHUNK_BYTES = 64 * 1024
# Bytes written but not yet on the wire, per socket: asyncio's buffer and the kernel's unsent data. Small, so
# that data waiting for a slow link waits in the delay line (bounded, and in order) rather than in seconds of
# buffers nobody sees (the kernel's send buffer grows to megabytes).
UNSENT_BYTES = 32 * 1024
TRAFFIC_BIN_S = 0.1
TCP_NOTSENT_LOWAT = getattr(socket, "TCP_NOTSENT_LOWAT", 25)


def _limit_unsent(writer: asyncio.StreamWriter) -> None:
    writer.transport.set_write_buffer_limits(high=UNSENT_BYTES)
    sock = writer.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, TCP_NOTSENT_LOWAT, UNSENT_BYTES)


async def open_upstream(
    host: str, port: int, window: int
) -> Tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to host:port made in this process's namespace, its receive window clamped to `window`
    bytes (0: not)."""
    if window <= 0:
        return await asyncio.open_connection(host, port, limit=CHUNK_BYTES)
    address = (await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM))[0]
    sock = socket.socket(address[0], socket.SOCK_STREAM)
    try:
        clamp_window(sock, window)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address[4])
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_connection(sock=sock, limit=CHUNK_BYTES)


async def run_all(*coros: Coroutine[Any, Any, None]) -> None:
    """Run the coroutines together; the first to fail cancels the others (asyncio.gather would leave them
    running on a connection that is already broken)."""
    tasks = [asyncio.ensure_future(c) for c in coros]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            task.result()  # raises the first failure
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass(frozen=True)
class Delay:
    """One direction's one-way delay, in seconds."""

    delay_s: float = 0.0
    jitter_s: float = 0.0

    def sample(self, rng: random.Random) -> float:
        if self.jitter_s <= 0:
            return self.delay_s
        return max(0.0, self.delay_s + rng.uniform(-self.jitter_s, self.jitter_s))


class Traffic:
    """Bytes released onto the link per TRAFFIC_BIN_S and direction (one bin per 0.1 s with traffic: an hour
    at full use is 36,000 small entries)."""

    def __init__(self) -> None:
        self.bins: Dict[int, List[int]] = {}

    def add(self, direction: int, nbytes: int) -> None:
        slot = self.bins.setdefault(int(time.time() / TRAFFIC_BIN_S), [0, 0])
        slot[direction] += nbytes

    def as_json(self) -> str:
        return json.dumps([[b * TRAFFIC_BIN_S, up, down] for b, (up, down) in sorted(self.bins.items())])


class DelayLine:
    """One direction of one connection: reads chunks, holds each until its release time, writes them in order.

    At most `max_queued` bytes wait in the line: beyond that the reader stops reading, so a sender faster than
    the link is slowed by TCP's own flow control instead of by an unbounded buffer here."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        delay: Delay,
        rng: random.Random,
        max_queued: int,
        counted: Optional[Callable[[int], None]] = None,
        ready_at: float = 0.0,
    ) -> None:
        self._counted = counted
        self._ready_at = ready_at  # loop time before which nothing read counts as arrived (the handshake)
        self._reader = reader
        self._writer = writer
        self._delay = delay
        self._rng = rng
        self._max_queued = max_queued
        self._items: Deque[Tuple[float, bytes]] = deque()
        self._queued = 0
        self._changed = asyncio.Condition()

    async def run(self) -> None:
        await run_all(self._read(), self._write())

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        last_release = 0.0
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: self._queued < self._max_queued)
            data = await self._reader.read(CHUNK_BYTES)
            now = max(loop.time(), self._ready_at)
            # Never before the previous chunk: a later, less delayed chunk waits for it (no reordering).
            last_release = max(last_release, now + self._delay.sample(self._rng))
            async with self._changed:
                self._items.append((last_release, data))
                self._queued += len(data)
                self._changed.notify_all()
            if not data:  # end of stream: forwarded, in order, after the data before it
                return

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            async with self._changed:
                await self._changed.wait_for(lambda: bool(self._items))
                release, data = self._items[0]
            wait_s = release - loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
            if not data:
                if self._writer.can_write_eof():
                    self._writer.write_eof()
                return
            self._writer.write(data)
            if self._counted is not None:
                self._counted(len(data))
            await self._writer.drain()
            async with self._changed:
                self._items.popleft()
                self._queued -= len(data)
                self._changed.notify_all()


@dataclass(frozen=True)
class Mapping:
    """A listening socket (inherited file descriptor) and where its connections go."""

    fd: int
    host: str
    port: int


@dataclass(frozen=True)
class Settings:
    """How one proxy process treats its connections (one side of a link)."""

    up: Delay = Delay()  # accepted -> upstream (device -> cloud)
    down: Delay = Delay()
    up_queue_bytes: int = 4 << 20
    down_queue_bytes: int = 4 << 20
    # Receive window of the upstream connections (0: the kernel's), when they receive over a shaped veth: see
    # bench.link.netns.window_bytes. (The other side's is on the listening socket its parent made.)
    upstream_window: int = 0
    connect_timeout_s: float = 30.0
    seed: Optional[int] = None


class Proxy:
    """Every mapping's server, the connections they carry, and the `down` state of an outage."""

    def __init__(self, mappings: List[Mapping], settings: Settings) -> None:
        self.mappings = mappings
        self.settings = settings
        self.rng = random.Random(settings.seed)
        self.is_down = False
        self.traffic = Traffic()
        self._tasks: Set[asyncio.Task] = set()

    async def serve(self) -> None:
        servers = []
        for mapping in self.mappings:
            sock = socket.socket(fileno=mapping.fd)
            sock.setblocking(False)
            servers.append(
                await asyncio.start_server(
                    functools.partial(self._accepted, mapping=mapping), sock=sock, limit=CHUNK_BYTES
                )
            )
        print("ready", flush=True)
        try:
            await self._control()
        finally:
            for server in servers:
                server.close()
            await self.close_all()

    async def _control(self) -> None:
        """Commands from stdin until it ends."""
        loop = asyncio.get_running_loop()
        while True:
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                return
            command = line.strip()
            if command == "down":
                self.is_down = True
                await self.close_all()  # every connection is reset before the parent hears "down"
            elif command == "up":
                self.is_down = False
            elif command == "traffic":
                command = f"traffic {self.traffic.as_json()}"
            else:
                logger.warning("unknown control command %r", command)
                continue
            print(command, flush=True)

    async def close_all(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _accepted(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, mapping: Mapping
    ) -> None:
        if self.is_down:
            writer.transport.abort()
            return
        accepted_at = asyncio.get_running_loop().time()
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        s = self.settings
        upstream: Optional[asyncio.StreamWriter] = None
        clean = False  # both directions ended with an end of stream, forwarded
        try:
            up_reader, up_writer = await asyncio.wait_for(
                open_upstream(mapping.host, mapping.port, s.upstream_window), s.connect_timeout_s
            )
            upstream = up_writer
            _limit_unsent(writer)
            _limit_unsent(up_writer)
            handshake_s = s.up.sample(self.rng) + s.down.sample(self.rng)  # SYN up, SYN-ACK down
            ready_at = accepted_at + handshake_s
            await run_all(
                DelayLine(
                    reader,
                    up_writer,
                    s.up,
                    self.rng,
                    s.up_queue_bytes,
                    lambda n: self.traffic.add(0, n),
                    ready_at=ready_at,
                ).run(),
                DelayLine(
                    up_reader, writer, s.down, self.rng, s.down_queue_bytes, lambda n: self.traffic.add(1, n)
                ).run(),
            )
            clean = True
        except (OSError, asyncio.TimeoutError) as exc:
            logger.debug("connection to %s:%d ended: %s", mapping.host, mapping.port, exc)
        except asyncio.CancelledError:
            pass  # an outage or the end of the process: both ends are reset below, as a lost link would
        finally:
            self._tasks.discard(task)
            for stream in (writer, upstream):
                if stream is None:
                    continue
                if clean:
                    stream.close()
                else:
                    stream.transport.abort()


def _mapping(text: str) -> Mapping:
    fd, _, address = text.partition("=")
    host, _, port = address.rpartition(":")
    if not fd.isdigit() or not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected FD=HOST:PORT, got {text!r}")
    return Mapping(int(fd), host.strip("[]"), int(port))


def main(argv: Optional[List[str]] = None) -> None:
    """Proxy the inherited listening sockets until stdin ends (started by bench.link, not by hand)."""
    parser = argparse.ArgumentParser(prog="python -m bench.link.proxy", description=main.__doc__)
    parser.add_argument("--map", type=_mapping, action="append", required=True, metavar="FD=HOST:PORT")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay, each direction")
    parser.add_argument("--jitter-ms", type=float, default=0.0, help="± uniform, each direction")
    parser.add_argument("--up-queue-bytes", type=int, default=4 << 20)
    parser.add_argument("--down-queue-bytes", type=int, default=4 << 20)
    parser.add_argument(
        "--upstream-window", type=int, default=0, help="receive window bytes; 0 = the kernel's"
    )
    parser.add_argument("--connect-timeout-s", type=float, default=30.0)
    parser.add_argument("--seed", type=int)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="bench.link.proxy: %(message)s")
    delay = Delay(args.delay_ms / 1e3, args.jitter_ms / 1e3)
    settings = Settings(
        up=delay,
        down=delay,
        up_queue_bytes=args.up_queue_bytes,
        down_queue_bytes=args.down_queue_bytes,
        upstream_window=args.upstream_window,
        connect_timeout_s=args.connect_timeout_s,
        seed=args.seed,
    )
    proxy = Proxy(args.map, settings)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(proxy.serve())


if __name__ == "__main__":
    main()
