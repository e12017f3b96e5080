"""A cloud worker's load, as it publishes it (retained) for devices to decide whether to offload.

Topic: `Topics.cloud_load(worker_id)` (`<root>/@cloud/<worker_id>/load`; `@` cannot be in a device id, so no
device owns it). Retained, QoS 1, with a message expiry, and cleared by the worker's will (an empty retained
payload) when it dies: a device never plans on a worker that is gone. JSON, because it is tiny and read by
people too (`mosquitto_sub -t 'edgecascade/v1/@cloud/+/load' -v`).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any, Dict

from protocol.codec import ProtocolError

LOAD_VERSION = 1
CONTENT_TYPE_LOAD = "application/vnd.edgecascade.load+json;v=1"


@dataclass(frozen=True)
class WorkerLoad:
    """What one worker can take. Rates are per second of wall time; times are milliseconds."""

    worker_id: str
    ts_unix: float  # when it was measured
    queue: int  # offloads received and not yet computed
    service_ms: float  # recent compute time per sample (a batch's time over its size)
    capacity_per_s: float  # samples per second it can compute at its recent batch sizes
    busy: float  # fraction of the last interval spent computing, 0..1
    answered_total: int = 0

    def wait_ms(self) -> float:
        """How long a sample sent now would wait in this worker before its batch runs."""
        return 1000.0 * self.queue / self.capacity_per_s if self.capacity_per_s > 0 else math.inf


def encode_load(load: WorkerLoad) -> bytes:
    return json.dumps({"v": LOAD_VERSION, **asdict(load)}, separators=(",", ":")).encode()


def decode_load(payload: bytes) -> WorkerLoad:
    """Strict: a ProtocolError for anything but a version-1 load with finite, non-negative figures."""
    try:
        data: Dict[str, Any] = json.loads(payload)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"load is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("v") != LOAD_VERSION:
        raise ProtocolError(f"load version is not {LOAD_VERSION}")
    try:
        load = WorkerLoad(
            worker_id=str(data["worker_id"]),
            ts_unix=float(data["ts_unix"]),
            queue=int(data["queue"]),
            service_ms=float(data["service_ms"]),
            capacity_per_s=float(data["capacity_per_s"]),
            busy=float(data["busy"]),
            answered_total=int(data.get("answered_total", 0)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ProtocolError(f"load field missing or of the wrong type: {exc}") from None
    numbers = (load.ts_unix, load.queue, load.service_ms, load.capacity_per_s, load.busy)
    if not all(math.isfinite(x) and x >= 0 for x in numbers) or load.busy > 1.0:
        raise ProtocolError(f"load figures out of range: {load}")
    return load
