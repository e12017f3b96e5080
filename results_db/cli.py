"""CLI for `edgecascade collect`: result records from MQTT into SQL, until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

from edgecascade.metrics import add_metrics_arguments

logger = logging.getLogger(__name__)

EPILOG = """examples:
  edgecascade collect --broker 127.0.0.1:1883 --user collector --password-file collector.pw \\
      --db results/bench.db
  EDGECASCADE_DB_URL=postgresql+psycopg://edge@db.lan/edge edgecascade collect --password-file collector.pw
  edgecascade collect --config /etc/edgecascade/collect.toml      # under systemd (deploy/)
  edgecascade collect ... --metrics-port 9103    # Prometheus: records by exit stage, refusals by reason

Settings come from the flags, then --config (TOML, the same names with underscores), then systemd
credentials ($CREDENTIALS_DIRECTORY/mqtt-password, $CREDENTIALS_DIRECTORY/db-url), then $EDGECASCADE_DB_URL,
then the defaults. The database is created or migrated on start. Final counters go to stdout as JSON.
Exit status: 0 after SIGTERM/SIGINT; 2 for bad settings, an unusable database, or a login the broker refuses
for good (bad password, not authorized, banned), at start or on a later reconnect; 1 when the writer fails
(a fault of the database that does not pass, such as a missing table) for the supervisor to restart it.
"""

_DEFAULTS: Dict[str, Any] = {
    "broker": "127.0.0.1:1883",
    "user": "collector",
    "password_file": None,
    "tls_ca": None,
    "db": None,
    "namespace": None,
    "batch_size": 500,
    "flush_ms": 200.0,
    "client_id": "edgecascade-collector",
    "session_expiry_s": 7 * 24 * 3600,
    "metrics_port": None,
    "metrics_host": "0.0.0.0",
}


HELP = "Collect result records from MQTT into SQL (SQLite or PostgreSQL)"
DESCRIPTION = (
    "Collect result records from MQTT into SQL: QoS 1, persistent session, "
    "commit before acknowledge, idempotent inserts."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """This subcommand's options; `edgecascade.cli` makes the parser (help, description, EPILOG, run)."""
    parser.add_argument("--broker", help=f"host:port (default {_DEFAULTS['broker']})")
    parser.add_argument("--user", help=f"broker username (default {_DEFAULTS['user']})")
    parser.add_argument("--password-file", type=Path, help="file whose first line is the password")
    parser.add_argument("--tls-ca", help="CA certificate: connect over TLS and verify the broker with it")
    parser.add_argument(
        "--db", help="SQLAlchemy URL or SQLite path (default $EDGECASCADE_DB_URL, results/bench.db)"
    )
    parser.add_argument("--namespace", help="topic namespace in front of edgecascade/v1 (tests, staging)")
    parser.add_argument(
        "--batch-size", type=int, help=f"records per transaction (default {_DEFAULTS['batch_size']})"
    )
    parser.add_argument(
        "--flush-ms", type=float, help=f"longest wait before a commit (default {_DEFAULTS['flush_ms']})"
    )
    parser.add_argument(
        "--client-id", help=f"MQTT client id = persistent session (default {_DEFAULTS['client_id']})"
    )
    parser.add_argument("--session-expiry-s", type=int, help="how long the broker keeps our queue while away")
    add_metrics_arguments(parser, "the collector")


def _credential(name: str) -> Optional[str]:
    """A systemd credential (`LoadCredential=`), or None when the unit passes none of that name."""
    from protocol.mqtt import read_secret

    directory = os.environ.get("CREDENTIALS_DIRECTORY")
    path = Path(directory) / name if directory else None
    if path is None or not path.is_file():
        return None
    return read_secret(path, name)


