"""Following the better tier (`device_agent.safety`): backing off a cloud that is not better and escalating
to one that is while the inputs drift. The watch by hand; a real agent against a real broker whose cloud
answers without confidence, then sure of itself; and one whose drift monitor flags its inputs."""

from __future__ import annotations

import sqlite3
import uuid
from pathlib import Path
from typing import Any, Dict

import numpy as np
import pytest
from agents import quick_agent_config
from tinymodels import tiny_images
from waiting import wait_for

from broker.launcher import BrokerProcess
from device_agent import DeviceAgent
from device_agent.cascade import EdgeCascade
from device_agent.safety import CloudWatch
from protocol import CONTENT_TYPE_REPLY, OffloadReply, decode_offload, encode_reply
from protocol.mqtt import new_client, publish_properties
from protocol.topics import Topics
from results_db import Collector, CollectorConfig


def test_the_watch_backs_off_when_the_cloud_is_less_sure_probes_and_resumes() -> None:
    watch = CloudWatch(window=20, min_answers=10, back_off_below=0.0, resume_above=0.05, probe=0.25, seed=1)
    for _ in range(9):
        watch.answered(0.6, 0.3)  # a cloud less sure than the edge...
    assert not watch.backed_off  # ... but too few answers to judge by
    watch.answered(0.6, 0.3)
    assert watch.backed_off and watch.back_offs == 1
    admitted = sum(watch.admit() for _ in range(1000))
    assert 200 < admitted < 300 and watch.probes == admitted and watch.kept_at_edge == 1000 - admitted
    for _ in range(20):  # the window fills with answers where the cloud is sure
        watch.answered(0.6, 0.62)
    assert watch.backed_off  # advantage 0.02: inside the hysteresis band, still backed off
    for _ in range(20):
        watch.answered(0.6, 0.9)
    assert not watch.backed_off and all(watch.admit() for _ in range(100))
    report = watch.report()
    assert report["advantage"] == pytest.approx(0.3) and report["back_offs"] == 1
    for bad in (dict(min_answers=0), dict(window=5, min_answers=6), dict(probe=0.0), dict(resume_above=-1)):
        with pytest.raises(ValueError):
            CloudWatch(**bad)  # type: ignore[arg-type]


def test_the_watch_escalates_only_while_drifting_and_the_cloud_is_better() -> None:
    watch = CloudWatch(window=20, min_answers=10, escalate_above=0.1)
    assert not watch.escalates(drifting=True)  # nothing measured yet
    for _ in range(20):
        watch.answered(0.6, 0.9)  # the cloud surer by 0.3
    assert not watch.escalates(drifting=False)  # clean traffic: the calibration decides
    assert all(watch.escalates(drifting=True) for _ in range(5))
    assert watch.escalations == 1 and watch.sent_by_escalation == 5 and watch.report()["escalated"]
    for _ in range(20):
        watch.answered(0.8, 0.85)  # everything sent now, the confident samples too: 0.05 still above 0
    assert watch.escalates(drifting=True)  # hysteresis: stays escalated above back_off_below
    assert not watch.escalates(drifting=False) and not watch.report()["escalated"]  # the drift is over
    for _ in range(20):
        watch.answered(0.8, 0.5)  # now the cloud is the worse one
    assert watch.backed_off and not watch.escalates(drifting=True)
    with pytest.raises(ValueError):
        CloudWatch(escalate_above=-0.5)


class ScriptedCloud:
    """Answers every offload of `device_id` with the edge's own top class and logits of a chosen spread:
    `confidence` near 0.1 is a cloud that knows nothing, near 1 one sure of itself."""

    def __init__(self, broker: BrokerProcess, topics: Topics, device_id: str, logit: float) -> None:
        address = broker.credentials("cloud")
        self.logit = logit
        self.answered = 0
        self.client = new_client(address, f"scripted-{uuid.uuid4().hex[:8]}")
        self.client.on_message = self._answer
        self.client.connect(address.host, address.port)
        self.client.subscribe(topics.offload(device_id), qos=1)
        self.client.loop_start()

    def _answer(self, client: Any, userdata: Any, message: Any) -> None:
        request = decode_offload(bytes(message.payload))
        logits = np.zeros(10, dtype=np.float32)
        logits[3] = self.logit
        reply = OffloadReply(request.run_id, request.device_id, request.seq, 3, logits, 0.1, "w-scripted")
        props = publish_properties(
            content_type=CONTENT_TYPE_REPLY, correlation_data=message.properties.CorrelationData, expiry_s=5
        )
        client.publish(message.properties.ResponseTopic, encode_reply(reply), qos=1, properties=props)
        self.answered += 1

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def _rows(db: Path, run_id: str) -> Dict[int, Dict[str, Any]]:
    with sqlite3.connect(db) as raw:
        raw.row_factory = sqlite3.Row
        rows = raw.execute("SELECT * FROM inferences WHERE run_id = ?", (run_id,)).fetchall()
    return {int(r["seq"]): dict(r) for r in rows}


