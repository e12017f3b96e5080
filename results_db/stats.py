"""The one percentile definition of edgecascade: nearest rank.

The p-th percentile of n values is the value at rank ceil(p * n / 100) in ascending order (integer
arithmetic, `(p * n + 99) // 100`): always a measured value, never an interpolation, so the SQL views
(results_db/migrations: `_pct`), SQLite, PostgreSQL, the report and the benchmarks all give the same number
(tests/test_results_db_views.py holds the views to this function).
"""

from __future__ import annotations

from typing import Dict, Iterable, Sequence


def nearest_rank(values: Iterable[float], p: int) -> float:
    """The p-th percentile (0 < p <= 100, an integer) of `values` by nearest rank."""
    ordered = sorted(values)
    if not ordered:
        raise ValueError("no values to take a percentile of")
    if not (isinstance(p, int) and 0 < p <= 100):
        raise ValueError(f"p must be an integer in (0, 100], got {p!r}")
    return ordered[(p * len(ordered) + 99) // 100 - 1]


def percentiles(values: Sequence[float], ps: Sequence[int] = (50, 90, 99)) -> Dict[str, float]:
    """{"p50": ..., "p90": ..., "p99": ..., "max": ...} by nearest rank."""
    out = {f"p{p}": float(nearest_rank(values, p)) for p in ps}
    out["max"] = float(max(values))
    return out
