"""Daily partitions of `inferences` on PostgreSQL (migration 0008): created ahead by the writer, dropped whole
by retention (`edgecascade db retention`).

`inferences` is partitioned by RANGE (ts_unix), one partition per UTC day named `inferences_pYYYYMMDD`, plus
`inferences_default` for rows of days that have none (a direct INSERT, a device clock in 1970 or 2099). The
writer makes sure, before each transaction, that the days of its rows within a year back and a day ahead
(and today and tomorrow) have their partitions (`PartitionKeeper.ensure`): in a transaction of its own,
because CREATE ... PARTITION OF locks the parent against the writer's own open transaction. A day whose rows
already sit in the default partition is created by moving them (`create_day`). Two collectors creating
the same day race harmlessly: IF NOT EXISTS, and the loser's error is retried after reading the catalog.

Retention drops the day partitions wholly before the cutoff and deletes the default partition's old rows.
SQLite has no partitions: there `retention` deletes the old rows (`drop_older_than`).
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Iterable, List, Set

from sqlalchemy import Connection, Engine, text
from sqlalchemy.exc import SQLAlchemyError

logger = logging.getLogger(__name__)

TABLE = "inferences"
DEFAULT = f"{TABLE}_default"
DAY_S = 86_400
PREFIX = f"{TABLE}_p"
# Days the writer makes partitions for, around today; rows of other days go to the default partition, so
# that a device with a wrong clock cannot make the writer create a partition per bogus day.
BACK_DAYS, AHEAD_DAYS = 366, 1


def day_of(ts_unix: float) -> int:
    """The UTC day number (days since 1970-01-01) a timestamp falls in."""
    return int(ts_unix // DAY_S)


def partition_name(day: int) -> str:
    return PREFIX + (dt.datetime(1970, 1, 1) + dt.timedelta(days=day)).strftime("%Y%m%d")


def is_partitioned(connection: Connection) -> bool:
    """Whether `inferences` is a partitioned table here (PostgreSQL at 0008 or later)."""
    if connection.dialect.name != "postgresql":
        return False
    kind = connection.execute(
        text("SELECT c.relkind FROM pg_class c WHERE c.oid = to_regclass(:t)"), {"t": TABLE}
    ).scalar()
    return kind == "p"


@dataclass(frozen=True)
class Partition:
    name: str
    start_unix: float  # inclusive
    end_unix: float  # exclusive


def list_partitions(connection: Connection) -> List[Partition]:
    """The partitions of `inferences`, oldest first (their bounds read from the catalog)."""
    rows = connection.execute(
        text(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
            "JOIN pg_class c ON c.oid = i.inhrelid WHERE i.inhparent = to_regclass(:t)"
        ),
        {"t": TABLE},
    ).all()
    found = []
    for name, bound in rows:
        if bound == "DEFAULT":
            continue
        # "FOR VALUES FROM ('1764720000') TO ('1764806400')"
        low, high = (part.split("'")[1] for part in bound.split(" TO "))
        found.append(Partition(str(name), float(low), float(high)))
    return sorted(found, key=lambda p: p.start_unix)


def create_day(connection: Connection, day: int) -> None:
    """The day's partition, in the caller's transaction; rows of that day in the default partition (which
    PostgreSQL would otherwise refuse the CREATE over) are moved into it."""
    low, high = day * DAY_S, (day + 1) * DAY_S
    create = (
        f"CREATE TABLE IF NOT EXISTS {partition_name(day)} PARTITION OF {TABLE} "
        f"FOR VALUES FROM ({low}) TO ({high})"
    )
    in_day = f"ts_unix >= {low} AND ts_unix < {high}"
    if connection.execute(text(f"SELECT EXISTS (SELECT 1 FROM {DEFAULT} WHERE {in_day})")).scalar():
        connection.execute(text(f"ALTER TABLE {TABLE} DETACH PARTITION {DEFAULT}"))
        connection.execute(text(create))
        connection.execute(text(f"INSERT INTO {TABLE} SELECT * FROM {DEFAULT} WHERE {in_day}"))
        connection.execute(text(f"DELETE FROM {DEFAULT} WHERE {in_day}"))
        connection.execute(text(f"ALTER TABLE {TABLE} ATTACH PARTITION {DEFAULT} DEFAULT"))
    else:
        connection.execute(text(create))


class PartitionKeeper:
    """Knows which days have partitions; creates the missing ones, each in its own short transaction."""

    def __init__(self, engine: Engine, ahead_days: int = 1) -> None:
        self.engine = engine
        self.ahead_days = ahead_days
        self._days: Set[int] = set()

    def _refresh(self) -> None:
        with self.engine.connect() as connection:
            self._days = {day_of(p.start_unix) for p in list_partitions(connection)}

    def ensure(self, timestamps: Iterable[float], now_unix: float) -> List[str]:
        """Partitions for these timestamps' days and for today .. today + ahead_days; the names created."""
        today = day_of(now_unix)
        stamps = list(timestamps)
        # A batch mostly falls within one day: then its first and last day say it, with no call per row.
        low, high = (day_of(min(stamps)), day_of(max(stamps))) if stamps else (today, today)
        days = {low} if low == high else {day_of(ts) for ts in stamps}
        wanted = {d for d in days if today - BACK_DAYS <= d <= today + AHEAD_DAYS}
        wanted |= set(range(today, today + self.ahead_days + 1))
        missing = sorted(wanted - self._days)
        if not missing:
            return []
        self._refresh()  # another collector, or retention, may have changed them
        created = []
        for day in sorted(wanted - self._days):
            try:
                with self.engine.begin() as connection:
                    create_day(connection, day)
            except SQLAlchemyError:  # a concurrent CREATE of the same day won: the catalog says so now
                self._refresh()
                if day not in self._days:
                    raise
                continue
            self._days.add(day)
            created.append(partition_name(day))
        if created:
            logger.info("created partitions %s", ", ".join(created))
        return created

    def forget(self) -> None:
        """After retention dropped some: read the catalog again on the next miss."""
        self._days = set()