@pytest.mark.integration
@pytest.mark.parametrize("logit, backs_off", [(0.0, True), (12.0, False)])
def test_an_agent_backs_off_a_cloud_that_is_not_better_and_labels_what_it_kept(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path, logit: float, backs_off: bool
) -> None:
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    cloud = ScriptedCloud(broker, topics, device_id, logit)
    config = quick_agent_config(
        broker,
        topics,
        tiny_models,
        tmp_path / "state",
        device_id=device_id,
        capacity_aware=False,
        cloud_watch=True,
    )
    n = 1200
    images = tiny_images(n, seed=31)
    agent = DeviceAgent(config).start()
    try:
        summary = agent.run_dataset([(image, i % 10) for i, image in enumerate(images)])
    finally:
        agent.close()
        cloud.close()
    wait_for(lambda: len(_rows(db, agent.run_id)) == n, 30, "every row stored")
    collector.stop()
    decisions = EdgeCascade(tiny_models).decide(images)
    complex_ = [i for i, d in enumerate(decisions) if d.complex]
    rows = _rows(db, agent.run_id)
    watch = summary.cloud_watch
    stages = [rows[i]["exit_stage"] for i in complex_]
    assert len(complex_) > 100 and summary.fallbacks == 0
    assert stages.count("cloud") == cloud.answered
    if backs_off:  # a uniform answer (0.1) is less sure than the edge: kept at the edge, flagged, no bytes
        assert watch["backed_off"] and watch["back_offs"] == 1 and watch["advantage"] < 0
        assert stages.count("shed") == watch["kept_at_edge"]
        # Offloads go on until 50 answers are back (pipelined: more than 50 may be in flight by then); from
        # the first one kept at the edge, all but the probe share (0.1) are.
        first = next(j for j, i in enumerate(complex_) if rows[i]["exit_stage"] == "shed")
        after = stages[first:]
        assert len(after) >= 50 and after.count("shed") >= 0.75 * len(after)
        for i in complex_:
            if rows[i]["exit_stage"] == "shed":
                assert rows[i]["bytes_up"] == 0 and rows[i]["prediction"] == decisions[i].prediction
        assert watch["probes"] > 0  # and it went on asking now and then
    else:
        assert (
            not watch["backed_off"] and watch["kept_at_edge"] == 0 and stages.count("cloud") == len(complex_)
        )


@pytest.mark.integration
def test_an_agent_whose_inputs_drift_sends_a_better_cloud_everything(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path
) -> None:
    from test_drift import with_reference

    from device_agent.drift import DriftSettings

    models = with_reference(tiny_models, tmp_path)
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    cloud = ScriptedCloud(broker, topics, device_id, 12.0)  # sure of itself: better, by the watch's measure
    config = quick_agent_config(
        broker,
        topics,
        models,
        tmp_path / "state",
        device_id=device_id,
        capacity_aware=False,
        cloud_watch=True,
        drift=DriftSettings(window=100, stride=25),
    )
    clean = tiny_images(400, seed=41)
    dark = tiny_images(400, seed=42) // 4  # the onset at sample 400: a dimmed scene
    images = np.concatenate([clean, dark])
    try:
        with DeviceAgent(config) as agent:
            summary = agent.run_dataset([(image, 0) for image in images])
            first_alarm = agent.drift.report()["first_alarm_seq"] if agent.drift is not None else None
            run_id = agent.run_id
        wait_for(lambda: len(_rows(db, run_id)) == len(images), 30, "every row stored")
    finally:
        cloud.close()
        collector.stop()
    rows = _rows(db, run_id)
    simple = [i for i, d in enumerate(EdgeCascade(models).decide(images)) if not d.complex]
    assert first_alarm is not None and 400 <= first_alarm < 500
    # The alarm's own sample already sees the verdict: its test runs before the offload decision.
    before = [rows[i]["exit_stage"] for i in simple if i < first_alarm]
    after = [rows[i]["exit_stage"] for i in simple if i >= first_alarm]
    assert before and "cloud" not in before  # clean: what the edge may answer, it answers
    assert len(after) >= 10 and set(after) == {"cloud"}  # drifting: the better cloud answers everything
    watch = summary.cloud_watch
    assert watch["escalations"] == 1 and watch["sent_by_escalation"] == len(after)
