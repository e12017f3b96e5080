"""`edgecascade broker`: run a private Mosquitto with the project's config and generated credentials."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from pathlib import Path

EXAMPLE = """example:
  edgecascade broker --port 1884 --users cam-01,cam-02 --credentials-out creds.json
  # prints host, port and one password per user (cloud, collector and each device), then serves until Ctrl-C
"""


def register(subparsers: argparse._SubParsersAction, name: str) -> None:
    parser = subparsers.add_parser(
        name,
        help="Run a private Mosquitto with the project's config on a free port",
        description="Start Mosquitto with broker/edgecascade.conf and .acl, generated passwords, and serve.",
        epilog=EXAMPLE,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=0, help="port (0 = a free one)")
    parser.add_argument(
        "--workdir", type=Path, help="where config, passwords and persistence live (default: tmp)"
    )
    parser.add_argument(
        "--users", default="", help="comma-separated device ids to create besides cloud/collector"
    )
    parser.add_argument("--credentials-out", type=Path, help="write credentials as JSON here (mode 0600)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from broker.launcher import BrokerProcess

    broker = BrokerProcess(args.workdir, host=args.host, port=args.port or None)
    users = ["cloud", "collector"] + [u for u in args.users.split(",") if u]
    broker.add_users(users)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    with broker:
        creds = {u: broker.credentials(u).password for u in users}
        info = {"host": broker.host, "port": broker.port, "passwords": creds}
        if args.credentials_out:
            args.credentials_out.write_text(json.dumps(info, indent=2))
            args.credentials_out.chmod(0o600)
        print(json.dumps({"host": broker.host, "port": broker.port, "users": users}), flush=True)
        print(f"mosquitto serving on {broker.host}:{broker.port}; Ctrl-C stops it", file=sys.stderr)
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    return 0
