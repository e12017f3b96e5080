"""Which of the onnxruntime execution providers asked for this host has: the one rule every session uses.

Asking for a provider the host lacks (`CUDAExecutionProvider` without CUDA) must not quietly run on the CPU:
onnxruntime would fall back with no more than a log line, and every latency and energy figure measured after
it would be the CPU's. Here in `video` (a leaf library, importable from the device and the cloud side alike)
so that the device cascade, the video detectors and the cloud worker's model share it.
"""

from __future__ import annotations

import logging
from typing import Iterable, List, Optional, Sequence

logger = logging.getLogger(__name__)

DEFAULT_PROVIDERS = ("CPUExecutionProvider",)


def usable_providers(requested: Optional[Sequence[str]], available: Iterable[str]) -> List[str]:
    """The `requested` providers (default: the CPU) that are `available` (onnxruntime's
    `get_available_providers()`), in the order asked. ValueError when none is; a warning for each skipped."""
    wanted = list(requested or DEFAULT_PROVIDERS)
    have = set(available)
    usable = [p for p in wanted if p in have]
    if not usable:
        raise ValueError(f"none of the providers {wanted} is available (have {sorted(have)})")
    if len(usable) < len(wanted):
        logger.warning("skipping unavailable providers %s", [p for p in wanted if p not in have])
    return usable
