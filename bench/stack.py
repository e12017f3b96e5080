"""The benchmark's cloud side, started once per benchmark: broker, collector, cloud workers, the HTTP peer,
and optionally an emulated link (`bench.link`) that the device side reaches them through.

`bench.run` (every policy) and `bench.link_bench` (transports over link profiles) both stand on it, so the
two measure the same services started the same way.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, Optional, Tuple

from rich.console import Console

from bench.services import ServiceGroup
from broker.launcher import BrokerProcess, find_free_port
from protocol.mqtt import BrokerAddress

DEVICE_ID = "bench-device"
HTTP_DEVICE_ID = "bench-http-peer"


class Broker:
    """Our own Mosquitto with the project's config, or an existing one with given credentials."""

    def __init__(self, cfg: Any, workdir: Path) -> None:
        self._proc: Optional[BrokerProcess] = None
        self._creds: Dict[str, str] = {}
        if cfg.broker:
            if not cfg.credentials:
                raise ValueError("--broker needs --credentials (the JSON `edgecascade broker` writes)")
            info = json.loads(cfg.credentials.read_text())
            self.host, port = cfg.broker.rsplit(":", 1)
            self.port = int(port)
            self._creds = info["passwords"]
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            self._proc = BrokerProcess(workdir).start()
            self._proc.add_users([DEVICE_ID, HTTP_DEVICE_ID])
            self.host, self.port = self._proc.host, self._proc.port

    def address(self, user: str) -> BrokerAddress:
        if self._proc is not None:
            return self._proc.credentials(user)
        if user not in self._creds:
            raise ValueError(f"the credentials file has no password for {user!r}")
        return BrokerAddress(self.host, self.port, user, self._creds[user])

    def close(self) -> None:
        if self._proc is not None:
            self._proc.close()


@dataclass
class CloudSide:
    """What a benchmark's device side talks to; addresses go through the link when there is one."""

    broker: Broker
    services: ServiceGroup
    http_port: int
    link: Optional[Any] = None  # bench.link.EmulatedLink

    def device_address(self, user: str = DEVICE_ID) -> BrokerAddress:
        address = self.broker.address(user)
        if self.link is None:
            return address
        host, port = self.link.address("mqtt")
        return BrokerAddress(host, port, address.username, address.password)

    def http_address(self) -> Tuple[str, int]:
        return ("127.0.0.1", self.http_port) if self.link is None else self.link.address("http")


@contextlib.contextmanager
def cloud_side(
    cfg: Any, db: Path, bench_id: str, cloud: Dict[str, Any], console: Console
) -> Iterator[CloudSide]:
    """Start everything the device side needs (`cfg` a `bench.run.BenchConfig`), stop it all on exit."""
    with contextlib.ExitStack() as stack:
        broker = Broker(cfg, cfg.results / "broker")
        stack.callback(broker.close)
        services = ServiceGroup(cfg.results / "logs")
        stack.callback(services.close)
        providers = cloud.get("providers", ["CPUExecutionProvider"])
        threads = ["--threads", str(cloud["threads"])] if cloud.get("threads") else []
        with console.status("starting collector, cloud workers and the HTTP peer"):
            services.start_collector(broker.address("collector"), db)
            for i in range(int(cloud.get("workers", 1))):
                services.start_cloud(
                    f"cloud-{i}",
                    broker.address("cloud"),
                    cfg.models,
                    f"{bench_id}-w{i}",
                    [
                        "--max-batch", str(cloud.get("max_batch", 32)),
                        "--max-wait-ms", str(cloud.get("max_wait_ms", 2.0)),
                        "--providers", *providers,
                        "--meters", *cloud.get("backends", ["estimate"]),
                        *threads,
                        # what it answered, for `edgecascade adapt` (bench/adapt_bench.py)
                        *(["--keep-inputs", str(cloud["keep_inputs"])] if cloud.get("keep_inputs") else []),
                    ],
                )  # fmt: skip
            http_port = find_free_port()
            if cfg.http_peer:
                # the same onnxruntime settings as the cloud workers above: like for like
                args = ["--models", str(cfg.models), "--port", str(http_port), "--providers", *providers]
                services.start("http-peer", [*args, *threads], module="bench.http_baseline")
        side = CloudSide(broker, services, http_port)
        if cfg.link:
            from bench.link import EmulatedLink, load_link_profile

            targets = {"mqtt": (broker.host, broker.port), "http": ("127.0.0.1", http_port)}
            side.link = stack.enter_context(EmulatedLink(load_link_profile(cfg.link), targets))
            console.print(f"link: {side.link.describe()}")
        yield side
