"""The collector against a real Mosquitto: records land once, bad input is refused, restarts lose nothing."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Iterator, List

import paho.mqtt.client as mqtt
import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import ProgrammingError
from waiting import wait_for

from broker.launcher import BrokerProcess
from protocol.codec import Receipt, decode_receipt, encode_records
from protocol.mqtt import new_client, publish_properties
from protocol.topics import Topics
from results_db import Collector, CollectorConfig
from results_db.synthetic import full_run, inference_records

pytestmark = pytest.mark.integration


@pytest.fixture
def device(broker: BrokerProcess, device_id: str) -> Iterator[mqtt.Client]:
    # Client id = device id: the broker binds device accounts to it.
    client = new_client(broker.credentials(device_id), device_id)
    connected = threading.Event()
    client.on_connect = lambda *a: connected.set()  # new_client wraps this after TCP_NODELAY
    client.connect(broker.host, broker.port)
    client.loop_start()
    assert connected.wait(5)
    yield client
    client.disconnect()
    client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: bytes) -> None:
    client.publish(topic, payload, qos=1).wait_for_publish(5)


def chunks(records: List[dict], size: int) -> Iterator[List[dict]]:
    for i in range(0, len(records), size):
        yield records[i : i + size]


def config(broker: BrokerProcess, topics: Topics, db: Path, client_id: str, **kw) -> CollectorConfig:
    return CollectorConfig(broker.credentials("collector"), topics, db, client_id=client_id, **kw)


def query(db: Any, sql: str) -> List[Any]:
    """Rows of `sql` on a SQLite file or a database URL (PostgreSQL); [] before the schema exists."""
    if "://" in str(db):
        engine = create_engine(str(db))
        try:
            with engine.connect() as connection:
                return list(connection.execute(text(sql)).fetchall())
        except ProgrammingError:  # not migrated yet
            return []
        finally:
            engine.dispose()
    if not Path(db).exists():
        return []
    with sqlite3.connect(db, timeout=10) as raw:
        try:
            return raw.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []


def count_rows(db: Any, table: str = "inferences") -> int:
    found = query(db, f"SELECT COUNT(*) FROM {table}")
    return int(found[0][0]) if found else 0


def test_records_land_once_and_systemd_hears_ready(
    broker, topics, device_id, device, tmp_path, monkeypatch, db_url
) -> None:
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    db = db_url  # a SQLite file, then a PostgreSQL schema
    records = full_run("run-1", device_id, 250)  # run, idle baseline, 250 inferences, 8 windows, run_end
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", batch_size=100, flush_ms=50)) as c:
        assert notify.recv(4096).startswith(b"READY=1")
        for chunk in chunks(records, 60):
            publish(device, topics.results(device_id), encode_records(chunk))
        wait_for(lambda: c.stats["inserted"] + c.stats["run_records"] == len(records), what="all records")
        publish(device, topics.results(device_id), encode_records(records[:60]))  # a re-sent batch
        wait_for(lambda: c.stats["duplicates"] == 59, what="the duplicate batch")  # 60 - the run record
        stats = c.stats
    notify.close()
    assert stats["rejected"] == 0 and stats["received"] == len(records) + 60
    assert stats["messages"] == 6 and stats["inserted"] == 250 + 8 + 1
    assert count_rows(db) == 250 and count_rows(db, "energy_windows") == 8
    [(policy, ended, samples)] = query(db, "SELECT policy, ended_unix, samples FROM runs")
    assert (policy, samples) == ("meanet", 250) and ended is not None


def test_a_batch_that_asks_for_a_receipt_gets_one_after_commit_on_its_own_topic(
    broker, topics, device_id, device, tmp_path, caplog
) -> None:
    db = tmp_path / "results.db"
    receipts: List[bytes] = []
    rows_at_receipt: List[int] = []

    def on_receipt(client: mqtt.Client, userdata: object, message: mqtt.MQTTMessage) -> None:
        receipts.append(message.properties.CorrelationData)
        rows_at_receipt.append(count_rows(db))

    subscribed = threading.Event()
    device.on_subscribe = lambda *a: subscribed.set()
    device.message_callback_add(topics.receipts(device_id), on_receipt)
    device.subscribe(topics.receipts(device_id), qos=1)
    assert subscribed.wait(5)
    records = inference_records("run-r", device_id, 40)
    caplog.set_level(logging.WARNING, logger="results_db.collector")
    with Collector(
        config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", batch_size=1000, flush_ms=50)
    ) as c:
        asked = publish_properties(response_topic=topics.receipts(device_id), correlation_data=b"batch-1")
        device.publish(
            topics.results(device_id), encode_records(records[:20]), qos=1, properties=asked
        ).wait_for_publish(5)
        # a receipt asked for on another device's topic is not sent (the ACL would refuse it anyway)
        elsewhere = publish_properties(response_topic=topics.receipts("victim"), correlation_data=b"batch-2")
        device.publish(
            topics.results(device_id), encode_records(records[20:]), qos=1, properties=elsewhere
        ).wait_for_publish(5)
        publish(device, topics.results(device_id), encode_records(records[:1]))  # asks for nothing
        # Messages are written and acked in order: once the marker's receipt is here, any receipt for
        # the two messages before it would have been sent.
        marker = publish_properties(response_topic=topics.receipts(device_id), correlation_data=b"marker")
        device.publish(
            topics.results(device_id), encode_records(records[:1]), qos=1, properties=marker
        ).wait_for_publish(5)
        wait_for(lambda: c.stats["inserted"] == 40 and c.stats["duplicates"] == 2, what="all records")
        wait_for(lambda: b"marker" in receipts, what="the marker's receipt")
        stats = c.stats
    assert receipts == [b"batch-1", b"marker"] and stats["receipts"] == 2
    assert rows_at_receipt[0] >= 20  # sent after the batch was committed, never before
    assert any("victim" in r.getMessage() for r in caplog.records)


def test_malformed_input_is_counted_logged_and_does_not_block(
    broker, topics, device_id, device, tmp_path, caplog
) -> None:
    db = tmp_path / "results.db"
    topic = topics.results(device_id)
    good = inference_records("run-2", device_id, 30)
    caplog.set_level(logging.WARNING, logger="results_db.collector")
    with Collector(
        config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", batch_size=1000, flush_ms=30)
    ) as c:
        publish(device, topic, b"\x00not an envelope")
        broken = dict(good[0], seq=1000, exit_stage="teleport")  # invalid record beside a valid one
        publish(device, topic, encode_records([broken, dict(good[0], seq=1001)]))
        forged = inference_records("run-2", "some-other-device", 1)  # device id does not match the topic
        publish(device, topic, encode_records(forged))
        publish(device, topic, encode_records(good))
        wait_for(lambda: c.stats["inserted"] == 31, what="the good records")
        stats = c.stats
    assert stats["messages"] == 4
    assert stats["rejected"] == 3 and stats["rejected_messages"] == 3
    assert stats["received"] == 33  # the undecodable message holds no records
    assert count_rows(db) == 31
    assert count_rows(db, "rejected_records") == 3  # kept with the reason, not dropped
    warnings = [
        r.getMessage()
        for r in caplog.records
        if r.levelno == logging.WARNING and r.name == "results_db.collector"
    ]
    assert len(warnings) == 3 and all(topic in w for w in warnings)
    assert any("exit_stage" in w for w in warnings) and any("some-other-device" in w for w in warnings)


def test_a_row_the_database_refuses_costs_only_its_own_message(
    broker, topics, device_id, device, tmp_path, caplog, monkeypatch
) -> None:
    # validation refuses such a record now; skip it to reach the database's own refusal
    monkeypatch.setattr("results_db.messages.validate_record", lambda record: record)
    db = tmp_path / "results.db"
    before, after = (
        inference_records("run-6", device_id, 50),
        inference_records("run-6", device_id, 50, start_seq=50),
    )
    poison = [dict(before[0], seq=2**63)]  # a valid record, but beyond SQLite's 64-bit signed INTEGER
    caplog.set_level(logging.WARNING, logger="results_db.collector")
    # One long flush window, so that the three messages share a transaction and the writer must split it.
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", flush_ms=500)) as c:
        for payload in (before, poison, after):
            publish(device, topics.results(device_id), encode_records(payload))
        wait_for(lambda: c.stats["inserted"] == 100 and c.stats["rejected"] == 1, what="the split batch")
        stats = c.stats
    assert stats["rejected_messages"] == 1 and count_rows(db) == 100
    assert any("database refused" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(db) as raw:
        [(reason,)] = raw.execute("SELECT reason FROM rejected_records").fetchall()
    assert reason.startswith("database:")


def _receipts_of(device: mqtt.Client, topics: Topics, device_id: str) -> List[Receipt]:
    receipts: List[Receipt] = []
    subscribed = threading.Event()
    device.on_subscribe = lambda *a: subscribed.set()
    device.message_callback_add(
        topics.receipts(device_id), lambda c, u, m: receipts.append(decode_receipt(m.payload))
    )
    device.subscribe(topics.receipts(device_id), qos=1)
    assert subscribed.wait(5)
    return receipts


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers_are_refused_kept_and_reported_in_the_receipt(
    broker, topics, device_id, device, tmp_path, value
) -> None:
    """NaN energy made PostgreSQL's run summary NaN (and SQLite stored NULL): refused, kept, receipted."""
    db = tmp_path / "results.db"
    receipts = _receipts_of(device, topics, device_id)
    records = inference_records("run-nan", device_id, 5)
    records[1] = dict(records[1], device_j_gross=value)
    records[3] = dict(records[3], edge_ms=value)
    asked = publish_properties(response_topic=topics.receipts(device_id), correlation_data=b"b1")
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", flush_ms=20)) as c:
        device.publish(topics.results(device_id), encode_records(records), qos=1, properties=asked)
        wait_for(lambda: len(receipts) == 1, what="the receipt")
        stats = c.stats
    assert receipts == [Receipt(stored=3, refused=2, reason=receipts[0].reason)]
    assert "non-finite" in receipts[0].reason
    assert stats["inserted"] == 3 and stats["rejected"] == 2
    assert count_rows(db) == 3 and count_rows(db, "rejected_records") == 2


