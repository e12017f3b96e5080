"""`inferences` partitioned by day on PostgreSQL (migration 0008, results_db/partitions.py), and retention
(`edgecascade db retention`), against the private PostgreSQL of the test session and a SQLite file."""

from __future__ import annotations

import json
import time
from typing import Callable, List

import pytest
from alembic import command
from sqlalchemy import Engine, text

from edgecascade.cli import main as edgecascade_main
from results_db import RecordWriter, open_database
from results_db.database import alembic_config
from results_db.db_cli import parse_age
from results_db.partitions import DAY_S, day_of, list_partitions, partition_name
from results_db.synthetic import inference_records, run_record

pytestmark = pytest.mark.integration
NOW = time.time()
TODAY = day_of(NOW)


def _rows(run_id: str, count: int, ts_start: float, start_seq: int = 0) -> List[dict]:
    return inference_records(run_id, "dev-p", count, ts_start=ts_start, start_seq=start_seq)


def _partitions(engine: Engine) -> List[str]:
    with engine.connect() as connection:
        return [p.name for p in list_partitions(connection)]


def _count(engine: Engine, where: str = "TRUE") -> int:
    with engine.connect() as connection:
        return int(connection.execute(text(f"SELECT COUNT(*) FROM inferences WHERE {where}")).scalar())


@pytest.fixture
def pg(pg_url_factory: Callable[[], str]) -> Engine:
    return open_database(pg_url_factory())


def test_migration_moves_existing_rows_into_day_partitions_and_back(
    pg_url_factory: Callable[[], str],
) -> None:
    url = pg_url_factory()
    engine = open_database(url)
    two_days = [run_record("r-old", "dev-p")] + _rows("r-old", 50, (TODAY - 3) * DAY_S + 10, 0)
    two_days += _rows("r-old", 50, (TODAY - 2) * DAY_S + 10, 50)
    RecordWriter(engine).write(two_days)  # today's writer, at head; then back to a plain table at 0007
    cfg = alembic_config()
    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0007")
    with engine.connect() as connection:
        before = connection.execute(text("SELECT * FROM inferences ORDER BY seq")).all()
    assert _partitions(engine) == []
    engine.dispose()

    engine = open_database(url)  # to head: 0008 partitions what is there
    with engine.connect() as connection:
        columns = ", ".join(before[0]._fields)  # 0009 added the gateway's columns (NULL for these rows)
        after = connection.execute(text(f"SELECT {columns} FROM inferences ORDER BY seq")).all()
    assert after == before  # ids too
    assert _partitions(engine) == [partition_name(TODAY - 3), partition_name(TODAY - 2)]
    writer = RecordWriter(engine)
    # New rows after the copied ones take new ids from the same sequence.
    writer.write(_rows("r-old", 1, NOW, 100))
    with engine.connect() as connection:
        ids = [r[0] for r in connection.execute(text("SELECT id FROM inferences ORDER BY id"))]
    assert len(set(ids)) == 101 and ids[-1] > max(r.id for r in before)

    with engine.begin() as connection:
        cfg.attributes["connection"] = connection
        command.downgrade(cfg, "0007")
    with engine.connect() as connection:
        kind = connection.execute(text("SELECT relkind FROM pg_class WHERE oid = 'inferences'::regclass"))
        assert kind.scalar() == "r"
    assert _count(engine) == 101
    engine.dispose()


def test_writer_creates_partitions_ahead_and_keeps_the_natural_key_unique(pg: Engine) -> None:
    writer = RecordWriter(pg)
    batch = [run_record("r-1", "dev-p")] + _rows("r-1", 20, (TODAY - 1) * DAY_S + 5)
    assert writer.write(batch).inserted == 20
    assert _partitions(pg) == [partition_name(d) for d in (TODAY - 1, TODAY, TODAY + 1)]
    again = writer.write(batch)
    assert (again.inserted, again.duplicates, again.refused) == (0, 20, [])
    # The same key with another ts_unix (another day, another partition) is a conflict, not a new row.
    moved = dict(batch[3], ts_unix=NOW)
    counts = writer.write([moved])
    assert counts.inserted == 0 and len(counts.refused) == 1
    assert "ts_unix differs" in counts.refused[0].reason
    # Twice in one batch with different times: the first is stored, the second refused.
    first, second = _rows("r-1", 1, NOW, 500)[0], _rows("r-1", 1, NOW + 60, 500)[0]
    counts = writer.write([first, second])
    assert counts.inserted == 1 and [r.index for r in counts.refused] == [1]
    assert _count(pg) == 21
    pg.dispose()


