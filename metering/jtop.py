"""Jetson rails through jetson-stats (jtop), when its service socket is reachable.

jtop's `power` is ``{"rail": {name: {"power": mW, "avg": mW, ...}}, "tot": {"power": mW, "name": ...}}``.
When the board has an input rail (`VDD_IN`, `POM_5V_IN`), jtop moves it out of `rail` into `tot` (with its
name), so it is put back here; the total then follows `metering.jetson.total_rails`, as for the other
Jetson backends.

`jtop` is imported only when this backend is opened: a device without jetson-stats never needs it.
"""

from __future__ import annotations

import logging
import os
import stat
import threading
from typing import Any, Callable, Dict, Optional, Sequence

from metering.common import MeterUnavailable, SampledPowerMeter
from metering.jetson import is_unconnected, total_rails

logger = logging.getLogger(__name__)

DEFAULT_SOCKET = "/run/jtop.sock"  # jtop.service's socket (jtop/service.py JTOP_PIPE)
DEFAULT_INTERVAL_S = 0.1
ClientFactory = Callable[[float], Any]


def rails_w(power: Dict[str, Any]) -> Dict[str, float]:
    """Watts per rail from jtop's `power` dict (mW), the input rail put back from `tot`."""
    watts = {}
    for name, values in (power.get("rail") or {}).items():
        if not is_unconnected(name) and values.get("online", True):
            watts[name] = float(values["power"]) / 1000.0
    tot = power.get("tot") or {}
    if tot.get("name"):
        watts[str(tot["name"])] = float(tot["power"]) / 1000.0
    return watts


def _default_client_factory(interval_s: float) -> Any:
    try:
        from jtop import jtop  # lazy: jetson-stats is optional
    except ImportError as err:
        raise MeterUnavailable(f"jetson-stats is not installed (pip install jetson-stats): {err}") from err
    return jtop(interval=interval_s)


def _check_socket(path: str) -> None:
    try:
        mode = os.stat(path).st_mode
    except OSError as err:
        raise MeterUnavailable(
            f"jtop service socket {path} not found ({err.strerror}): run `sudo jtop --install-service`"
        ) from err
    if not stat.S_ISSOCK(mode):
        raise MeterUnavailable(f"{path} exists but is not a socket")


class JtopMeter(SampledPowerMeter):
    """Rails sampled from a jtop client in a thread (each `ok()` returns when jtop has fresh data)."""

    source = "jtop"

    def __init__(
        self,
        *,
        socket_path: str = DEFAULT_SOCKET,
        interval_s: float = DEFAULT_INTERVAL_S,
        total: Optional[Sequence[str]] = None,
        client_factory: Optional[ClientFactory] = None,
        **kwargs: Any,
    ) -> None:
        _check_socket(socket_path)
        factory = client_factory or _default_client_factory
        client = factory(interval_s)
        try:
            client.start()
        except MeterUnavailable:
            raise
        except Exception as err:  # JtopException, ConnectionRefusedError, PermissionError...: translate once
            raise MeterUnavailable(f"jtop client could not connect: {type(err).__name__}: {err}") from err
        try:
            if not client.ok():
                raise MeterUnavailable("jtop client stopped before its first sample")
            first = rails_w(client.power)
            if not first:
                raise MeterUnavailable("jtop reports no power rails on this board")
            names = sorted(first)
            super().__init__(
                interval_s=interval_s,
                rails=names,
                total_rails=total_rails(names, total),
                detail={"socket": socket_path, "interval_s": interval_s},
                **kwargs,
            )
        except BaseException:
            client.close()
            raise
        self._client = client
        self._running = True
        self._ingest(self.clock(), first)
        self._thread = threading.Thread(target=self._loop, name="jtop-sampler", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        try:
            while self._running and self._client.ok():
                if not self._running:
                    break
                self._ingest(self.clock(), rails_w(self._client.power))
        except Exception as err:  # whatever jtop raises, read() reports it
            self._fail(f"jtop client failed: {type(err).__name__}: {err}")
            return
        if self._running:
            self._fail("jtop client stopped")

    def close(self) -> None:
        if not self._running:
            return
        self._running = False
        try:  # first the client, which also releases a sampler blocked in ok()
            self._client.close()
        except Exception as err:  # closing must not raise out of shutdown paths
            logger.debug("jtop close: %s", err)
        self._thread.join(timeout=5 * self.interval_s + 1.0)


def open_jtop(options: Dict[str, Any], **kwargs: Any) -> JtopMeter:
    """Factory for `open_meter`: options `jtop_socket`, `jtop_interval_s`, `jetson_total_rails`."""
    return JtopMeter(
        socket_path=str(options.get("jtop_socket", DEFAULT_SOCKET)),
        interval_s=float(options.get("jtop_interval_s", DEFAULT_INTERVAL_S)),
        total=options.get("jetson_total_rails"),
        **kwargs,
    )
