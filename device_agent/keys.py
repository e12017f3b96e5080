"""The names a device gives things, defined once: run ids, outbox keys, correlation ids, per-run state.

Offload and run-level entries are keyed `<kind>/<run_id>/<device_id>/<number>`, result batches
`batch/<number>`, with numbers from `durable.Counter`, so a key is unique for good (a record's own key, the
collector's unique key, is the same run/device/number triple). Per-run state is named
`<what>/<run_id>[/...]`; run ids hold no '/' (`protocol.ids`), so a run's state is found by prefix.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

RUN_STATE = ("seq/sample", "seq/window", "seq/start", "count/records")  # per-run rows besides pass state


def new_run_id(device_id: str) -> str:
    """`<device>-<local time>-<6 hex>`: sortable by eye, unique without coordination."""
    return f"{device_id}-{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:6]}"


def entry_key(kind: str, run_id: str, device_id: str, number: Any) -> str:
    """The outbox key of a record or offload (`inference`, `frame`, `energy_window`, `offload`, `run`...)."""
    return f"{kind}/{run_id}/{device_id}/{number}"


def correlation(run_id: str, seq: int) -> bytes:
    """The MQTT CorrelationData of an offload: a reply names the sample it answers."""
    return f"{run_id}/{seq}".encode()


def run_state(what: str, run_id: str) -> str:
    """The state row of one per-run thing (`seq/sample`, `count/records`...)."""
    return f"{what}/{run_id}"


def source_stream(run_id: str, source: str) -> str:
    """The progress stream of a replayable source within a run (a dataset pass)."""
    return f"{run_id}/{source}"