def test_a_refused_message_delivered_again_is_kept_once(broker, topics, device_id, device, tmp_path) -> None:
    """Each re-delivery of a refused message (no receipt heard, collector restarted) used to add a row."""
    db = tmp_path / "results.db"
    records = inference_records("run-again", device_id, 3)
    records[1] = dict(records[1], edge_ms=float("nan"))
    payload = encode_records(records)
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", flush_ms=20)) as c:
        for _ in range(3):
            publish(device, topics.results(device_id), payload)
        wait_for(lambda: c.stats["rejected"] == 3 and c.stats["duplicates"] == 4, what="three deliveries")
    assert count_rows(db) == 2 and count_rows(db, "rejected_records") == 1


def test_a_fault_of_the_database_itself_stops_the_writer_and_refuses_nothing(
    broker, topics, device_id, device, tmp_path
) -> None:
    """SQLite's "no such table" is not a row's fault: refusing over it would empty the devices' outboxes
    into rejected_records. The writer dies, the batch stays unacknowledged and lands on the next start."""
    db = tmp_path / "results.db"
    cid = f"c-{uuid.uuid4().hex[:8]}"
    records = inference_records("run-broken", device_id, 20)
    with Collector(config(broker, topics, db, cid, flush_ms=20)) as c:
        with sqlite3.connect(db) as raw:
            raw.execute("DROP TABLE inferences")
        publish(device, topics.results(device_id), encode_records(records))
        wait_for(lambda: not c.healthy, what="the writer to stop")
        assert c.failed is not None and "no such table" in str(c.failed)
        assert c.stats["rejected"] == 0 and c.stats["batches"] == 0
    assert count_rows(db, "rejected_records") == 0
    fixed = tmp_path / "fixed.db"  # the operator points the service at a good database
    with Collector(config(broker, topics, fixed, cid, flush_ms=20)) as c:
        wait_for(lambda: c.stats["inserted"] == 20, what="the batch, delivered again")
    assert count_rows(fixed) == 20


