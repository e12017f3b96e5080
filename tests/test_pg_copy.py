"""PostgreSQL's bulk path (results_db/pg_copy.py): binary COPY refuses what text COPY refused, and the
partition probe is skipped only for rows above the newest stored seq of their run."""

from __future__ import annotations

import time
from typing import Callable

import pytest
from sqlalchemy import text
from sqlalchemy.exc import DataError

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
