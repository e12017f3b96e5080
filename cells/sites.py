"""Bridged edge sites: a Mosquitto on each site's gateway, bridged to its cloud cell; the site's devices talk
to their site broker only.

    OUT/sites.json                 what was planned
    OUT/<site>/broker/             the site's Mosquitto (the project's config, ACL and roles, its devices'
                                   accounts) with `include_dir OUT/<site>/bridge.d`
    OUT/<site>/bridge.d/cell.conf  the bridge (0600: it holds the bridge's password)
    OUT/<site>/devices/<id>.pw     each device's password on its site broker
    OUT/<site>/gateway/<user>.pw   the site gateway's two accounts there (the fault hierarchy's gateway,
                                   `edgecascade fault gateway`): `gateway`, the service that answers the
                                   sensors' windows, and `gw-<site>`, the device it asks the cloud as

The bridge is Mosquitto's own: MQTT 5 (ResponseTopic, CorrelationData and message expiry travel with every
offload and reply), QoS 1 each way, `cleansession false` on both ends, so that while the uplink is cut the
site broker queues what its devices send (up to `max_queued_messages`, broker/edgecascade.conf) and the cell
queues what the cloud answers, and both are delivered once it is back. It logs in to the cells' HAProxy as
`bridge-<site>` (routed like any client, by its client id: the site's cell is `cell_of(bridge-<site>)`), an
account that exists on that cell only, with a role that may carry the project's topics and nothing else
(`broker.dynsec.bridge_role`). Meanwhile the devices answer at the edge: an offload's reply does not come
within its deadline, so the edge's answer stands, labelled `fallback`; results wait in the site broker and
in each device's outbox until the collector's receipt comes back over the bridge.

The fault hierarchy's gateway sits on its site broker: the sensors' `<root>/<sensor>/gateway` windows and the
`gateway` shared group stay on the site (the bridge carries no `gateway` topic), the gateway's own offloads
(as device `gw-<site>`, on its `offload` topic) cross the bridge like any site device's and its replies
come back down; like the site's devices, `gw-<site>` has an account on the site broker only.
"""

from __future__ import annotations

import json
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from broker import dynsec
from broker.launcher import BrokerProcess
from cells.plan import CellsPlan, PlanError
from protocol.ids import bridge_account, check_device_id, check_name, check_username
from protocol.mqtt import BrokerAddress
from protocol.topics import Topics

MANIFEST = "sites.json"
VERSION = 1
# A cut uplink is noticed within 1.5 keep-alives; the bridge then retries every 1 s, backing off to 10 s.
KEEPALIVE_S = 10
RESTART_TIMEOUT = "1 10"
# The site gateway's service account on its site broker (role `gateway`: the sensors' gateway windows).
GATEWAY_USER = "gateway"


@dataclass(frozen=True)
class Site:
    name: str
    host: str
    port: int
    directory: Path
    cell: int  # the cell its bridge lands in

    @property
    def broker_dir(self) -> Path:
        return self.directory / "broker"

    @property
    def bridge_dir(self) -> Path:
        return self.directory / "bridge.d"

    @property
    def bridge_account(self) -> str:
        return bridge_account(self.name)

    @property
    def forward_device(self) -> str:
        """The device account the site's gateway asks the cloud as: `gw-<site>`."""
        return check_device_id(f"gw-{self.name}")

    def broker(self) -> BrokerProcess:
        """The site's broker (not started), from its work directory."""
        extra = f"include_dir {self.bridge_dir}"
        return BrokerProcess(self.broker_dir, host=self.host, port=self.port, extra_config=extra)

    def password_file(self, device_id: str) -> Path:
        return self.directory / "devices" / f"{check_device_id(device_id)}.pw"

    def devices(self) -> List[str]:
        folder = self.directory / "devices"
        return sorted(p.stem for p in folder.glob("*.pw")) if folder.is_dir() else []

    def device_address(self, device_id: str) -> BrokerAddress:
        """How a device of this site logs in: its site broker, its own account there."""
        password = self.password_file(device_id).read_text().strip()
        return BrokerAddress(self.host, self.port, device_id, password)

    def gateway_password_file(self, username: str) -> Path:
        return self.directory / "gateway" / f"{check_username(username)}.pw"

    def gateway_address(self, username: str = GATEWAY_USER) -> BrokerAddress:
        """How the site's gateway logs in to its site broker: `gateway` (answering the sensors) or
        `forward_device` (asking the cloud, over the bridge)."""
        password = self.gateway_password_file(username).read_text().strip()
        return BrokerAddress(self.host, self.port, username, password)


