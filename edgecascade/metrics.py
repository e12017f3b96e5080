"""Prometheus metrics: the one HTTP endpoint every service serves (`--metrics-port`), and what they share.

Each service (agent, cloud worker, collector) builds its own `CollectorRegistry`, never the library's global
one: several run in one process in tests and in the fleet simulation, and each must show only its own
figures. Names follow Prometheus' conventions: `edgecascade_<service>_<what>_<unit>`, counters end in
`_total`, seconds and joules are base units, and every label has a bounded set of values (an exit stage, a
reason, a meter's name: never a sample, run or device id of another process).

The scrape config and the Grafana dashboard that read these names live in deploy/prometheus and
deploy/grafana; tests/test_dashboard.py checks that every panel asks for a name a registry here exports.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any, Iterable, Optional, Set

from prometheus_client import CollectorRegistry, start_http_server

logger = logging.getLogger(__name__)

PREFIX = "edgecascade"
# Buckets in seconds: a reply over loopback takes ~1 ms, a fallback waits a 2 s deadline.
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
# One sample's compute: 0.1 ms for a small model on a server, tens of ms for a big one on a Jetson.
SERVICE_BUCKETS_S = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25)
# Joules per inference: microjoules (a tiny model, analytic) to joules (a large one on a GPU).
ENERGY_BUCKETS_J = (1e-5, 3e-5, 1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


class MetricsServer:
    """A registry served over HTTP (`/metrics`, any path) on its own daemon thread; `close()` stops it."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        server, self._thread = start_http_server(port, addr=host, registry=registry)
        self._server: Optional[Any] = server
        self.host = host
        self.port = int(server.server_port)  # the real one when asked for port 0
        logger.info("Prometheus metrics on http://%s:%d/metrics", host or "0.0.0.0", self.port)

    def close(self) -> None:
        """Stop serving and free the port (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()  # shutdown() alone leaves the socket bound
            self._thread.join(5)

    def __enter__(self) -> MetricsServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def serve_metrics(registry: CollectorRegistry, host: str, port: Optional[int]) -> Optional[MetricsServer]:
    """The registry served on host:port, or None when no port was asked for (metrics are opt-in)."""
    if port is None:
        return None
    return MetricsServer(registry, host, port)


def add_metrics_arguments(parser: argparse.ArgumentParser, what: str) -> None:
    """`--metrics-port` and `--metrics-host` for a service's CLI."""
    parser.add_argument(
        "--metrics-port",
        type=int,
        metavar="PORT",
        help=f"serve Prometheus metrics of {what} on http://HOST:PORT/metrics (default: off; 0: any port)",
    )
    parser.add_argument(
        "--metrics-host",
        default="0.0.0.0",
        metavar="HOST",
        help="address the metrics endpoint binds (default %(default)s; 127.0.0.1: this host only)",
    )


def check_metrics_port(port: Optional[int]) -> None:
    """ValueError for a port no socket can bind."""
    if port is not None and not 0 <= port <= 65535:
        raise ValueError(f"--metrics-port must be in 0..65535, got {port}")


SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_count", "_sum"),
    "summary": ("_count", "_sum"),
    "info": ("_info",),
    "gauge": ("",),
}


def exported_names(registries: Iterable[CollectorRegistry]) -> Set[str]:
    """Every series name the registries export (`x_total`, `x_bucket`, ...), also for families that have
    no sample yet (a counter by reason before the first one)."""
    names: Set[str] = set()
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in SUFFIXES.get(family.type, ("",)))
            names.update(sample.name for sample in family.samples)
    return names
