"""PostgreSQL's bulk path (results_db/pg_copy.py): binary COPY refuses what text COPY refused, the partition
probe is skipped only for rows above the newest stored seq of their run; a row's key into its run (0010)."""

from __future__ import annotations

import time
from typing import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError, IntegrityError

from results_db import RecordWriter, open_database
from results_db.partitions import DAY_S
from results_db.synthetic import inference_records, run_record

pytestmark = pytest.mark.integration


def test_an_integer_beyond_its_column_is_refused_not_stored_wrapped(
    pg_url_factory: Callable[[], str],
) -> None:
    engine = open_database(pg_url_factory())
    writer = RecordWriter(engine)
    rows = [run_record("r-big", "dev-b")] + inference_records("r-big", "dev-b", 3)
    rows[2] = dict(rows[2], label=2**40)  # a valid 64-bit record field; `label` is a 32-bit integer column
    # A DataError is a row's fault to the collector: it splits the batch and refuses that message only.
    with pytest.raises(DataError, match="out of range"):
        writer.write(rows)
    with engine.connect() as connection:
        assert connection.execute(text("SELECT COUNT(*) FROM inferences")).scalar() == 0
    counts = writer.write(rows[:2] + rows[3:])  # the writer goes on with the next batch
    assert counts.inserted == 2
    engine.dispose()


def test_rows_at_or_below_the_newest_stored_seq_are_still_probed(pg_url_factory: Callable[[], str]) -> None:
    engine = open_database(pg_url_factory())
    writer = RecordWriter(engine)
    now = time.time()
    stored = inference_records("r-old", "dev-q", 10, ts_start=now - DAY_S)  # yesterday's partition
    assert writer.write([run_record("r-old", "dev-q"), *stored]).inserted == 10
    moved = dict(stored[4], ts_unix=now)  # seq 4 again, today: another partition, another unique key
    above = inference_records("r-old", "dev-q", 5, ts_start=now, start_seq=10)
    other_run = [run_record("r-new", "dev-q")] + inference_records("r-new", "dev-q", 5, ts_start=now)
    counts = writer.write([stored[9], moved, *above, *other_run])
    assert (counts.inserted, counts.duplicates) == (10, 1)
    assert [r.index for r in counts.refused] == [1] and "ts_unix differs" in counts.refused[0].reason
    with engine.connect() as connection:
        seqs = connection.execute(text("SELECT seq FROM inferences WHERE run_id = 'r-old' ORDER BY seq"))
        assert [s for (s,) in seqs] == list(range(15))
    engine.dispose()


def test_a_row_must_name_its_runs_device(pg_url_factory: Callable[[], str]) -> None:
    """0010: one key (run_id, device_id) into `runs` instead of one into `runs` and one into `devices`."""
    engine = open_database(pg_url_factory())
    RecordWriter(engine).write([run_record("r-a", "dev-a"), run_record("r-b", "dev-b")])
    insert = text(
        "INSERT INTO inferences (run_id, device_id, seq, prediction, exit_stage, edge_ms, bytes_up, "
        "bytes_down, energy_source, ts_unix) VALUES ('r-a', :device, 0, 1, 'main', 1.0, 0, 0, 'x', :ts)"
    )
    refused = pytest.raises(IntegrityError, match="fk_inferences_run_id_device_id_runs")
    with refused, engine.begin() as connection:  # dev-b exists, but r-a is dev-a's run
        connection.execute(insert, {"device": "dev-b", "ts": time.time()})
    with engine.begin() as connection:
        connection.execute(insert, {"device": "dev-a", "ts": time.time()})
        connection.execute(text("DELETE FROM runs WHERE run_id = 'r-a'"))  # ON DELETE CASCADE stays
        assert connection.execute(text("SELECT COUNT(*) FROM inferences")).scalar() == 0
    engine.dispose()