def bridge_config(site: Site, remote: Tuple[str, int], password: str, topics: Topics) -> str:
    """The bridge section of a site broker's config: the project's topics under `topics.root`, both ways."""
    up = [f"topic {topics.root}/+/{kind} out 1" for kind in dynsec.BRIDGE_UP]
    down = [f"topic {topics.root}/+/{kind} in 1" for kind in dynsec.BRIDGE_DOWN]
    down += [f"topic {topics.root}/{topic} in 1" for topic in dynsec.BRIDGE_DOWN_SHARED]
    account = site.bridge_account
    lines = [
        f"# generated by `edgecascade sites plan`: {site.name}'s bridge to the cells at",
        f"# {remote[0]}:{remote[1]} (where {account} lands in cell-{site.cell}); devices connect here only.",
        f"connection {account}",
        f"address {remote[0]}:{remote[1]}",
        # MQTT 5: ResponseTopic, CorrelationData and MessageExpiryInterval cross the bridge with each message
        "bridge_protocol_version mqttv50",
        f"remote_clientid {account}",
        f"remote_username {account}",
        f"remote_password {password}",
        f"local_clientid {account}-local",
        # persistent sessions on both ends: each side queues for the other while the uplink is cut
        "cleansession false",
        "local_cleansession false",
        "notifications false",
        f"keepalive_interval {KEEPALIVE_S}",
        f"restart_timeout {RESTART_TIMEOUT}",
        *up,
        *down,
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class SitesPlan:
    directory: Path
    remote: Tuple[str, int]
    sites: Tuple[Site, ...]
    namespace: Optional[str] = None

    @property
    def topics(self) -> Topics:
        return Topics.namespaced(self.namespace) if self.namespace else Topics()

    def site(self, name: str) -> Site:
        for site in self.sites:
            if site.name == name:
                return site
        raise PlanError(
            f"no site {name!r} in {self.directory} (sites: {', '.join(s.name for s in self.sites)})"
        )

    @classmethod
    def load(cls, directory: Path) -> SitesPlan:
        directory = Path(directory)
        manifest = directory / MANIFEST
        try:
            data = json.loads(manifest.read_text())
            if data.get("version") != VERSION:
                raise PlanError(f"{manifest} is not a version-{VERSION} sites plan")
            sites = tuple(
                Site(s["name"], s["host"], int(s["port"]), directory / s["dir"], int(s["cell"]))
                for s in data["sites"]
            )
            host, port = data["remote"].rsplit(":", 1)
            return cls(directory, (host, int(port)), sites, data.get("namespace"))
        except FileNotFoundError:
            raise PlanError(f"{manifest} not found: write a plan first (`edgecascade sites plan`)") from None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"{manifest}: missing or bad field ({exc})") from None


def _refuse_running(cells: CellsPlan, index: int) -> None:
    """A running cell's plugin owns its account file: an account written there now would be lost."""
    cell = cells.cells[index]
    try:
        with socket.create_connection((cell.host, cell.port), timeout=0.5):
            pass
    except OSError:
        return
    raise PlanError(
        f"{cell.name} is running ({cell.host}:{cell.port}): stop `edgecascade cells up`, plan the sites, "
        "then start the cells again (a running broker keeps its own account file)"
    )


def site_devices(site: str, count: int) -> List[str]:
    """`count` device ids of a site: <site>-dev-000, ..."""
    return [check_device_id(f"{site}-dev-{i:03d}") for i in range(count)]


def write_sites(
    directory: Path,
    cells: CellsPlan,
    *,
    sites: Sequence[str] = ("site-0",),
    devices_per_site: int = 5,
    host: str = "127.0.0.1",
    port: int = 12883,
    remote: Optional[Tuple[str, int]] = None,
    cell_brokers: Optional[List[BrokerProcess]] = None,
) -> SitesPlan:
    """Plan `sites` (site i's broker on host:port+i, with `devices_per_site` device accounts and its gateway's
    two) bridged to `cells` (through its HAProxy unless `remote` says otherwise). Each bridge account is
    created on its cell: on `cell_brokers` if they run, else in the cells' account files (then start the
    cells after this)."""
    directory = Path(directory)
    if (directory / MANIFEST).exists():
        raise PlanError(f"{directory / MANIFEST} exists: plan into another directory (or delete this one)")
    if not sites:
        raise PlanError("at least one site is needed")
    if devices_per_site < 0:
        raise PlanError(f"--devices-per-site must be >= 0, got {devices_per_site}")
    if len(set(sites)) != len(sites):
        raise PlanError(f"site names must differ: {list(sites)}")
    names = [check_name(s, "site name") for s in sites]
    if remote is None:
        remote = ("127.0.0.1" if cells.host in ("0.0.0.0", "") else cells.host, cells.port)
    planned = tuple(
        Site(name, host, port + i, directory / name, cells.cell_of(bridge_account(name)))
        for i, name in enumerate(names)
    )
    for site in planned:
        if cell_brokers is None:
            _refuse_running(cells, site.cell)
            cell = cells.broker(site.cell)
            cell.add_users([site.bridge_account])
            cell.write_accounts()
        else:
            cell = cell_brokers[site.cell]
            cell.add_users([site.bridge_account])  # live, through the running broker's $CONTROL
        password = cell.credentials(site.bridge_account).password
        site.bridge_dir.mkdir(parents=True, exist_ok=True)
        dynsec.write_private(
            site.bridge_dir / "cell.conf", bridge_config(site, remote, password, cells.topics)
        )
        broker = site.broker()  # writes its mosquitto.conf and credentials.json
        devices = site_devices(site.name, devices_per_site)
        gateway = [GATEWAY_USER, site.forward_device]
        broker.add_users([*devices, *gateway])
        broker.write_accounts()
        (site.directory / "devices").mkdir(exist_ok=True)
        for device in devices:
            dynsec.write_private(site.password_file(device), broker.credentials(device).password + "\n")
        (site.directory / "gateway").mkdir(exist_ok=True)
        for user in gateway:
            dynsec.write_private(site.gateway_password_file(user), broker.credentials(user).password + "\n")
    manifest = {
        "version": VERSION,
        "cells": str(cells.directory.resolve()),
        "remote": f"{remote[0]}:{remote[1]}",
        "namespace": cells.namespace,
        "sites": [
            {"name": s.name, "host": s.host, "port": s.port, "dir": s.directory.name, "cell": s.cell}
            for s in planned
        ],
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return SitesPlan(directory, remote, planned, cells.namespace)
