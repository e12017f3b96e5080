"""Drift detection: the KS statistic and its p-value by hand, the monitor's false-alarm bound, the record,
the status and the views; end to end, an agent fed corrupted samples says so on its status topic and the
collector stores its tests (real Mosquitto, onnxruntime, SQLite; the views on PostgreSQL too)."""

from __future__ import annotations

import json
import shutil
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
from agents import quick_agent_config
from scipy import special, stats
from sqlalchemy import text
from tinymodels import tiny_images
from waiting import wait_for

from broker.launcher import BrokerProcess
from device_agent import DeviceAgent
from device_agent.card import load_card
from device_agent.drift import (
    INPUT_FEATURES,
    DriftMonitor,
    DriftProfileError,
    DriftReference,
    DriftSettings,
    feature_names,
    features,
    input_features,
    kolmogorov_sf,
    ks_pvalue,
    ks_statistic,
)
from device_agent.drift_watch import DriftWatch
from device_agent.policies import make_policy
from protocol.codec import ProtocolError
from protocol.mqtt import new_client
from protocol.records import DriftRecord, validate_record
from protocol.status import DeviceStatus, DriftStatus, decode_status, encode_status
from protocol.topics import Topics
from results_db import Collector, CollectorConfig
from results_db.database import open_database
from results_db.ingest import RecordWriter
from results_db.report import build_report
from results_db.synthetic import run_record
from training.drift_profile import card_text, write_reference


def uniform_reference(levels: int = 2) -> DriftReference:
    """One feature whose reference CDF is F(x) = x on [0, 1]."""
    return DriftReference(["x"], np.array([np.linspace(0.0, 1.0, levels)]), 10_000)


# -- the statistic, by hand --------------------------------------------------------------------------------
def test_ks_statistic_by_hand_against_a_continuous_reference() -> None:
    # F_window steps 1/3, 2/3, 1 at 0.1, 0.2, 0.9; F(x) = x. The gaps: |2/3 - 0.2| at 0.2 is the largest.
    d = ks_statistic(np.array([0.1, 0.2, 0.9]), uniform_reference(), 0)
    assert d == pytest.approx(2 / 3 - 0.2)
    # From the left: a window all above the reference's mass, F_window(0.8-) = 0 vs F(0.8) = 0.8.
    assert ks_statistic(np.array([0.8, 0.8]), uniform_reference(), 0) == pytest.approx(0.8)


def test_ks_statistic_by_hand_with_a_point_mass_in_the_reference() -> None:
    # Quantiles 0, 0, 0, 0.5, 1 at levels 0 .. 1: half the mass at 0, then linear to 0.5 at 0.75 and 1 at 1.
    ref = DriftReference(["x"], np.array([[0.0, 0.0, 0.0, 0.5, 1.0]]), 1000)
    right, left = ref.cdf(0, np.array([0.0, 0.75]))
    assert list(right) == [0.5, 0.875] and list(left) == [0.0, 0.875]
    # window 0, 0, 0.75: at 0 |2/3 - 1/2| = 1/6; just below 0.75 |2/3 - 0.875| = 5/24, the largest.
    assert ks_statistic(np.array([0.0, 0.0, 0.75]), ref, 0) == pytest.approx(5 / 24)


def test_ks_statistic_agrees_with_scipy_on_a_stored_reference() -> None:
    rng = np.random.default_rng(3)
    reference_values = rng.normal(size=(5000, 1))
    ref = DriftReference.of(reference_values, ["x"], levels=201)
    for shift in (0.0, 0.2, 0.5):
        window = np.sort(rng.normal(shift, 1.0, 300))
        exact = stats.ks_2samp(window, reference_values[:, 0]).statistic
        # The stored profile is the reference at 0.5 % steps of its CDF, linear between them.
        assert ks_statistic(window, ref, 0) == pytest.approx(exact, abs=0.006)


