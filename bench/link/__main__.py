"""`python -m bench.link`: hold an emulated link open and print where the device side connects."""

from __future__ import annotations

import argparse
import contextlib
import logging
import signal
import sys
import threading
from typing import List, Optional, Tuple

from bench.link.emulator import MODES, EmulatedLink
from bench.link.errors import LinkError
from bench.link.profiles import known_profiles

EXAMPLES = """\
examples:
  python -m bench.link --profile lte --target 127.0.0.1:1883
  python -m bench.link --profile satellite --target mqtt=127.0.0.1:1883 --target http=127.0.0.1:8080
  python -m bench.link --profile my-link.toml --target 127.0.0.1:1883 --outage-at-s 30 --outage-s 10

Prints one line per target on stdout, `NAME HOST:PORT` (connect the device side there), and what the link
does and does not emulate on stderr; runs until interrupted (Ctrl-C or SIGTERM), then removes everything.
"""


def _target(text: str) -> Tuple[str, Tuple[str, int]]:
    name, sep, address = text.rpartition("=")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected [NAME=]HOST:PORT, got {text!r}")
    return (name if sep else address), (host, int(port))


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.link",
        description="Put an emulated link (delay, jitter, rates, outages) in front of TCP services.",
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--profile", required=True, help=f"{', '.join(known_profiles())} or a .toml path")
    parser.add_argument("--target", type=_target, action="append", required=True, metavar="[NAME=]HOST:PORT")
    parser.add_argument("--mode", choices=MODES, default="auto")
    parser.add_argument("--outage-at-s", type=float, help="take the link down this long after it is up")
    parser.add_argument("--outage-s", type=float, default=0.0, help="for this long (with --outage-at-s)")
    parser.add_argument("--seed", type=int, help="seed for the jitter")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(name)s: %(message)s")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    try:
        link = EmulatedLink(
            args.profile,
            dict(args.target),
            mode=args.mode,
            outage_at_s=args.outage_at_s,
            outage_s=args.outage_s,
            seed=args.seed,
        )
        with link:
            print(link.describe(), file=sys.stderr, flush=True)
            for name, (host, port) in link.addresses.items():
                print(f"{name} {host}:{port}", flush=True)
            with contextlib.suppress(KeyboardInterrupt):
                stop.wait()
        for outage in link.outages:  # all ended now: closing the link ends one still going
            print(f"outage at {outage.started_at:.3f} for {outage.duration_s or 0:.3f} s", file=sys.stderr)
    except (LinkError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
