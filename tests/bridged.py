"""One cell behind HAProxy (a cloud worker, a collector into SQLite) and one site broker bridged to it, as the
site tests start it (tests/test_sites.py, tests/test_fault_sites.py). Real Mosquitto both ends, real
HAProxy."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Tuple

from broker.launcher import find_free_port
from cells.haproxy import routes_in_log
from cells.plan import CellsPlan
from cells.sites import Site, SitesPlan, write_sites
from cells.stack import CellStack
from cloud_worker import CloudWorker, WorkerConfig
from results_db import Collector, CollectorConfig


@dataclass
class BridgedSite:
    cells: CellsPlan
    sites: SitesPlan
    stack: CellStack
    db: Path
    worker: CloudWorker  # the cell's

    @property
    def site(self) -> Site:
        return self.sites.sites[0]

    def bridge_logins(self) -> int:
        """How often the site's bridge has connected through HAProxy (its log: `option logasap`)."""
        log = self.cells.haproxy_cfg.with_name("haproxy.log")
        return sum(1 for _, state in routes_in_log(log).get(self.site.bridge_account, []) if state == "--")


@contextmanager
def bridged_site(
    cells: CellsPlan,
    sites_dir: Path,
    models: Path,
    db: Path,
    *,
    name: str = "site-t",
    devices_per_site: int = 2,
    port: Optional[int] = None,
    remote: Optional[Tuple[str, int]] = None,
    **worker_options: Any,
) -> Iterator[BridgedSite]:
    """`cells` (one cell) up with a cloud worker on `models` and a collector into `db`; site `name` planned
    into `sites_dir` (its bridge through `remote`, default the cells' HAProxy) and its broker up."""
    with CellStack(cells, services=False) as stack:
        broker = stack.brokers[0]
        collector = Collector(CollectorConfig(broker.credentials("collector"), cells.topics, db, flush_ms=20))
        collector.start()
        worker = CloudWorker(
            WorkerConfig(broker.credentials("cloud"), cells.topics, models, "w", **worker_options)
        )
        worker.start()
        try:
            sites = write_sites(
                sites_dir,
                cells,
                sites=[name],
                devices_per_site=devices_per_site,
                port=port or find_free_port(),
                remote=remote,
                cell_brokers=stack.brokers,
            )
            site_broker = sites.sites[0].broker().start()
            try:
                yield BridgedSite(cells, sites, stack, db, worker)
            finally:
                site_broker.stop()
        finally:
            worker.stop()
            collector.stop()