def test_a_wrong_clock_lands_in_the_default_partition_and_moves_when_its_day_comes(pg: Engine) -> None:
    writer = RecordWriter(pg)
    far = (TODAY + 40) * DAY_S + 100  # beyond the writer's day ahead: no partition is made for it
    writer.write([run_record("r-2", "dev-p")] + _rows("r-2", 5, far) + _rows("r-2", 5, 86_400.0, 5))
    assert partition_name(TODAY + 40) not in _partitions(pg) and len(_partitions(pg)) == 2
    with pg.connect() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM inferences_default")).scalar() == 10
    from results_db.partitions import create_day

    with pg.begin() as connection:  # the day arrives: its rows move out of the default partition
        create_day(connection, TODAY + 40)
    with pg.connect() as connection:
        assert connection.execute(text(f"SELECT COUNT(*) FROM {partition_name(TODAY + 40)}")).scalar() == 5
        assert connection.execute(text("SELECT COUNT(*) FROM inferences_default")).scalar() == 5
    pg.dispose()


def test_retention_drops_whole_old_days(pg_url_factory: Callable[[], str], capsys) -> None:
    url = pg_url_factory()
    engine = open_database(url)
    writer = RecordWriter(engine)
    writer.write([run_record("r-3", "dev-p")] + _rows("r-3", 30, (TODAY - 40) * DAY_S))
    writer.write(_rows("r-3", 30, (TODAY - 10) * DAY_S, 30) + _rows("r-3", 5, 0.0, 60))  # 1970: default
    writer.write(_rows("r-3", 30, NOW - 60, 100))
    old = partition_name(TODAY - 40)

    assert edgecascade_main(["db", "retention", "--older-than", "30d", "--db", url, "--dry-run"]) == 0
    dry = json.loads(capsys.readouterr().out)
    assert (dry["dropped_partitions"], dry["rows"], dry["dry_run"]) == ([old], 35, True)
    assert _count(engine) == 95

    assert edgecascade_main(["db", "retention", "--older-than", "30d", "--db", url]) == 0
    done = json.loads(capsys.readouterr().out)
    assert done["partitioned"] and done["dropped_partitions"] == [old] and done["rows"] == 35
    assert old not in _partitions(engine)
    assert _count(engine) == 60 and _count(engine, f"ts_unix < {NOW - 30 * DAY_S}") == 0
    # The writer learns of the drop: rows of that day again make the partition again.
    RecordWriter(engine).write(_rows("r-3", 1, (TODAY - 40) * DAY_S, 200))
    assert old in _partitions(engine)
    engine.dispose()


def test_retention_on_sqlite_deletes_the_old_rows(tmp_path, capsys) -> None:
    db = str(tmp_path / "r.db")
    engine = open_database(db)
    RecordWriter(engine).write(
        [run_record("r-4", "dev-p")] + _rows("r-4", 10, NOW - 40 * DAY_S) + _rows("r-4", 10, NOW, 10)
    )
    assert edgecascade_main(["db", "retention", "--older-than", "30d", "--db", db]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["partitioned"], result["rows"]) == (False, 10)
    assert _count(engine) == 10
    engine.dispose()


def test_ages_and_a_bad_age(capsys) -> None:
    assert parse_age("30d") == 30 * DAY_S and parse_age("12h") == 43_200 and parse_age("90s") == 90
    assert edgecascade_main(["db", "retention", "--older-than", "a month"]) == 2
    assert "age must be a number with s, m, h or d" in capsys.readouterr().err
