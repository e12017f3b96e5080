"""The REACT camera agent end to end: real Mosquitto, a real cloud detector worker, real onnxruntime on the
committed video detectors, a real collector into SQLite, pycocotools on the rows."""

from __future__ import annotations

import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pytest
from waiting import wait_for

from bench.services import ServiceGroup
from bench.video_eval import evaluate_run
from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from device_agent.camera import CameraAgent
from device_agent.camera_config import CameraConfig
from device_agent.sources import FASHION_MNIST_CLASSES, load_idx_dataset
from protocol import DetectionReply, ProtocolError, decode_detections, encode_detections
from protocol.topics import Topics
from results_db import Collector, CollectorConfig, open_database
from video.dataset import load_split, write_split
from video.synth import SynthConfig

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "video-fmnist"


@pytest.fixture(scope="module")
def clips(tmp_path_factory: pytest.TempPathFactory) -> Any:
    root = tmp_path_factory.mktemp("clips")
    images, labels = load_idx_dataset("fashion-mnist", "test")
    write_split(root, "test", 2, SynthConfig(frames=30), 7, images, labels, class_names=FASHION_MNIST_CLASSES)
    return load_split(root)


@pytest.fixture
def site(broker: BrokerProcess, tmp_path: Path) -> Iterator[Any]:
    topics = Topics.namespaced(f"vid{uuid.uuid4().hex[:8]}")
    db = tmp_path / "results.db"
    collector = Collector(CollectorConfig(broker.credentials("collector"), topics, db, flush_ms=20)).start()
    yield topics, db
    collector.stop()


def rows(db: Path, sql: str) -> list:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(sql).fetchall()


def agent_config(broker: BrokerProcess, topics: Topics, tmp_path: Path, **kw: Any) -> CameraConfig:
    device = f"cam-{uuid.uuid4().hex[:6]}"
    base: dict = dict(
        device_id=device,
        broker=broker.credentials(device),
        topics=topics,
        model_dir=MODELS,
        state_dir=tmp_path / "state",
        meters=["estimate"],
    )
    base.update(kw)
    return CameraConfig(**base)


def test_react_frames_reach_sql_and_are_scored(broker, site, clips, tmp_path) -> None:
    topics, db = site
    worker = CloudWorker(
        WorkerConfig(broker.credentials("cloud"), topics, MODELS, "vid-w", task="detect", max_batch=4)
    ).start()
    try:
        config = agent_config(broker, topics, tmp_path, method="react", extra_delay_ms=100)
        agent = CameraAgent(config).start()
        summary = agent.run((c, clips.frames(c)) for c in range(clips.sequences))
        agent.close()
    finally:
        worker.stop()
    frames = clips.sequences * clips.frames_per_sequence
    wait_for(lambda: rows(db, "SELECT COUNT(*) FROM frames")[0][0] == frames, what="every frame's row")
    assert summary.frames == frames and summary.sent > 0 and summary.answered > 0
    # one row per frame, each (clip, frame) exactly once, in the clip's order of seq numbers
    assert rows(db, "SELECT COUNT(DISTINCT sequence * 1000 + frame), MIN(frame), MAX(frame) FROM frames") == [
        (frames, 0, clips.frames_per_sequence - 1)
    ]
    sources = dict(rows(db, "SELECT source, COUNT(*) FROM frames GROUP BY source"))
    # the detector ran on every 5th frame (edge, or fused when a cloud answer came in on the same frame)
    assert sources.get("edge", 0) + sources.get("fused", 0) >= frames // 5 and sources.get("fused", 0) > 0
    # an applied answer is at least the injected delay old and for an earlier frame of its clip
    for answer_frame, frame, answer_ms in rows(
        db, "SELECT answer_frame, frame, answer_ms FROM frames WHERE answer_frame IS NOT NULL"
    ):
        assert answer_frame < frame and answer_ms >= 100.0
    engine = open_database(db)
    result = evaluate_run(
        engine,
        config.run_id or agent.run_id,
        clips,
        method="react",
        detect_every=5,
        cloud_every=None,
        delay_ms=100,
    )
    engine.dispose()
    assert result.frames == frames and result.images == frames and 0.2 < result.map50 <= 1.0
    [(method, map50, n, p50)] = rows(
        db, "SELECT method, map50, frames, cloud_latency_p50_ms FROM video_run_summary"
    )
    assert (method, n) == ("react", frames) and map50 == pytest.approx(result.map50) and p50 >= 100.0