def test_kolmogorov_tail_and_the_two_sample_p_value() -> None:
    for lam in (0.3, 0.5, 1.0, 1.36, 2.0, 3.0):
        assert kolmogorov_sf(lam) == pytest.approx(special.kolmogorov(lam), rel=1e-9, abs=1e-15)
    assert kolmogorov_sf(1.0) == pytest.approx(0.2699996716735, rel=1e-9)  # tabulated Q_KS(1)
    assert kolmogorov_sf(0.1) == 1.0 and 0.0 < kolmogorov_sf(10.0) < 1e-80
    # n = 300, m = 5000: ne = 283.0189, sqrt 16.8232; Stephens: (16.8232 + 0.12 + 0.11 / 16.8232) x 0.1
    lam = (np.sqrt(300 * 5000 / 5300) + 0.12 + 0.11 / np.sqrt(300 * 5000 / 5300)) * 0.1
    assert lam == pytest.approx(1.69497, abs=1e-4)
    assert ks_pvalue(0.1, 300, 5000) == pytest.approx(special.kolmogorov(lam), rel=1e-9)
    # Close to scipy's exact two-sample p-value at these sizes.
    assert ks_pvalue(0.1, 300, 5000) == pytest.approx(stats.kstwo.sf(0.1, 283), rel=0.1)


def test_the_per_test_level_bounds_false_alarms_over_the_horizon() -> None:
    settings = DriftSettings()
    assert settings.level(11) == pytest.approx(0.01 * 50 / (100_000 * 11))
    # The test itself is calibrated: windows from the reference's distribution reject at their level
    # (within Monte Carlo error: 2,000 windows, one fixed stored reference, as on a device).
    rng = np.random.default_rng(5)
    ref = DriftReference.of(rng.random((5000, 1)), ["x"])
    p = np.array([ks_pvalue(ks_statistic(np.sort(rng.random(300)), ref, 0), 300, 5000) for _ in range(2000)])
    assert abs(np.mean(p < 0.05) - 0.05) < 0.015 and abs(np.mean(p < 0.2) - 0.2) < 0.03


def test_the_monitor_tests_each_stride_once_full_and_flags_a_shift_only() -> None:
    rng = np.random.default_rng(7)
    probs = rng.dirichlet(np.full(4, 0.5), size=5000).astype(np.float32)
    ref = DriftReference.of(features(probs), feature_names(4))
    monitor = DriftMonitor(ref, DriftSettings(window=100, stride=25))
    clean = rng.dirichlet(np.full(4, 0.5), size=3000).astype(np.float32)
    checks = [c for i, row in enumerate(clean) if (c := monitor.observe(row, i)) is not None]
    assert [c.seq for c in checks[:3]] == [99, 124, 149] and len(checks) == 1 + (3000 - 100) // 25
    assert monitor.alarms == 0 and monitor.report()["drifting"] is False
    shifted = rng.dirichlet([4.0, 0.5, 0.5, 0.5], size=200).astype(np.float32)  # class 0 takes over
    found = [c for i, row in enumerate(shifted, 3000) if (c := monitor.observe(row, i)) is not None]
    first = next(c for c in found if c.drift)
    assert first.seq - 3000 < 100 and first.feature in ("p0", "confidence") and first.p_value < first.level
    assert monitor.report()["first_alarm_seq"] == first.seq


def test_input_features_by_hand() -> None:
    image = np.zeros((1, 1, 28, 28), dtype=np.uint8)
    image[0, 0, 4:24, 12:16] = 200  # an upright bar in the middle: 80 of 784 pixels lit
    mean, contrast, edges, dark, offcentre, tilt = input_features(image)[0]
    assert mean == pytest.approx(80 * 200 / 255 / 784) and dark == pytest.approx(1 - 80 / 784)
    assert contrast > 0 and edges > 0 and offcentre == pytest.approx(0.0, abs=1e-9)
    assert tilt == pytest.approx(0.0, abs=1e-9)  # symmetric about both axes
    shifted = np.roll(image, 3, axis=3)
    assert input_features(shifted)[0, 4] == pytest.approx(3 / 28)  # 3 px right of centre
    lifted = (image.astype(np.int16) + 50).astype(np.uint8)  # a grey background
    assert input_features(lifted)[0, 3] == 0.0 and input_features(lifted)[0, 0] > mean
    diagonal = np.zeros_like(image)
    for i in range(4, 24):
        diagonal[0, 0, i, i - 1 : i + 2] = 200
    assert abs(input_features(diagonal)[0, 5]) > 0.3  # a 45-degree bar: half its spread is shared
    with pytest.raises(DriftProfileError):
        input_features(image[0])  # one image without its batch axis


