"""Cloud worker: consumes offloads from the shared subscription, micro-batches them through the cloud model
on onnxruntime, and answers each device on its ResponseTopic with its CorrelationData."""

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