def test_a_device_cannot_hijack_another_devices_run(broker, topics, device_id, device, tmp_path) -> None:
    """Run records and rows for a run id are tied to the device that owns the run, as rows are to topics."""
    from results_db.synthetic import run_end_record, run_record

    db = tmp_path / "results.db"
    victim = f"victim-{uuid.uuid4().hex[:6]}"
    victim_client = new_client(broker.credentials(victim), victim)
    victim_client.connect(broker.host, broker.port)
    victim_client.loop_start()
    receipts = _receipts_of(device, topics, device_id)
    asked = publish_properties(response_topic=topics.receipts(device_id), correlation_data=b"forged")
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", flush_ms=20)) as c:
        publish(victim_client, topics.results(victim), encode_records(full_run("their-run", victim, 10)))
        wait_for(lambda: c.stats["inserted"] >= 10, what="the victim's run")
        forged = [
            run_record("their-run", device_id, policy="forged"),
            run_end_record("their-run", device_id, 1, 1.0),
        ]
        device.publish(topics.results(device_id), encode_records(forged), qos=1, properties=asked)
        wait_for(lambda: len(receipts) == 1, what="the receipt")
    victim_client.disconnect()
    victim_client.loop_stop()
    assert receipts[0].stored == 0 and receipts[0].refused == 2 and "belongs to device" in receipts[0].reason
    with sqlite3.connect(db) as raw:
        assert raw.execute("SELECT device_id, policy, samples FROM runs").fetchall() == [
            (victim, "meanet", 10)
        ]