def settings(args: argparse.Namespace) -> Dict[str, Any]:
    """Flags (a --config file has become flags: deploy.config) over systemd credentials over defaults."""
    merged = dict(_DEFAULTS)
    for key in _DEFAULTS:
        value = getattr(args, key, None)
        if value is not None:
            merged[key] = value
    if merged["db"] is None:
        merged["db"] = _credential("db-url")  # None: open_database falls back to $EDGECASCADE_DB_URL
    return merged


def run(args: argparse.Namespace) -> int:
    from edgecascade.metrics import check_metrics_port
    from protocol.mqtt import BrokerAddress, BrokerUnusable, read_secret
    from protocol.topics import Topics
    from results_db.collector import CollectorConfig
    from results_db.database import DatabaseUnusable

    try:
        conf = settings(args)
        check_metrics_port(conf["metrics_port"])
    except (OSError, ValueError) as exc:
        print(f"bad configuration: {exc}", file=sys.stderr)
        return 2
    try:
        found = (
            read_secret(conf["password_file"])
            if conf["password_file"] is not None
            else _credential("mqtt-password")
        )
    except ValueError as exc:
        print(f"edgecascade collect: {exc}", file=sys.stderr)
        return 2
    if found is None:
        print("no broker password: give --password-file (or a systemd credential)", file=sys.stderr)
        return 2
    password = found
    try:
        broker = BrokerAddress.parse(conf["broker"], conf["user"], password, conf["tls_ca"])
        topics = Topics.namespaced(conf["namespace"]) if conf["namespace"] else Topics()
        config = CollectorConfig(
            broker=broker,
            topics=topics,
            db_url=conf["db"],
            batch_size=int(conf["batch_size"]),
            flush_ms=float(conf["flush_ms"]),
            client_id=conf["client_id"],
            session_expiry_s=int(conf["session_expiry_s"]),
        )
    except ValueError as exc:
        print(str(exc), file=sys.stderr)
        return 2

    stop = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stop.set())
    try:
        stats = serve(config, stop, metrics=(conf["metrics_host"], conf["metrics_port"]))
    except (DatabaseUnusable, BrokerUnusable) as exc:
        print(f"edgecascade collect: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        print(f"edgecascade collect: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # the metrics port is taken, or the address is not this host's
        print(
            f"edgecascade collect: metrics on {conf['metrics_host']}:{conf['metrics_port']}: {exc}",
            file=sys.stderr,
        )
        return 2
    print(json.dumps(stats, sort_keys=True))
    return 0


def serve(
    config: Any, stop: threading.Event, metrics: Optional[Tuple[str, Optional[int]]] = None
) -> Dict[str, int]:
    """Run a `Collector` until `stop` is set, KeyboardInterrupt, the writer dies (RuntimeError) or the broker
    refuses the login for good, at start or on a reconnect (BrokerUnusable); log the counters each minute.
    `metrics` (host, port): serve its Prometheus metrics there while it runs (OSError: the port is taken)."""
    from edgecascade.metrics import serve_metrics
    from results_db.collector import Collector
    from results_db.collector_metrics import CollectorMetrics

    collector = Collector(config)
    server = None
    if metrics is not None and metrics[1] is not None:
        server = serve_metrics(CollectorMetrics(collector).registry, metrics[0], metrics[1])
    try:
        collector.start()
        return _run(collector, stop)
    finally:
        if server is not None:
            server.close()


def _run(collector: Any, stop: threading.Event) -> Dict[str, int]:
    from protocol.mqtt import BrokerUnusable

    last = time.monotonic()
    try:
        while not stop.wait(1.0) and collector.healthy and collector.refused is None:
            if time.monotonic() - last >= 60:
                logger.info("collector stats: %s", collector.stats)
                last = time.monotonic()
    except KeyboardInterrupt:
        pass
    finally:
        collector.stop()
    if collector.failed is not None:
        raise RuntimeError("collector writer failed") from collector.failed
    if collector.refused is not None:
        raise BrokerUnusable(collector.refused)
    return collector.stats
