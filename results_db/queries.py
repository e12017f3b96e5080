"""Ten questions users ask of the results, as SQL that SQLite and PostgreSQL both run.

Each query reads the tables or the views the migration creates (`inference_facts`, `run_summary`,
`class_accuracy`, `pareto_points`). Where the two dialects need different SQL (only to bucket timestamps by
hour) a query carries a PostgreSQL variant. Run one with `run_query(engine, name, **params)` or
`edgecascade report --db ... --query NAME`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Union

from sqlalchemy import Connection, Engine, text

FRACTION = "fraction, 0-1"
UNIX_S = "s since 1970 (UTC)"


@dataclass(frozen=True)
class Query:
    """A named query: the question it answers, its SQL, default values of its :parameters, and the unit of
    each result column that has one (what `edgecascade report --serve` shows beside the query)."""

    name: str
    question: str
    sql: str
    sql_postgresql: Optional[str] = None
    params: Mapping[str, Any] = field(default_factory=dict)
    units: Mapping[str, str] = field(default_factory=dict)

    def sql_for(self, dialect: str) -> str:
        return self.sql_postgresql if dialect == "postgresql" and self.sql_postgresql else self.sql


_HOURLY = """
SELECT device_id,
       {hour} AS hour_utc,
       COUNT(*) AS samples,
       SUM(CASE WHEN exit_stage IN ('cloud', 'fallback', 'gateway') THEN 1 ELSE 0 END) AS offloaded,
       CAST(SUM(CASE WHEN exit_stage IN ('cloud', 'fallback', 'gateway') THEN 1 ELSE 0 END)
            AS DOUBLE PRECISION) / COUNT(*) AS offload_fraction
FROM inferences
GROUP BY device_id, hour_utc
ORDER BY device_id, hour_utc
"""

QUERIES: Dict[str, Query] = {
    q.name: q
    for q in [
        Query(
            "energy-per-correct",
            "How many joules does each policy spend per *correct* answer?",
            """
SELECT policy,
       COUNT(*) AS samples,
       SUM(correct) AS correct,
       SUM(device_j_gross) / NULLIF(SUM(correct), 0) AS device_j_per_correct,
       (SUM(device_j_gross) + COALESCE(SUM(cloud_j), 0)) / NULLIF(SUM(correct), 0) AS total_j_per_correct
FROM inference_facts
WHERE label IS NOT NULL AND device_j_gross IS NOT NULL
GROUP BY policy
ORDER BY device_j_per_correct
""",
            units={"device_j_per_correct": "J", "total_j_per_correct": "J"},
        ),
        Query(
            "classes-offloaded-most",
            "Which classes go to the cloud most often?",
            """
SELECT label,
       COUNT(*) AS samples,
       SUM(offloaded) AS offloaded,
       CAST(SUM(offloaded) AS DOUBLE PRECISION) / COUNT(*) AS offload_fraction
FROM inference_facts
WHERE label IS NOT NULL
GROUP BY label
ORDER BY offload_fraction DESC, label
""",
            units={"offload_fraction": FRACTION},
        ),
        Query(
            "offload-per-device-hour",
            "What fraction of each device's samples was offloaded, hour by hour (UTC)?",
            _HOURLY.format(hour="strftime('%Y-%m-%d %H:00', ts_unix, 'unixepoch')"),
            sql_postgresql=_HOURLY.format(
                hour="to_char(to_timestamp(ts_unix) AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:00')"
            ),
            units={"hour_utc": "hour, UTC", "offload_fraction": FRACTION},
        ),
        Query(
            "runs-with-fallback",
            "In which runs did the cloud miss its deadline (the edge answer was used instead)?",
            """
SELECT run_id, policy, device_id, samples, exit_fallback AS fallbacks, frac_fallback AS fallback_fraction,
       exit_shed AS shed
FROM run_summary
WHERE exit_fallback > 0
ORDER BY fallbacks DESC, run_id
""",
            units={"fallback_fraction": FRACTION},
        ),
        Query(
            "accuracy-by-exit-stage",
            "How accurate is each exit stage (main, extension, cloud, fallback, shed) under each policy?",
            """
SELECT policy,
       exit_stage,
       COUNT(*) AS samples,
       CAST(SUM(correct) AS DOUBLE PRECISION) / COUNT(*) AS accuracy
FROM inference_facts
WHERE label IS NOT NULL
GROUP BY policy, exit_stage
ORDER BY policy, exit_stage
""",
            units={"accuracy": FRACTION},
        ),
        Query(
            "latency-by-policy",
            "What are the p50 and p99 latencies of each policy over all its runs (nearest rank)?",
            """