def test_a_passing_database_fault_is_retried_never_refused(
    broker, topics, device_id, device, tmp_path, monkeypatch
) -> None:
    """A lost connection or an exhausted pool must not make the collector refuse (ack, receipt) records."""
    from sqlalchemy.exc import DBAPIError, InterfaceError
    from sqlalchemy.exc import TimeoutError as PoolTimeoutError

    from results_db.ingest import RecordWriter

    faults = [
        PoolTimeoutError("QueuePool limit reached"),
        InterfaceError("INSERT", {}, Exception("connection already closed")),
        DBAPIError("INSERT", {}, Exception("server closed the connection"), connection_invalidated=True),
    ]
    real_write = RecordWriter.write

    def flaky_write(self, records, *args):
        if faults:
            raise faults.pop(0)
        return real_write(self, records, *args)

    monkeypatch.setattr(RecordWriter, "write", flaky_write)
    db = tmp_path / "results.db"
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", retry_max_s=0.05)) as c:
        publish(device, topics.results(device_id), encode_records(inference_records("run-f", device_id, 30)))
        wait_for(lambda: c.stats["inserted"] == 30, what="the records after three faults")
        stats = c.stats
    assert stats["db_retries"] == 3 and stats["rejected"] == 0 and count_rows(db) == 30


def test_a_stopped_collector_gets_what_was_published_while_away(
    broker, topics, device_id, device, tmp_path
) -> None:
    db = tmp_path / "results.db"
    cid = f"c-{uuid.uuid4().hex[:8]}"
    first, second = (
        inference_records("run-3", device_id, 200),
        inference_records("run-3", device_id, 300, start_seq=200),
    )
    with Collector(config(broker, topics, db, cid, flush_ms=20)) as c:
        publish(device, topics.results(device_id), encode_records(first))
        wait_for(lambda: c.stats["inserted"] == 200, what="the first batch")
    for chunk in chunks(second, 100):  # nobody is subscribed now: the broker queues for the session
        publish(device, topics.results(device_id), encode_records(chunk))
    with Collector(config(broker, topics, db, cid, flush_ms=20)) as c:
        wait_for(lambda: c.stats["inserted"] == 300, what="the queued batches")
        assert c.stats["duplicates"] == 0
    assert count_rows(db) == 500


def test_unacknowledged_messages_come_back_and_write_nothing_twice(
    broker, topics, device_id, device, tmp_path
) -> None:
    """A collector that committed but never acked (died in between): the broker re-delivers every message."""
    db = tmp_path / "results.db"
    cid = f"c-{uuid.uuid4().hex[:8]}"
    records = inference_records("run-5", device_id, 300)
    forgetful = Collector(config(broker, topics, db, cid, flush_ms=20))
    forgetful._ack = lambda messages: None  # type: ignore[method-assign]
    with forgetful:
        for chunk in chunks(records, 100):
            publish(device, topics.results(device_id), encode_records(chunk))
        wait_for(lambda: forgetful.stats["inserted"] == 300, what="the first delivery")
    with Collector(config(broker, topics, db, cid, flush_ms=20)) as c:
        wait_for(lambda: c.stats["duplicates"] == 300, what="the re-delivery")
        stats = c.stats
    assert (stats["messages"], stats["inserted"], stats["duplicates"]) == (3, 0, 300)
    assert count_rows(db) == 300