def test_a_cloud_worker_sigkilled_mid_run_loses_no_frame(broker, site, clips, tmp_path) -> None:
    topics, db = site
    services = ServiceGroup(tmp_path / "logs")
    try:
        services.start_cloud(
            "cloud-0",
            broker.credentials("cloud"),
            MODELS,
            "vid-kill",
            ["--task", "detect", "--threads", "1", "--namespace", topics.root.split("/")[0]],
        )
        config = agent_config(broker, topics, tmp_path, method="react", deadline_s=0.5)
        agent = CameraAgent(config).start()
        killed = threading.Event()
        failures: list = []

        def kill_once_answering() -> None:
            try:
                wait_for(lambda: agent.summary.answered >= 3, what="the first answers")
                services.kill("cloud-0")  # no goodbye: its in-flight frames are gone with it
                killed.set()
            except BaseException as exc:  # seen by the test, not lost in this thread
                failures.append(exc)

        killer = threading.Thread(target=kill_once_answering)
        killer.start()
        # The clips twice (4 s at 30 fps): the kill lands seconds before the end, many deadlines of 0.5 s.
        played = [(c, clips.frames(c)) for c in range(clips.sequences)] * 2
        summary = agent.run(iter(played))
        killer.join(30)
        agent.close()
    finally:
        services.close()
    assert not failures and killed.is_set(), failures
    frames = len(played) * clips.frames_per_sequence
    wait_for(lambda: rows(db, "SELECT COUNT(*) FROM frames")[0][0] == frames, what="every frame's row")
    # answers stopped with the worker, and the frames it held were given up: the device carried on
    assert summary.answered >= 3 and summary.lost >= 1
    assert rows(db, "SELECT COUNT(DISTINCT seq) FROM frames") == [(frames,)]


def test_a_camera_run_id_is_not_started_twice(broker, site, clips, tmp_path) -> None:
    """Frames are not tracked like a dataset's items: a second start of one run would record every frame
    twice (the review found `video_run_summary` counting both copies)."""
    topics, _db = site
    config = agent_config(broker, topics, tmp_path, method="edge-only", run_id="cam-run-once", fps=0)
    agent = CameraAgent(config).start()
    agent.run([(0, clips.frames(0)[:3])])
    agent.close()
    refused = CameraAgent(config)
    with pytest.raises(ValueError, match="has run on this device before"):
        refused.start()
    # The refused start let go of the outbox and its lock (`refused` is still alive: not garbage collected),
    # so a new run on this device starts (it raised OutboxInUse before).
    CameraAgent(agent_config(broker, topics, tmp_path, method="edge-only", fps=0)).start().close()
    assert refused.session.outbox.path.exists()


def test_a_start_the_broker_refused_does_not_use_up_the_camera_run_id(broker, site, clips, tmp_path) -> None:
    """The start number was taken before the login: one wrong password used the run id up for good."""
    import dataclasses

    from protocol.mqtt import BrokerUnusable

    topics, _db = site
    config = agent_config(broker, topics, tmp_path, method="edge-only", run_id="cam-run-retry", fps=0)
    wrong = dataclasses.replace(config, broker=dataclasses.replace(config.broker, password="wrong"))
    with pytest.raises(BrokerUnusable):
        CameraAgent(wrong).start()
    agent = CameraAgent(config).start()  # the password fixed, the same run id
    agent.run([(0, clips.frames(0)[:3])])
    agent.close()
    assert agent.outbox_left == {"record": 0, "offload": 0}


def test_detections_travel_and_bad_tables_are_refused() -> None:
    reply = DetectionReply(
        "run-1", "cam-1", 7, np.array([[1, 2, 30, 40]], np.float32), np.array([0.9], np.float32),
        np.array([3]), cloud_ms=4.5, worker_id="w",
    )  # fmt: skip
    back = decode_detections(encode_detections(reply))
    assert back.boxes.tolist() == [[1, 2, 30, 40]] and back.labels.tolist() == [3] and back.seq == 7
    nan = DetectionReply(
        "r", "d", 1, np.array([[np.nan, 0, 1, 1]], np.float32), np.ones(1), np.ones(1), 1.0, "w"
    )
    with pytest.raises(ProtocolError, match="non-finite"):
        decode_detections(encode_detections(nan))


def test_an_opencv_video_file_becomes_grey_frames_of_the_models_size(tmp_path: Path) -> None:
    import cv2

    from video.sources import capture_frames

    path = tmp_path / "clip.avi"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25.0, (200, 150))
    assert writer.isOpened()
    for i in range(12):
        picture = np.zeros((150, 200, 3), np.uint8)
        picture[:, : 10 + 10 * i] = (0, 0, 255)  # a red bar that grows
        writer.write(picture)
    writer.release()
    fps, frames = capture_frames(str(path), (128, 128), max_frames=10)
    got = list(frames)
    assert fps == pytest.approx(25.0) and len(got) == 10
    assert all(f.shape == (128, 128) and f.dtype == np.uint8 for f in got)
    assert got[-1].mean() > got[0].mean()  # the bar grew, in grey
    with pytest.raises(ValueError, match="cannot open"):
        capture_frames(str(tmp_path / "missing.avi"), (128, 128))


def test_the_camera_cli_refuses_a_bad_source(tmp_path: Path, capsys) -> None:
    from edgecascade.cli import main

    code = main(["camera", "--broker", "127.0.0.1:1", "--device-id", "cam-01", "--source", "webcam"])
    assert code == 2 and "--source must be synthetic:DIR" in capsys.readouterr().err