WITH ranked AS (
    SELECT policy, latency_ms,
           ROW_NUMBER() OVER (PARTITION BY policy ORDER BY latency_ms) AS rn,
           COUNT(*) OVER (PARTITION BY policy) AS n
    FROM inference_facts
)
SELECT policy,
       MAX(n) AS samples,
       MAX(CASE WHEN rn = (50 * n + 99) / 100 THEN latency_ms END) AS latency_p50_ms,
       MAX(CASE WHEN rn = (99 * n + 99) / 100 THEN latency_ms END) AS latency_p99_ms
FROM ranked
GROUP BY policy
ORDER BY latency_p99_ms
""",
            units={"latency_p50_ms": "ms", "latency_p99_ms": "ms"},
        ),
        Query(
            "bytes-per-inference",
            "How many bytes does each policy move per inference (up to the cloud, down from it)?",
            """
SELECT policy,
       COUNT(*) AS samples,
       AVG(CAST(bytes_up AS DOUBLE PRECISION)) AS bytes_up_per_inference,
       AVG(CAST(bytes_down AS DOUBLE PRECISION)) AS bytes_down_per_inference,
       AVG(CAST(bytes_total AS DOUBLE PRECISION)) AS bytes_per_inference
FROM inference_facts
GROUP BY policy
ORDER BY bytes_per_inference
""",
            units={
                "bytes_up_per_inference": "bytes",
                "bytes_down_per_inference": "bytes",
                "bytes_per_inference": "bytes",
            },
        ),
        Query(
            "cloud-joules-per-offload",
            "How many cloud joules and milliseconds does one answered offload cost, per policy?",
            """
SELECT policy,
       COUNT(*) AS cloud_answers,
       COUNT(cloud_j) AS metered,
       AVG(cloud_j) AS cloud_j_per_offload,
       AVG(cloud_ms) AS cloud_ms_mean
FROM inference_facts
WHERE exit_stage = 'cloud'
GROUP BY policy
ORDER BY policy
""",
            units={"cloud_j_per_offload": "J", "cloud_ms_mean": "ms"},
        ),
        Query(
            "devices-by-energy",
            "Which devices spent the most energy, and how much per inference?",
            """
SELECT device_id,
       COUNT(*) AS samples,
       SUM(device_j_gross) AS device_j_gross_total,
       AVG(device_j_gross) AS device_j_gross_per_inference,
       AVG(device_j_net) AS device_j_net_per_inference,
       CASE WHEN COUNT(DISTINCT energy_source) = 1 THEN MIN(energy_source) ELSE 'mixed' END AS energy_source
FROM inferences
GROUP BY device_id
ORDER BY CASE WHEN SUM(device_j_gross) IS NULL THEN 1 ELSE 0 END, device_j_gross_total DESC, device_id
""",
            units={
                "device_j_gross_total": "J",
                "device_j_gross_per_inference": "J",
                "device_j_net_per_inference": "J",
            },
        ),
        Query(
            "runs-of-model",
            "Which runs used a given model (by card sha256 or a prefix of it), and how did they do?",
            """
SELECT run_id, policy, device_id, dataset, split, samples, accuracy,
       device_j_gross_per_inference, offload_fraction, latency_p99_ms, started_unix
FROM run_summary
WHERE model_sha256 LIKE :model_sha256 || '%'
ORDER BY started_unix, run_id
""",
            params={"model_sha256": ""},
            units={
                "accuracy": FRACTION,
                "device_j_gross_per_inference": "J",
                "offload_fraction": FRACTION,
                "latency_p99_ms": "ms",
                "started_unix": UNIX_S,
            },
        ),
    ]
}


def run_query(
    bind: Union[Engine, Connection], name: str, **params: Any
) -> tuple[List[str], List[Dict[str, Any]]]:
    """Run query `name`; return (column names, rows as dicts). Unknown names raise KeyError."""
    query = QUERIES[name]
    values = {**query.params, **params}
    unknown = set(params) - set(query.params)
    if unknown:
        raise ValueError(
            f"query {name!r} takes {sorted(query.params) or 'no'} parameters, not {sorted(unknown)}"
        )
    statement = text(query.sql_for(bind.dialect.name))
    if isinstance(bind, Engine):
        with bind.connect() as connection:
            result = connection.execute(statement, values)
            columns = list(result.keys())
            return columns, [dict(zip(columns, row)) for row in result]
    result = bind.execute(statement, values)
    columns = list(result.keys())
    return columns, [dict(zip(columns, row)) for row in result]