@pytest.mark.slow
def test_collector_killed_mid_stream_loses_nothing(
    broker, topics, device_id, device, tmp_path, db_url
) -> None:
    """SIGKILL the `edgecascade collect` process while results stream in; a new one takes over the session.
    On SQLite and on PostgreSQL."""
    db = db_url
    cid = f"c-{uuid.uuid4().hex[:8]}"
    password = tmp_path / "collector.pw"
    password.write_text(broker.credentials("collector").password + "\n")
    cmd = [sys.executable, "-m", "results_db", "--broker", f"{broker.host}:{broker.port}", "--password-file",
           str(password), "--db", str(db), "--namespace", topics.root.split("/")[0], "--client-id", cid,
           "--batch-size", "200", "--flush-ms", "20"]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    lines: List[str] = []
    threading.Thread(target=lambda: lines.extend(proc.stderr or []), daemon=True).start()
    try:
        # INFO logging is off in the CLI by default, so wait for the schema, then probe until a record lands.
        probe = inference_records("run-probe", device_id, 1)
        deadline = time.monotonic() + 30
        while count_rows(db) == 0:
            assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
            publish(device, topics.results(device_id), encode_records(probe))
            time.sleep(0.1)
        records = inference_records("run-4", device_id, 4000)
        killed = threading.Event()

        def stream() -> None:
            for i, chunk in enumerate(chunks(records, 100)):
                if i == 15:  # the rest only once the collector is dead: the kill is mid-stream
                    killed.wait(30)
                publish(device, topics.results(device_id), encode_records(chunk))

        publisher = threading.Thread(target=stream)
        publisher.start()
        wait_for(lambda: count_rows(db) >= 1000, what="a quarter of the stream")
        proc.send_signal(signal.SIGKILL)  # no flush, no acks: what a power cut does
        proc.wait(10)
        at_kill = count_rows(db) - 1
        killed.set()
        publisher.join(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert at_kill <= 1500  # it really died mid-stream
    with Collector(config(broker, topics, db, cid, flush_ms=20)) as c:
        wait_for(lambda: count_rows(db) == 4001, what="the rest of the stream")
        # The broker re-sends a resumed session's messages before new ones: once a new record has landed,
        # every re-delivery of an already-committed batch has been written, and must have changed nothing.
        last = inference_records("run-last", device_id, 1)
        publish(device, topics.results(device_id), encode_records(last))
        wait_for(lambda: count_rows(db) == 4002, what="the record sent after the stream")
        stats = c.stats
    assert stats["inserted"] == 4000 - at_kill + 1 and stats["rejected"] == 0


def test_an_older_agents_records_without_the_newer_fields_are_stored(
    broker, topics, device_id, device, tmp_path
) -> None:
    """A collector upgraded before its fleet: records without the fields added since (model_version, the
    gateway's columns) land with NULLs there; one without a field every release sends is still refused."""
    newer = ("model_version", "p_gateway", "gateway_ms", "gateway_j")
    records = full_run("run-old", device_id, 20)
    for record in records:
        if record["type"] == "inference":
            for name in newer:
                record.pop(name, None)
    broken = dict(next(r for r in records if r["type"] == "inference"), seq=None)
    del broken["seq"]
    db = f"sqlite:///{tmp_path / 'old.db'}"
    with Collector(config(broker, topics, db, f"c-{uuid.uuid4().hex[:8]}", flush_ms=50)) as c:
        publish(device, topics.results(device_id), encode_records(records))
        publish(device, topics.results(device_id), encode_records([broken]))
        wait_for(lambda: c.stats["inserted"] + c.stats["run_records"] == len(records), what="all records")
        wait_for(lambda: c.stats["rejected"] == 1, what="the record without seq refused")
    assert count_rows(db) == 20
    assert query(
        db, "SELECT COUNT(*) FROM inferences WHERE model_version IS NULL AND gateway_ms IS NULL"
    ) == [(20,)]
