"""The results schema as SQLAlchemy 2.0 typed ORM classes.

One row per result record (see `protocol.records`): `inferences` has one column per field of the
`inference` record; `energy_windows` and `idle_baselines` keep what the meters produced, unchanged. Natural
keys are unique so that a re-delivered batch writes nothing twice. Timestamps are Unix seconds (float), as the
devices send them, so that SQLite and PostgreSQL store and compare the very same numbers.

The Alembic migrations in `results_db/migrations/` create this schema; a test checks they match these classes.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    Double,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from protocol.records import EXIT_STAGES, FRAME_SOURCES, MAX_FEATURE_LEN

# Deterministic constraint names: the same on SQLite and PostgreSQL, and what Alembic compares against.
NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# JSONB on PostgreSQL (indexable, compact), JSON text elsewhere.
JsonMap = JSON().with_variant(JSONB(), "postgresql")
JsonList = JsonMap  # the same column type, for lists (a frame's boxes)
# SQLite only auto-assigns `INTEGER PRIMARY KEY` (the rowid); PostgreSQL gets a 64-bit identity.
RowId = BigInteger().with_variant(Integer(), "sqlite")

ID_LEN = 128  # device and run ids; the topic layer forbids only a few characters
SHORT_LEN = 32  # exit stages, energy sources


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {
        float: Double(),
        str: String(ID_LEN),
        Dict[str, Any]: JsonMap,
    }


class Device(Base):
    """A device that published results; first and last time the collector heard of it."""

    __tablename__ = "devices"

    device_id: Mapped[str] = mapped_column(primary_key=True)
    profile: Mapped[Optional[str]] = mapped_column(String(64))
    host: Mapped[Optional[Dict[str, Any]]]
    first_seen_unix: Mapped[float]
    last_seen_unix: Mapped[float]


class Run(Base):
    """One benchmark run of one policy on one device.

    A row can exist before its `run` record arrives (an inference referenced it first); the announced
    fields stay NULL until then.
    """

    __tablename__ = "runs"

    run_id: Mapped[str] = mapped_column(primary_key=True)
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    policy: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    policy_params: Mapped[Optional[Dict[str, Any]]]
    profile: Mapped[Optional[str]] = mapped_column(String(64))
    dataset: Mapped[Optional[str]] = mapped_column(String(64))
    split: Mapped[Optional[str]] = mapped_column(String(32))
    model_sha256: Mapped[Optional[str]] = mapped_column(String(64), index=True)
    code_revision: Mapped[Optional[str]] = mapped_column(String(64))
    host: Mapped[Optional[Dict[str, Any]]]
    started_unix: Mapped[Optional[float]]
    ended_unix: Mapped[Optional[float]]
    samples: Mapped[Optional[int]] = mapped_column(BigInteger)  # as announced by run_end


_STAGES_SQL = ", ".join(f"'{s}'" for s in EXIT_STAGES)
_FRAME_SOURCES_SQL = ", ".join(f"'{s}'" for s in FRAME_SOURCES)


class Inference(Base):
    """One sample's outcome: every field of the `inference` record."""

    __tablename__ = "inferences"
    __table_args__ = (
        UniqueConstraint("run_id", "device_id", "seq"),
        CheckConstraint(f"exit_stage IN ({_STAGES_SQL})", name="exit_stage"),
        # Per-device time series (offload fraction per hour, devices by energy) without a table scan.
        Index(None, "device_id", "ts_unix"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    label: Mapped[Optional[int]] = mapped_column(Integer)
    prediction: Mapped[int] = mapped_column(Integer)
    exit_stage: Mapped[str] = mapped_column(String(16))
    p_main: Mapped[Optional[float]]
    p_ext: Mapped[Optional[float]]
    p_cloud: Mapped[Optional[float]]
    edge_ms: Mapped[float]
    network_ms: Mapped[Optional[float]]
    cloud_ms: Mapped[Optional[float]]
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    device_j_gross: Mapped[Optional[float]]
    device_j_net: Mapped[Optional[float]]
    device_j_analytic: Mapped[Optional[float]]
    cloud_j: Mapped[Optional[float]]
    energy_source: Mapped[str] = mapped_column(String(SHORT_LEN))
    ts_unix: Mapped[float]
    # The model the sample was answered with; a run's model_sha256 cannot say it across a hot swap.
    model_version: Mapped[Optional[str]] = mapped_column(String(64))
    # The fault hierarchy's gateway tier (migration 0009): its max-softmax, model time, joules.
    p_gateway: Mapped[Optional[float]]
    gateway_ms: Mapped[Optional[float]]
    gateway_j: Mapped[Optional[float]]


class EnergyWindow(Base):
    """A meter window as the device measured it (joules per rail, duration, sample counts)."""

    __tablename__ = "energy_windows"
    __table_args__ = (UniqueConstraint("run_id", "device_id", "window_seq"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    window_seq: Mapped[int] = mapped_column(BigInteger)
    source: Mapped[str] = mapped_column(String(SHORT_LEN))
    rails: Mapped[Dict[str, Any]]
    start_unix: Mapped[float]
    end_unix: Mapped[float]
    samples: Mapped[int] = mapped_column(Integer)  # inferences in the window
    meter_samples: Mapped[int] = mapped_column(Integer)  # meter readings in the window
    idle_w: Mapped[Optional[float]]
    gross_j: Mapped[float]
    net_j: Mapped[Optional[float]]


class IdleBaseline(Base):
    """The idle power a device measured before a run (per rail, watts)."""

    __tablename__ = "idle_baselines"
    __table_args__ = (UniqueConstraint("run_id", "device_id", "source", "measured_unix"),)

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    source: Mapped[str] = mapped_column(String(SHORT_LEN))
    rails: Mapped[Dict[str, Any]]
    duration_s: Mapped[float]
    idle_w: Mapped[float]
    measured_unix: Mapped[float]


class RejectedRecord(Base):
    """A record the collector could not store where it belongs, kept with the reason instead of dropped:
    malformed (NaN, bad ids, missing fields), for another device's run, or conflicting with a stored row of
    the same key. `record` is the record as it came (msgpack; an undecodable message's whole payload).
    `digest` keys it by topic and content, so a re-delivered one is kept once (NULL: a later copy stored
    before migration 0004)."""

    __tablename__ = "rejected_records"

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    received_unix: Mapped[float]
    topic: Mapped[str] = mapped_column(Text)  # unbounded: whatever arrived must fit
    device_id: Mapped[Optional[str]] = mapped_column(Text, index=True)  # the topic's device, when it has one
    kind: Mapped[Optional[str]] = mapped_column(Text)  # the record's type, when it has one
    reason: Mapped[str] = mapped_column(Text)
    record: Mapped[bytes] = mapped_column(LargeBinary)
    # sha256 of topic and record (ingest.rejected_digest): a re-delivered refusal is kept once
    digest: Mapped[Optional[str]] = mapped_column(String(64), index=True, unique=True)


class Frame(Base):
    """One video frame's output on a device (REACT): every field of the `frame` record."""

    __tablename__ = "frames"
    __table_args__ = (
        UniqueConstraint("run_id", "device_id", "seq"),
        CheckConstraint(f"source IN ({_FRAME_SOURCES_SQL})", name="source"),
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    sequence: Mapped[int] = mapped_column(Integer)
    frame: Mapped[int] = mapped_column(Integer)
    source: Mapped[str] = mapped_column(String(16))
    boxes: Mapped[List[Any]] = mapped_column(JsonList)
    edge_ms: Mapped[float]
    sent: Mapped[int] = mapped_column(Integer)
    bytes_up: Mapped[int] = mapped_column(BigInteger)
    bytes_down: Mapped[int] = mapped_column(BigInteger)
    answer_frame: Mapped[Optional[int]] = mapped_column(Integer)
    answer_ms: Mapped[Optional[float]]
    cloud_ms: Mapped[Optional[float]]
    device_j_gross: Mapped[Optional[float]]
    device_j_net: Mapped[Optional[float]]
    device_j_analytic: Mapped[Optional[float]]
    energy_source: Mapped[str] = mapped_column(String(SHORT_LEN))
    ts_unix: Mapped[float]


class VideoRun(Base):
    """A video run's accuracy against its ground truth (pycocotools), written by the benchmark
    (`bench.video_eval.evaluate_run`): the method and its parameters, mAP@0.5 and mAP@0.5:0.95."""

    __tablename__ = "video_runs"

    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"), primary_key=True)
    method: Mapped[str] = mapped_column(String(32))
    detect_every: Mapped[Optional[int]] = mapped_column(Integer)
    cloud_every: Mapped[Optional[int]] = mapped_column(Integer)
    delay_ms: Mapped[float]
    frames: Mapped[int] = mapped_column(Integer)
    images_evaluated: Mapped[int] = mapped_column(Integer)
    map50: Mapped[float]
    map: Mapped[float]
    ground_truth: Mapped[str] = mapped_column(Text)
    evaluated_unix: Mapped[float]


class DriftCheck(Base):
    """One test of a device's drift monitor (the `drift` record): its window against the model card's
    profile, the most significant feature's KS statistic and p-value, and whether that was drift."""

    __tablename__ = "drift_checks"
    __table_args__ = (
        UniqueConstraint("run_id", "device_id", "seq"),
        CheckConstraint("drift IN (0, 1)", name="drift"),
        Index(None, "device_id", "ts_unix"),  # drift per device over time
    )

    id: Mapped[int] = mapped_column(RowId, primary_key=True, autoincrement=True)
    run_id: Mapped[str] = mapped_column(ForeignKey("runs.run_id", ondelete="CASCADE"))
    device_id: Mapped[str] = mapped_column(ForeignKey("devices.device_id"))
    seq: Mapped[int] = mapped_column(BigInteger)
    samples: Mapped[int] = mapped_column(BigInteger)
    window_size: Mapped[int] = mapped_column(Integer)
    statistic: Mapped[float]
    feature: Mapped[str] = mapped_column(String(MAX_FEATURE_LEN))
    p_value: Mapped[float]
    level: Mapped[float]
    drift: Mapped[int] = mapped_column(Integer)
    ts_unix: Mapped[float]
