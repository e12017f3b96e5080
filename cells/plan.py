"""`edgecascade cells plan`: the plain config of N broker cells behind HAProxy, written to one directory.

    DIR/cells.json            what was planned (read back by `cells up`, the bench and the tests)
    DIR/haproxy.cfg           the frontend devices connect to (cells.haproxy)
    DIR/cell-<i>/broker/      the cell's Mosquitto: mosquitto.conf (broker/edgecascade.conf, its ACL and
                              dynamic-security roles, as broker.launcher writes them), the account file,
                              credentials.json (0600), persistence
    DIR/cell-<i>/cloud-<w>.toml, collect.toml, cloud.pw, collector.pw
                              the cell's cloud-worker group and its collector (`edgecascade cloud --config`,
                              `edgecascade collect --config`: the same files the systemd units take)
    DIR/devices/<id>.pw       each planned device's password, for `edgecascade agent --password-file`

A device's account exists on its own cell only (`cells.routing.cell_of`), so a device HAProxy ever sent to
another cell would be refused there, not served with a fresh session. Every cell's collector writes the
same results database (the unique keys make that safe; each device's rows come from one cell).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Tuple

from broker import dynsec
from broker.launcher import BrokerProcess
from cells.haproxy import Upstream, cell_name, check_config, find_haproxy, haproxy_config
from cells.routing import cell_of
from protocol.ids import check_device_id, check_name
from protocol.mqtt import BrokerAddress
from protocol.topics import Topics

MANIFEST = "cells.json"
VERSION = 1


class PlanError(ValueError):
    """A plan that cannot be written or read; the message says why."""


@dataclass(frozen=True)
class Cell:
    index: int
    host: str
    port: int
    directory: Path

    @property
    def name(self) -> str:
        return cell_name(self.index)

    @property
    def broker_dir(self) -> Path:
        return self.directory / "broker"


class DeviceAccounts:
    """Devices' accounts of a plan written to `directory`: one `<device>.pw` each under `devices/`; a device
    logs in at the plan's `host`:`port` (HAProxy for the cells, the site broker for a site)."""

    directory: Path
    host: str
    port: int

    def password_file(self, device_id: str) -> Path:
        return self.directory / "devices" / f"{check_device_id(device_id)}.pw"

    def devices(self) -> List[str]:
        folder = self.directory / "devices"
        return sorted(p.stem for p in folder.glob("*.pw")) if folder.is_dir() else []

    def device_address(self, device_id: str) -> BrokerAddress:
        """How `device_id` logs in: this plan's address, its own account."""
        password = self.password_file(device_id).read_text().strip()
        return BrokerAddress(self.host, self.port, device_id, password)