def test_a_monitor_watching_the_inputs_flags_what_the_outputs_do_not_see() -> None:
    # The same class outputs throughout: only the images change (a brightness lift the model shrugs off).
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.full(4, 0.5), size=5000).astype(np.float32)
    images = rng.integers(0, 120, size=(5000, 1, 8, 8), dtype=np.uint8)
    images[:, :, :, :3] = 0  # some black background, as the profile's images have
    names = feature_names(4, inputs=True)
    assert names[-len(INPUT_FEATURES) :] == INPUT_FEATURES
    ref = DriftReference.of(features(probs, images), names)
    monitor = DriftMonitor(ref, DriftSettings(window=100, stride=25))
    assert monitor.watches_inputs
    stream = rng.integers(0, 120, size=(600, 1, 8, 8), dtype=np.uint8)
    stream[:, :, :, :3] = 0
    stream[300:] += 40  # the onset
    found = []
    for i in range(600):
        check = monitor.observe(probs[i], i, stream[i])
        if check is not None:
            found.append(check)
    assert not any(c.drift for c in found if c.seq < 300)
    first = next(c for c in found if c.drift)
    assert 300 <= first.seq < 400 and first.feature.startswith("input_")
    with pytest.raises(DriftProfileError, match="needs each image"):
        monitor.observe(probs[0], 600)
    outputs_only = DriftMonitor(DriftReference.of(features(probs), feature_names(4)))
    assert not outputs_only.watches_inputs and outputs_only.observe(probs[0], 0) is None


def test_settings_and_references_are_checked() -> None:
    for bad in (dict(window=5), dict(stride=0), dict(stride=400), dict(alpha=0.0), dict(horizon=10)):
        with pytest.raises(ValueError):
            DriftSettings(**bad)  # type: ignore[arg-type]
    with pytest.raises(DriftProfileError):
        DriftReference(["x"], np.array([[0.5, 0.2]]), 100)  # decreasing
    ref = DriftReference.of(np.random.default_rng(1).random((500, 2)), ["a", "b"], levels=11, source="s")
    again = DriftReference.from_card({"drift_reference": json.loads(json.dumps(ref.to_json()))})
    assert again is not None and again.features == ["a", "b"] and again.samples == 500
    assert np.allclose(again.quantiles, ref.quantiles, rtol=1e-5)
    assert DriftReference.from_card({}) is None


def test_the_drift_bench_counts_samples_from_the_onset_at_each_phase() -> None:
    from bench.drift_bench import TARGET_SAMPLES, flag_corruption

    rng = np.random.default_rng(11)
    ref = DriftReference.of(features(rng.dirichlet(np.full(4, 0.5), size=5000)), feature_names(4))
    clean = rng.dirichlet(np.full(4, 0.5), size=1000).astype(np.float32)
    shifted = rng.dirichlet([4.0, 0.5, 0.5, 0.5], size=1000).astype(np.float32)
    flagged = flag_corruption(ref, DriftSettings(window=100, stride=25), clean, shifted, [400, 410])
    first, second = flagged.samples_to_flag
    assert first is not None and second is not None and 0 < first <= 100 and 0 < second <= 100
    assert (400 + first - 1) % 25 == 24 and (410 + second - 1) % 25 == 24  # a test ends at each flag
    assert flagged.alarms_before_onset == 0 and flagged.met and flagged.worst <= TARGET_SAMPLES
    unflagged = flag_corruption(ref, DriftSettings(window=100, stride=25), clean, clean, [400])
    assert unflagged.samples_to_flag == [None] and not unflagged.met


# -- record, status, card ----------------------------------------------------------------------------------
def drift_record(
    seq: int, drift: int, p: float = 0.5, run_id: str = "run-d", device: str = "dev-d"
) -> Dict[str, Any]:
    return DriftRecord(run_id, device, seq, seq + 1, 300, 0.1, "p3", p, 4.5e-7, drift, 1000.0 + seq).to_map()


