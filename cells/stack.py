"""A planned cell setup running on this host: every cell's Mosquitto, HAProxy in front, and (unless told not
to) each cell's cloud workers and collector as the real `edgecascade` CLI on the plan's config files.

`edgecascade cells up DIR` runs one until SIGINT/SIGTERM; the cells benchmark and the tests drive one from
Python (`kill_cell`, `start_cell`). The service processes are `bench.services.ServiceGroup`'s (readiness by
sd_notify), the one owner of starting the project's services as production starts them.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, List, Optional

from broker.launcher import BrokerProcess
from cells.haproxy import HaproxyProcess
from cells.plan import CellsPlan
from protocol.mqtt import BrokerAddress

if TYPE_CHECKING:
    from bench.services import ServiceGroup

logger = logging.getLogger(__name__)


class CellStack:
    """`with CellStack(CellsPlan.load(DIR)) as stack:` devices connect to `stack.address(device)`."""

    def __init__(self, plan: CellsPlan, *, services: bool = True, logs: Optional[Path] = None) -> None:
        self.plan = plan
        self.brokers: List[BrokerProcess] = [plan.broker(i) for i in range(len(plan.cells))]
        self.haproxy = HaproxyProcess(plan.haproxy_cfg, plan.host, plan.port)
        self.with_services = services
        self.logs = Path(logs) if logs else plan.directory / "logs"
        self.services: Optional[ServiceGroup] = None  # once started
        self._stack = contextlib.ExitStack()

    # -- lifetime ----------------------------------------------------------------------------------
    def start(self) -> CellStack:
        try:
            for broker in self.brokers:
                broker.start()
                self._stack.callback(broker.stop)
            self.haproxy.start()
            self._stack.callback(self.haproxy.stop)
            if self.with_services:
                self._start_services()
        except BaseException:
            self.close()
            raise
        return self

    def _start_services(self) -> None:
        from bench.services import ServiceGroup

        group = ServiceGroup(self.logs)
        self._stack.callback(group.close)
        self.services = group
        for cell in self.plan.cells:
            # the collector first: it migrates the shared database before anything writes results
            group.start(
                f"collector-{cell.index}", ["collect", "--config", str(cell.directory / "collect.toml")]
            )
            for w in range(self.plan.workers_per_cell):
                toml = cell.directory / f"cloud-{w}.toml"
                # numbered across cells (cloud-0, cloud-1, ...) as the fleet simulation numbers its workers
                k = cell.index * self.plan.workers_per_cell + w
                group.start(f"cloud-{k}", ["cloud", "--config", str(toml)])

    def close(self) -> None:
        self._stack.close()

    def __enter__(self) -> CellStack:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- devices -----------------------------------------------------------------------------------
    def add_users(self, devices: Iterable[str]) -> None:
        """Accounts for `devices`, each on its own cell (live, on the running brokers)."""
        self.plan.add_devices(devices, self.brokers)

    def credentials(self, device_id: str) -> BrokerAddress:
        """What `device_id` logs in with: HAProxy's address and its account (created if new)."""
        if not self.plan.password_file(device_id).exists():
            self.add_users([device_id])
        return self.plan.device_address(device_id)

    def cell_broker(self, device_id: str) -> BrokerProcess:
        return self.brokers[self.plan.cell_of(device_id)]

    # -- chaos -------------------------------------------------------------------------------------
    def kill_cell(self, index: int) -> None:
        """SIGKILL the cell's Mosquitto: a crash; what it acknowledged since its last save may be lost."""
        self.brokers[index].kill()

    def start_cell(self, index: int) -> None:
        """The cell's Mosquitto again, on the same port, persistence and accounts."""
        self.brokers[index].start()
