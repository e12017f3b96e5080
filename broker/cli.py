"""`edgecascade broker`: run a private Mosquitto with the project's config and generated credentials."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import json
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Dict, List

EPILOG = """examples:
  edgecascade broker --port 1884 --users cam-01,cam-02 --credentials-out creds.json
      # loopback only; prints host, port and users, then serves until Ctrl-C or SIGTERM
  edgecascade broker --workdir /srv/broker --host 0.0.0.0 --tls-dir /srv/broker/certs \\
      --users cam-01 --password-dir /srv/broker/passwords
      # devices connect over TLS (clients: --tls-ca /srv/broker/certs/ca.crt); the plaintext
      # listener stays on 127.0.0.1. Test certificates are made in --tls-dir when it holds none.

Run it again with the same --workdir and every password and port stay what they were (credentials.json,
0600, in the workdir), so connected clients simply reconnect. Account names: device ids (letters, digits,
'.', '_', '-'; no '+', '#', '/') bound to client id = name, or cloud, collector, cloud-<x>, collector-<x>, or
sensor-<device>: a camera's account, which may publish only to that device's input topic (--source mqtt).
"""


HELP = "Run a private Mosquitto with the project's config on a free port"
DESCRIPTION = (
    "Start Mosquitto with broker/edgecascade.conf, its ACL and roles, generated passwords, "
    "and serve until stopped."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument(
        "--host",
        default="127.0.0.1",
        help="address clients connect to (default %(default)s); other than loopback needs --tls-dir "
        "or --allow-plaintext",
    )
    parser.add_argument("--port", type=int, default=0, help="plaintext port (0 = the last one or a free one)")
    parser.add_argument(
        "--tls-dir",
        type=Path,
        help="TLS listener on --host with DIR/ca.crt, server.crt, server.key (made with "
        "broker/make-test-certs.sh when absent); the plaintext listener then binds 127.0.0.1",
    )
    parser.add_argument("--tls-port", type=int, default=0, help="TLS port (0 = the last one or a free one)")
    parser.add_argument(
        "--allow-plaintext",
        action="store_true",
        help="listen in plaintext on a non-loopback --host (passwords cross the network in clear text)",
    )
    parser.add_argument(
        "--workdir", type=Path, help="where config, accounts and persistence live (default: a new tmp dir)"
    )
    parser.add_argument(
        "--users", default="", help="comma-separated accounts to create besides cloud/collector"
    )
    parser.add_argument("--credentials-out", type=Path, help="write credentials as JSON here (mode 0600)")
    parser.add_argument(
        "--password-dir",
        type=Path,
        help="write one <user>.pw per account here (mode 0600), for --password-file",
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _fail(message: str, rc: int = 2) -> int:
    print(f"edgecascade broker: {message}", file=sys.stderr)
    return rc


def _check_port(value: int, option: str) -> None:
    if not 0 <= value < 65536:
        raise ValueError(f"{option} must be 0-65535, got {value}")


def run(args: argparse.Namespace) -> int:
    from broker import dynsec
    from broker.launcher import BrokerProcess
    from protocol.ids import check_username

    try:
        _check_port(args.port, "--port")
        _check_port(args.tls_port, "--tls-port")
        wanted: List[str] = [check_username(u.strip()) for u in args.users.split(",") if u.strip()]
    except ValueError as exc:
        return _fail(str(exc))
    if args.tls_dir is None and not _is_loopback(args.host) and not args.allow_plaintext:
        return _fail(
            f"--host {args.host} would take passwords in clear text from the network: add --tls-dir DIR "
            "(a TLS listener), or --allow-plaintext on a network you trust"
        )
    try:
        broker = BrokerProcess(
            args.workdir,
            host=args.host,
            port=args.port or None,
            tls_dir=args.tls_dir,
            tls_port=args.tls_port or None,
            plain_host="127.0.0.1" if args.tls_dir is not None else None,
        )
        broker.add_users(wanted)
    except (RuntimeError, ValueError) as exc:
        return _fail(str(exc))
    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, lambda *_: stop.set())
    try:
        broker.start()
    except RuntimeError as exc:
        return _fail(str(exc), 1)
    with contextlib.closing(broker):
        users = broker.users
        info: Dict[str, Any] = {"host": broker.plain_host, "port": broker.port}
        if broker.tls_port is not None and broker.tls_dir is not None:
            info.update(tls_host=broker.host, tls_port=broker.tls_port, tls_ca=str(broker.tls_dir / "ca.crt"))
        passwords = {u: broker.credentials(u).password for u in users}
        if args.credentials_out:
            dynsec.write_private(args.credentials_out, json.dumps({**info, "passwords": passwords}, indent=2))
        if args.password_dir:
            args.password_dir.mkdir(parents=True, exist_ok=True)
            for user, password in passwords.items():
                dynsec.write_private(args.password_dir / f"{user}.pw", password + "\n")
        print(json.dumps({**info, "users": users}), flush=True)
        print("mosquitto serving; Ctrl-C or SIGTERM stops it", file=sys.stderr, flush=True)
        with contextlib.suppress(KeyboardInterrupt):
            while not stop.wait(1.0):
                if not broker.running:
                    return _fail(f"mosquitto exited unexpectedly; see {broker.log_file}", 1)
    return 0
