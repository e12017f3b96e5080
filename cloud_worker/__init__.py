"""Cloud worker: consumes offloads from the shared subscription, micro-batches them through the cloud model
on onnxruntime, and answers each device on its ResponseTopic with its CorrelationData.

    worker      CloudWorker: the MQTT consumer, bounded fair queue, reply publishing
    config      WorkerConfig (frozen); cli: `edgecascade cloud`
    requests    one offload, checked in full before it may join a batch
    batching    dynamic micro-batching (max_batch, max_wait_s)
    tasks       what a batch computes: Classify (logits) or Detect (REACT boxes), and each reply
    model       the cloud model's onnxruntime session
    energy      optional joules per batch via `metering`; probe: a minimal requester for checks
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cloud_worker.config import WorkerConfig
    from cloud_worker.worker import CloudWorker

__all__ = ["CloudWorker", "WorkerConfig"]


def __getattr__(name: str) -> Any:
    # Lazy, so that `edgecascade --help` (which imports cloud_worker.cli) does not load numpy and paho.
    if name in __all__:
        from cloud_worker import worker

        return getattr(worker, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
