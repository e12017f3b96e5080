"""The MQTT input source (`device_agent.mqtt_input`) against the real broker: images a sensor account
publishes to the device's input topic each get exactly one result row; a publisher faster than the device
overruns the bounded queue, and what is dropped is counted, never held (the queue's high-water mark stays at
its bound); what is not an image at the model's size is counted by reason."""

from __future__ import annotations

import collections
import io
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import numpy as np
import pytest
from agents import quick_agent_config
from PIL import Image, PngImagePlugin
from tinymodels import tiny_images
from waiting import wait_for

from broker.launcher import BrokerProcess
from device_agent import DeviceAgent
from device_agent.mqtt_input import MqttInput
from device_agent.sources import ImageSizeError, decode_image
from protocol.ids import sensor_account
from protocol.mqtt import new_client
from protocol.topics import Topics
from results_db import Collector, CollectorConfig

pytestmark = pytest.mark.integration


def png(image: np.ndarray, label: Optional[int] = None) -> bytes:
    """A grey [1,H,W] image as PNG bytes, its label in a `label` text chunk."""
    info = PngImagePlugin.PngInfo()
    if label is not None:
        info.add_text("label", str(label))
    out = io.BytesIO()
    Image.fromarray(image[0]).save(out, format="PNG", pnginfo=info)
    return out.getvalue()


def test_decode_image_checks_the_size_before_decoding_and_reads_the_label() -> None:
    image = tiny_images(1, seed=3)[0]
    decoded = decode_image(png(image, 7), (1, 28, 28))
    assert decoded.label == 7 and np.array_equal(decoded.image, image)
    assert decode_image(png(image), (1, 28, 28)).label is None
    with pytest.raises(ImageSizeError):
        decode_image(png(np.zeros((1, 32, 32), np.uint8)), (1, 28, 28))
    rgb = decode_image(png(image), (3, 28, 28)).image
    assert rgb.shape == (3, 28, 28) and np.array_equal(rgb[1], image[0])


class Sensor:
    """A camera on its sensor account, publishing at QoS 1 (to the broker) as fast as asked."""

    def __init__(self, broker: BrokerProcess, device_id: str) -> None:
        address = broker.credentials(sensor_account(device_id))
        self.client = new_client(address, address.username)
        self.client.max_inflight_messages_set(1000)
        self.client.connect(address.host, address.port)
        self.client.loop_start()

    def publish_all(self, topic: str, payloads: List[bytes], rate: Optional[float] = None) -> None:
        started = time.monotonic()
        infos = []
        for i, payload in enumerate(payloads):
            if rate:
                time.sleep(max(0.0, started + i / rate - time.monotonic()))
            infos.append(self.client.publish(topic, payload, qos=1))
        for info in infos:
            info.wait_for_publish(10)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def device(broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path) -> Iterator[Tuple]:
    """(agent config, db, collector): an edge-only agent's config and a collector into SQLite."""
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    config = quick_agent_config(
        broker,
        topics,
        tiny_models,
        tmp_path / "state",
        device_id=device_id,
        policy={"name": "edge-only", "params": {}},
    )
    try:
        yield config, db, collector
    finally:
        collector.stop()


def _rows(db: Path, run_id: str) -> List[Tuple[int, Optional[int]]]:
    with sqlite3.connect(db) as raw:
        return raw.execute("SELECT seq, label FROM inferences WHERE run_id = ?", (run_id,)).fetchall()


def _serve(inputs: MqttInput, stop: threading.Event) -> Tuple[threading.Thread, list]:
    out: list = []
    thread = threading.Thread(target=lambda: out.append(inputs.serve(stop)))
    thread.start()
    return thread, out


def test_each_published_image_gets_exactly_one_row_and_bad_ones_are_counted_by_reason(
    broker: BrokerProcess, topics: Topics, device: Tuple
) -> None:
    config, db, _ = device
    n = 300
    images = tiny_images(n, seed=41)
    labels = [i % 10 for i in range(n)]
    payloads = [png(image, label) for image, label in zip(images, labels)]
    bad = [b"not an image", png(np.zeros((1, 32, 32), np.uint8))]
    agent = DeviceAgent(config)
    inputs = MqttInput(agent, queue_size=64)
    sensor = Sensor(broker, config.device_id)
    stop = threading.Event()
    try:
        agent.start()
        thread, summary = _serve(inputs, stop)
        sensor.publish_all(topics.input(config.device_id), payloads[:150] + bad + payloads[150:], rate=1000)
        wait_for(lambda: inputs.stats["received"] == n + 2 and inputs.depth() == 0, 30, "every image taken")
        stop.set()
        thread.join(30)
    finally:
        stop.set()
        final = agent.close()
        sensor.close()
    wait_for(lambda: len(_rows(db, agent.run_id)) >= n, 30, "every row stored")
    rows = _rows(db, agent.run_id)
    assert inputs.stats["dropped"] == 0 and inputs.stats["accepted"] == n  # the device kept up at 1000/s
    assert len(rows) == n and len({seq for seq, _ in rows}) == n  # one row each, none twice
    assert collections.Counter(label for _, label in rows) == collections.Counter(labels)
    assert inputs.bad_by_reason() == {"too_large": 0, "undecodable": 1, "shape": 1}
    assert summary[0].samples == n and final.outbox_left["record"] == 0


def test_a_publisher_faster_than_the_device_overruns_the_queue_and_the_drops_are_counted(
    broker: BrokerProcess, topics: Topics, device: Tuple
) -> None:
    config, db, _ = device
    n, bound = 600, 16
    images = tiny_images(n, seed=42)
    payloads = [png(image, i % 10) for i, image in enumerate(images)]
    agent = DeviceAgent(config)
    inputs = MqttInput(agent, queue_size=bound, queue_bytes=bound * 2048)
    sensor = Sensor(broker, config.device_id)
    stop = threading.Event()
    try:
        agent.start()
        decide = agent.policy.decide

        def slow_decide(view: object) -> object:  # a device that answers ~300 images a second
            time.sleep(0.003)
            return decide(view)

        agent.policy.decide = slow_decide  # type: ignore[method-assign]
        thread, _ = _serve(inputs, stop)
        sensor.publish_all(topics.input(config.device_id), payloads)  # as fast as paho goes: thousands/s
        wait_for(lambda: inputs.stats["received"] == n and inputs.depth() == 0, 60, "the queue drained")
        stop.set()
        thread.join(60)
    finally:
        stop.set()
        agent.close()
        sensor.close()
    stats = inputs.stats
    wait_for(lambda: len(_rows(db, agent.run_id)) >= stats["accepted"], 30, "every accepted row stored")
    rows = _rows(db, agent.run_id)
    assert stats["dropped"] > 0, stats  # overrun: dropped, counted
    assert stats["accepted"] + stats["dropped"] == stats["received"] == n  # nothing unaccounted
    assert len(rows) == stats["accepted"] and len({seq for seq, _ in rows}) == len(rows)
    assert stats["high_water"] <= bound and stats["high_water_bytes"] <= bound * 2048  # memory bounded