@dataclass(frozen=True)
class CellsPlan(DeviceAccounts):
    """A written plan, as `cells.json` describes it."""

    directory: Path
    host: str  # where HAProxy listens: the one address devices are given
    port: int
    cells: Tuple[Cell, ...]
    workers_per_cell: int
    db: str
    models: str
    namespace: Optional[str] = None

    @property
    def topics(self) -> Topics:
        return Topics.namespaced(self.namespace) if self.namespace else Topics()

    @property
    def haproxy_cfg(self) -> Path:
        return self.directory / "haproxy.cfg"

    def cell_of(self, client_id: str) -> int:
        return cell_of(client_id, len(self.cells))

    def broker(self, index: int) -> BrokerProcess:
        """The cell's broker (not started): its config, accounts and ports from its work directory."""
        cell = self.cells[index]
        return BrokerProcess(cell.broker_dir, host=cell.host, port=cell.port)

    def add_devices(self, devices: Iterable[str], brokers: Optional[List[BrokerProcess]] = None) -> None:
        """Create each device's account on its cell (on the running `brokers` if given) and its .pw file."""
        devices = [check_device_id(d) for d in devices]
        own = brokers is None
        targets = brokers if brokers is not None else [self.broker(i) for i in range(len(self.cells))]
        (self.directory / "devices").mkdir(exist_ok=True)
        for index, broker in enumerate(targets):
            mine = [d for d in devices if self.cell_of(d) == index]
            if not mine:
                continue
            broker.add_users(mine)
            if own:
                broker.write_accounts()
            for device in mine:
                dynsec.write_private(self.password_file(device), broker.credentials(device).password + "\n")

    @classmethod
    def load(cls, directory: Path) -> CellsPlan:
        directory = Path(directory)
        manifest = directory / MANIFEST
        try:
            data = json.loads(manifest.read_text())
        except FileNotFoundError:
            raise PlanError(f"{manifest} not found: write a plan first (`edgecascade cells plan`)") from None
        except ValueError as exc:
            raise PlanError(f"{manifest}: {exc}") from None
        if not isinstance(data, dict) or data.get("version") != VERSION:
            raise PlanError(f"{manifest} is not a version-{VERSION} cells plan")
        try:
            cells = tuple(
                Cell(i, c["host"], int(c["port"]), directory / c["dir"]) for i, c in enumerate(data["cells"])
            )
            return cls(
                directory,
                data["host"],
                int(data["port"]),
                cells,
                int(data["workers_per_cell"]),
                str(data["db"]),
                str(data["models"]),
                data.get("namespace"),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise PlanError(f"{manifest}: missing or bad field ({exc})") from None


def _toml(section: str, values: Dict[str, Any]) -> str:
    """A flat TOML table of strings and numbers (all these files need; no TOML writer in the stdlib)."""
    lines = [f"[{section}]"]
    for key, value in values.items():
        lines.append(f"{key} = {json.dumps(value) if isinstance(value, str) else value}")
    return "\n".join(lines) + "\n"


def write_plan(
    directory: Path,
    *,
    cells: int = 3,
    host: str = "127.0.0.1",
    port: int = 11883,
    workers_per_cell: int = 1,
    db: str = "results/cells.db",
    models: str = "models/fashion-mnist",
    namespace: Optional[str] = None,
    devices: Iterable[str] = (),
    cell_host: Optional[str] = None,
) -> CellsPlan:
    """Write a plan of `cells` cells into `directory` (which must not hold one yet). HAProxy on host:port,
    cell i's Mosquitto on `cell_host` (default `host`) port + 1 + i."""
    directory = Path(directory)
    if cells < 1:
        raise PlanError(f"--cells must be >= 1, got {cells}")
    if workers_per_cell < 0:
        raise PlanError(f"--workers-per-cell must be >= 0, got {workers_per_cell}")
    if not (port > 0 and port + cells < 65536):
        raise PlanError(f"--port {port}: ports {port}..{port + cells} must lie in 1..65535")
    if namespace is not None:
        check_name(namespace, "namespace")
    if (directory / MANIFEST).exists():
        raise PlanError(
            f"{directory / MANIFEST} exists: a new plan would change every password and cell; "
            "plan into another directory (or delete this one)"
        )
    directory.mkdir(parents=True, exist_ok=True)
    cell_host = cell_host or host
    db_value = db if "://" in db else str(Path(db).resolve())
    models_value = str(Path(models).resolve())
    plan = CellsPlan(
        directory,
        host,
        port,
        tuple(Cell(i, cell_host, port + 1 + i, directory / cell_name(i)) for i in range(cells)),
        workers_per_cell,
        db_value,
        models_value,
        namespace,
    )
    for cell in plan.cells:
        _write_cell(plan, cell)
    plan.haproxy_cfg.write_text(
        haproxy_config([Upstream(c.name, c.host, c.port) for c in plan.cells], host=host, port=port)
    )
    plan.add_devices(devices)
    manifest = {
        "version": VERSION,
        "host": host,
        "port": port,
        "workers_per_cell": workers_per_cell,
        "db": db_value,
        "models": models_value,
        "namespace": namespace,
        "cells": [{"host": c.host, "port": c.port, "dir": c.directory.name} for c in plan.cells],
    }
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    if _has_haproxy():
        check_config(plan.haproxy_cfg)
    return plan


def _has_haproxy() -> bool:
    try:
        find_haproxy()
    except RuntimeError:
        return False
    return True


def _write_cell(plan: CellsPlan, cell: Cell) -> None:
    cell.directory.mkdir(parents=True, exist_ok=True)
    broker = plan.broker(cell.index)  # writes mosquitto.conf and credentials.json
    broker.write_accounts()
    address = f"{cell.host}:{cell.port}"
    namespace = {"namespace": plan.namespace} if plan.namespace else {}
    for service in ("cloud", "collector"):
        dynsec.write_private(cell.directory / f"{service}.pw", broker.credentials(service).password + "\n")
    for w in range(plan.workers_per_cell):
        toml_file = cell.directory / f"cloud-{w}.toml"
        toml_file.write_text(
            f"# cloud worker {w} of {cell.name}: `edgecascade cloud --config {toml_file}`\n"
            + _toml(
                "cloud",
                {
                    "broker": address,
                    "user": "cloud",
                    "password_file": str((cell.directory / "cloud.pw").resolve()),
                    "models": plan.models,
                    "worker_id": f"c{cell.index}-w{w}",
                    "threads": 1,
                    **namespace,
                },
            )
        )
    (cell.directory / "collect.toml").write_text(
        f"# {cell.name}'s collector: every cell's writes the same database\n"
        + _toml(
            "collect",
            {
                "broker": address,
                "user": "collector",
                "password_file": str((cell.directory / "collector.pw").resolve()),
                "db": plan.db,
                **namespace,
            },
        )
    )


def default_devices(count: int, prefix: str = "dev") -> List[str]:
    """`count` device ids: dev-000, dev-001, ..."""
    width = max(3, len(str(count - 1)))
    return [check_device_id(f"{prefix}-{i:0{width}d}") for i in range(count)]