def test_drift_records_are_validated() -> None:
    assert validate_record(drift_record(299, 1, 1e-9))["drift"] == 1
    for field, value in (
        ("drift", 2),
        ("drift", True),
        ("p_value", 1.5),
        ("feature", ""),
        ("window_size", 0),
    ):
        with pytest.raises(ProtocolError):
            validate_record({**drift_record(299, 0), field: value})


def test_status_round_trips_and_old_agents_words_still_decode() -> None:
    verdict = DriftStatus(True, 349, 399, 1e-12, "confidence", 1234.5, 2)
    for status in (DeviceStatus("online"), DeviceStatus("offline"), DeviceStatus("online", verdict)):
        assert decode_status(encode_status(status)) == status
    assert decode_status(b"online") == DeviceStatus("online")
    for bad in (b"{}", b"nonsense", b'{"v":1,"state":"lost"}', b'{"v":1,"state":"online","drift":{}}'):
        with pytest.raises(ProtocolError):
            decode_status(bad)


def test_the_committed_card_carries_a_reference_the_agent_can_use() -> None:
    card = load_card(Path(__file__).resolve().parent.parent / "models" / "fashion-mnist")
    ref = DriftReference.from_card(card.raw)
    assert ref is not None and ref.features == feature_names(card.num_classes, inputs=True)
    assert ref.samples == 5000
    assert "validation" in ref.source and "seed 0" in ref.source
    assert json.loads(card_text(card.raw)) == card.raw  # one line per quantile row, the same JSON


def test_a_policy_that_runs_nothing_on_the_device_is_not_watched(tiny_models: Path, tmp_path: Path) -> None:
    models = with_reference(tiny_models, tmp_path)
    card = load_card(models)
    kw: Dict[str, Any] = dict(run_id="r", device_id="d", sink=None, link=None)
    assert (
        DriftWatch.for_agent(DriftSettings(), card, make_policy({"name": "cloud-only"}, card), **kw) is None
    )
    assert DriftWatch.for_agent(None, card, make_policy({"name": "edge-only"}, card), **kw) is None
    assert DriftWatch.for_agent(DriftSettings(), card, make_policy({"name": "edge-only"}, card), **kw)
    assert (
        DriftWatch.for_agent(
            DriftSettings(), load_card(tiny_models), make_policy({"name": "edge-only"}, card), **kw
        )
        is None
    )


# -- SQL: the table and the view on SQLite and PostgreSQL --------------------------------------------------
def test_drift_tests_are_stored_once_and_the_timeline_marks_onsets(db_url: str, tmp_path: Path) -> None:
    engine = open_database(db_url)
    writer = RecordWriter(engine)
    verdicts = [0, 0, 1, 1, 0, 1]
    records = [run_record("run-d", "dev-d")] + [
        drift_record(299 + 50 * i, d, 1e-9 if d else 0.3) for i, d in enumerate(verdicts)
    ]
    assert writer.write(records).inserted == len(verdicts)
    again = writer.write(records)
    assert (again.inserted, again.duplicates) == (0, len(verdicts))
    with engine.connect() as connection:
        rows = connection.execute(
            text("SELECT seq, drift, alarms_so_far, onset, policy FROM drift_timeline ORDER BY seq")
        ).all()
    assert [tuple(r)[1:4] for r in rows] == [(0, 0, 0), (0, 0, 0), (1, 1, 1), (1, 2, 0), (0, 2, 0), (1, 3, 1)]
    assert rows[0].policy == "meanet"
    result = build_report(engine, tmp_path / "report")
    page = result.files["report"].read_text()
    assert "## Drift" in page and "| dev-d | run-d | meanet | 6 | 3 | 2 | 399 |" in page
    assert result.files["drift"].exists()
    engine.dispose()


