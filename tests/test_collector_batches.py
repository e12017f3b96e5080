"""The collector's writer loop on a backlog: what is queued already goes into one transaction, up to
BACKLOG_BATCHES batches, and every record is written once (no broker: the inbox is filled directly)."""

from __future__ import annotations

from typing import List

from protocol.codec import encode_records
from protocol.mqtt import BrokerAddress
from protocol.topics import Topics
from results_db import Collector, CollectorConfig, RecordWriter, open_database
from results_db.collector import BACKLOG_BATCHES, Committed
from results_db.messages import Message, decode_message
from results_db.synthetic import inference_records


def test_a_backlog_is_written_in_larger_transactions(tmp_path) -> None:
    topics = Topics.namespaced("backlog")
    address = BrokerAddress("127.0.0.1", 1883, "collector", "unused")  # never connected
    collector = Collector(CollectorConfig(address, topics, tmp_path / "results.db", batch_size=100))
    collector._writer = RecordWriter(open_database(tmp_path / "results.db"))
    messages = 2 * BACKLOG_BATCHES + 4
    for i in range(messages):  # a backlog of 100-record messages, one batch_size each
        payload = encode_records(inference_records("run-b", "dev-b", 100, start_seq=100 * i))
        collector._inbox.put(decode_message(Message(0, i + 1, 1, topics.results("dev-b"), payload), topics))
    committed: List[Committed] = []
    collector.observers.append(committed.append)
    collector._stop.set()  # the loop writes what is queued, then returns
    collector._write_loop()
    full = 100 * BACKLOG_BATCHES
    assert [len(c.records) for c in committed] == [full, full, 400]
    assert collector.stats["inserted"] == 100 * messages and collector.stats["batches"] == 3
    collector._writer.engine.dispose()