@dataclass(frozen=True)
class RetentionResult:
    partitioned: bool
    dropped: List[str]  # partitions dropped (PostgreSQL)
    rows_deleted: int  # rows the dropped partitions held, plus rows deleted (SQLite; the default partition)


def drop_older_than(engine: Engine, cutoff_unix: float, *, dry_run: bool = False) -> RetentionResult:
    """Drop every day partition wholly before `cutoff_unix` and delete the default partition's rows before
    it (PostgreSQL); on SQLite delete the rows before it. A day that straddles the cutoff is kept whole."""
    with engine.begin() as connection:
        if not is_partitioned(connection):
            where = "FROM inferences WHERE ts_unix < :cutoff"
            cutoff = {"cutoff": cutoff_unix}
            count = int(connection.execute(text(f"SELECT COUNT(*) {where}"), cutoff).scalar_one())
            if not dry_run and count:
                connection.execute(text(f"DELETE {where}"), cutoff)
            return RetentionResult(False, [], count)
        old = [p for p in list_partitions(connection) if p.end_unix <= cutoff_unix]
        rows = 0
        for partition in old:
            rows += int(connection.execute(text(f"SELECT COUNT(*) FROM {partition.name}")).scalar_one())
            if not dry_run:
                connection.execute(text(f"DROP TABLE {partition.name}"))
        where, cutoff = f"FROM {DEFAULT} WHERE ts_unix < :cutoff", {"cutoff": cutoff_unix}
        strays = int(connection.execute(text(f"SELECT COUNT(*) {where}"), cutoff).scalar_one())
        if strays and not dry_run:
            connection.execute(text(f"DELETE {where}"), cutoff)
        return RetentionResult(True, [p.name for p in old], rows + strays)