# -- end to end --------------------------------------------------------------------------------------------
def with_reference(tiny_models: Path, tmp_path: Path) -> Path:
    """The tiny models with a drift reference of clean tiny images (uniform noise)."""
    models = tmp_path / "models"
    if not models.exists():
        shutil.copytree(tiny_models, models)
        write_reference(models, tiny_images(3000, seed=40), "tiny images, seed 40")
    return models


class StatusTap:
    def __init__(self, broker: BrokerProcess, topics: Topics, device_id: str) -> None:
        self.seen: List[DeviceStatus] = []
        self._lock = threading.Lock()
        subscribed = threading.Event()
        self.client = new_client(broker.credentials("collector"), f"tap-{uuid.uuid4().hex[:8]}")
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.on_message = self._on_message
        self.client.on_connect = lambda c, *a: c.subscribe(topics.status(device_id), qos=1)
        address = broker.credentials("collector")
        self.client.connect(address.host, address.port)
        self.client.loop_start()
        assert subscribed.wait(10), "tap not subscribed"

    def _on_message(self, client: Any, userdata: Any, message: Any) -> None:
        with self._lock:
            self.seen.append(decode_status(bytes(message.payload)))

    def drifting(self) -> bool:
        with self._lock:
            return any(s.drift is not None and s.drift.drifting for s in self.seen)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.mark.integration
def test_an_agent_fed_corrupted_samples_reports_drift_on_its_status_and_the_collector_stores_it(
    broker: BrokerProcess, topics: Topics, tiny_models: Path, tmp_path: Path
) -> None:
    models = with_reference(tiny_models, tmp_path)
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    device_id = f"dev-{uuid.uuid4().hex[:8]}"
    tap = StatusTap(broker, topics, device_id)
    config = quick_agent_config(
        broker,
        topics,
        models,
        tmp_path / "state",
        device_id=device_id,
        policy={"name": "edge-only", "params": {}},
        drift=DriftSettings(window=100, stride=25),
    )
    clean = tiny_images(300, seed=41)
    dark = clean // 4  # a dimmed scene: every pixel a quarter as bright
    try:
        with DeviceAgent(config) as agent:
            agent.run_dataset([(image, 0) for image in clean])
            wait_for(lambda: any(s.drift is not None for s in tap.seen), 20, "a status with a drift verdict")
            assert not tap.drifting()  # the same distribution as the reference
            agent.run_dataset([(image, 0) for image in dark])
            wait_for(tap.drifting, 20, "drift on the status topic")
            report = agent.drift.report() if agent.drift is not None else {}
            run_id = agent.run_id
        final = tap.seen[-1]
        assert final.state == "offline"
        wait_for(
            lambda: _drift_rows(db, run_id) == 1 + (600 - 100) // 25, 30, "every drift test in the database"
        )
    finally:
        tap.close()
        collector.stop()
    rows = _rows(db, run_id)
    assert report["alarms"] == sum(r["drift"] for r in rows.values()) > 0
    first = min(seq for seq, r in rows.items() if r["drift"])
    assert 300 <= first < 400 and report["first_alarm_seq"] == first  # within a window of the onset
    assert all(not r["drift"] for seq, r in rows.items() if seq < 300)  # no false alarm on clean samples
    with sqlite3.connect(db) as raw:
        onsets = raw.execute(
            "SELECT seq FROM drift_timeline WHERE run_id = ? AND onset = 1", (run_id,)
        ).fetchall()
        run_end = raw.execute("SELECT samples FROM runs WHERE run_id = ?", (run_id,)).fetchone()
    assert onsets[0][0] == first and run_end == (600,)


def _drift_rows(db: Path, run_id: str) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as raw:
        try:
            return int(
                raw.execute("SELECT COUNT(*) FROM drift_checks WHERE run_id = ?", (run_id,)).fetchone()[0]
            )
        except sqlite3.OperationalError:  # the collector has not made its schema yet
            return 0


def _rows(db: Path, run_id: str) -> Dict[int, Dict[str, Any]]:
    with sqlite3.connect(db) as raw:
        raw.row_factory = sqlite3.Row
        return {
            r["seq"]: dict(r) for r in raw.execute("SELECT * FROM drift_checks WHERE run_id = ?", (run_id,))
        }
