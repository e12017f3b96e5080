"""Which dataset items a run's rows are: the loss accounting of the chaos matrix and the fleet simulation.

The unique key (run, device, seq) guarantees one row per sequence number, but a sample processed twice gets
two sequence numbers, and a lost one leaves no trace at all: counting rows can hide both. So a row is matched
to its dataset item by content: its label and its main block's confidence (`p_main`, which the edge computes
the same way every time, to far more digits than compared here). A dataset item with no row is lost, one with
two rows is a duplicate. Policies that run nothing on the device (cloud-only) have no `p_main`: there the
label alone is compared, which still catches losses and duplicates, not swaps between items of a class.
"""

from __future__ import annotations

import collections
from pathlib import Path
from typing import Counter, Iterable, Optional, Tuple

Identity = Tuple[int, Optional[float]]


def _key(p: Optional[float]) -> Optional[float]:
    return None if p is None else round(float(p), 5)


def identities(models: Path, samples: int, with_confidence: bool = True) -> Counter[Identity]:
    """(label, p_main) of the first `samples` Fashion-MNIST test items, as the agent records them."""
    from device_agent.cascade import EdgeCascade
    from device_agent.sources import load_idx_dataset

    images, labels = load_idx_dataset("fashion-mnist", "test", samples)
    if not with_confidence:
        return collections.Counter((int(y), None) for y in labels)
    probs = EdgeCascade(models).run_main(images).probs
    return collections.Counter((int(y), _key(float(p.max()))) for y, p in zip(labels, probs))


def compare(expected: Counter[Identity], rows: Iterable[Tuple[int, Optional[float]]]) -> Tuple[int, int]:
    """(lost, duplicates) of `rows` (label, p_main) against the expected items."""
    stored = collections.Counter((int(label), _key(p)) for label, p in rows)
    return sum((expected - stored).values()), sum((stored - expected).values())
