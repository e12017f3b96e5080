"""What survives what (issue 13, points 1-3 and 12): a resumed run loses nothing, a SIGKILLed agent loses no
sample of its source, bad ids and bad settings are refused at the door with one clear line.

Everything runs the real `edgecascade agent` CLI against the session's Mosquitto and a real collector that
writes a SQLite file, on the tiny models and the Fashion-MNIST IDX files that `make setup` installs."""

from __future__ import annotations

import collections
import json
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List

import msgpack
import numpy as np
import pytest
from waiting import wait_for

from broker.launcher import BrokerProcess
from device_agent.sources import load_idx_dataset
from edgecascade.cli import main
from protocol.topics import Topics
from results_db import Collector, CollectorConfig

pytestmark = pytest.mark.integration
REPO = Path(__file__).resolve().parent.parent


def rows(db: Path, sql: str) -> List[Any]:
    if not db.exists():
        return []
    with sqlite3.connect(db, timeout=10) as raw:
        try:
            return raw.execute(sql).fetchall()
        except sqlite3.OperationalError:  # not migrated yet
            return []


@pytest.fixture
def site(broker: BrokerProcess, tmp_path: Path) -> Iterator[Dict[str, Any]]:
    """A topic namespace of its own, a collector writing `results.db`, and a device with a password file."""
    topics = Topics.namespaced(f"dur{uuid.uuid4().hex[:8]}")
    db = tmp_path / "results.db"
    collector = Collector(CollectorConfig(broker.credentials("collector"), topics, db, flush_ms=20)).start()
    device = f"cam-{uuid.uuid4().hex[:6]}"
    password = tmp_path / "device.pw"
    password.write_text(broker.credentials(device).password + "\n")
    yield {"topics": topics, "db": db, "device": device, "password": password, "collector": collector}
    collector.stop()


def agent_args(
    site: Dict[str, Any], broker: BrokerProcess, models: Path, state: Path, *extra: str
) -> List[str]:
    return [
        "agent",
        "--broker", f"{broker.host}:{broker.port}",
        "--device-id", site["device"],
        "--password-file", str(site["password"]),
        "--namespace", site["topics"].root.split("/")[0],
        "--models", str(models),
        "--policy", "edge-only",
        "--state-dir", str(state),
        "--idle-seconds", "0",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def test_a_run_resumed_with_its_run_id_twice_holds_every_record(
    broker: BrokerProcess, site: Dict[str, Any], tiny_models: Path, tmp_path: Path, capsys
) -> None:
    """Before: the energy-window counter restarted at 0, the outbox's batch keys collided with the first
    process's and whole batches were dropped as duplicates (852 of 1,000 rows, both runs exit 0)."""
    args = agent_args(
        site, broker, tiny_models, tmp_path / "state", "--source", "dataset:fashion-mnist:test:150"
    )
    for _ in range(2):
        assert main([*args, "--run-id", "resumed-run"]) == 0
        assert json.loads(capsys.readouterr().out)["outbox_left"] == {"record": 0, "offload": 0}
    db = site["db"]
    wait_for(lambda: rows(db, "SELECT samples FROM runs") == [(300,)], what="run_end with 300 samples")
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT seq) FROM inferences") == [(300, 300)]
    # two passes over the same 150 images: each label twice as often as in the first 150
    _, labels = load_idx_dataset("fashion-mnist", "test", 150)
    stored = collections.Counter(label for (label,) in rows(db, "SELECT label FROM inferences"))
    assert stored == collections.Counter({int(k): 2 * v for k, v in collections.Counter(labels).items()})
    windows = rows(db, "SELECT COUNT(*), COUNT(DISTINCT window_seq), SUM(samples) FROM energy_windows")
    assert windows[0][0] == windows[0][1] and windows[0][2] == 300  # every window of both processes
    assert rows(db, "SELECT COUNT(*) FROM rejected_records") == [(0,)]


def test_a_sigkilled_agent_loses_no_sample_of_its_dataset(
    broker: BrokerProcess, site: Dict[str, Any], tiny_models: Path, tmp_path: Path
) -> None:
    """The durability promise (README, Reliability): records in memory at a SIGKILL are redone by the next
    start with the same run id, because a source item counts as done only once its record is on disk."""
    n = 600
    args = agent_args(
        site, broker, tiny_models, tmp_path / "state", "--source", f"dataset:fashion-mnist:test:{n}"
    )
    args += ["--run-id", "killed-run", "--rate", "200"]
    command = [sys.executable, "-m", "edgecascade", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    db = site["db"]
    first = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_for(lambda: rows(db, "SELECT COUNT(*) FROM inferences")[:1] >= [(100,)], what="100 rows")
    finally:
        first.send_signal(signal.SIGKILL)
        first.communicate(timeout=30)
    assert first.returncode == -signal.SIGKILL
    killed_at = rows(db, "SELECT COUNT(*) FROM inferences")[0][0]
    assert killed_at < n  # killed mid-run, not after it
    second = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr
    wait_for(
        lambda: rows(db, "SELECT COUNT(*) FROM runs WHERE ended_unix IS NOT NULL") == [(1,)], what="run_end"
    )
    assert rows(db, "SELECT COUNT(*), COUNT(DISTINCT seq) FROM inferences") == [(n, n)]
    assert rows(db, "SELECT samples FROM runs") == [(n,)]
    summary = json.loads(second.stdout)
    assert summary["resumed_done"] >= 100 and summary["samples"] + summary["resumed_done"] == n
    images, labels = load_idx_dataset("fashion-mnist", "test", n)
    stored = collections.Counter(label for (label,) in rows(db, "SELECT label FROM inferences"))
    assert stored == collections.Counter(int(x) for x in labels)  # each image once: none lost, none twice
    assert np.unique(images.reshape(n, -1), axis=0).shape[0] == n  # (so the labels above are a fair check)


@pytest.mark.parametrize("length", [65, 200, 300])
def test_a_device_id_that_would_not_fit_everywhere_is_refused_at_the_door(
    length: int, tmp_path: Path, capsys
) -> None:
    """Before: 200 characters were stored on SQLite, refused by PostgreSQL's column and still receipted
    (200/200 rows lost, exit 0); 300 crashed the agent on its outbox file name."""
    code = main(
        [
            "agent",
            "--broker", "127.0.0.1:1",
            "--device-id", "d" * length,
            "--state-dir", str(tmp_path),
            "--source", "dataset:fashion-mnist:test:1",
        ]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert f"is {length} characters long, at most 64" in err and "Traceback" not in err
    assert not list(tmp_path.iterdir())  # refused before anything was written


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--source", "dataset:nope:test"], "dataset 'nope' not found"),
        (["--source", "dataset:fashion-mnist:validation"], "split must be one of"),
        (["--tls-ca", "/nonexistent/ca.crt"], "TLS CA certificate /nonexistent/ca.crt does not exist"),
        (["--deadline", "-1"], "offload_deadline_s must be a finite number > 0, got -1.0"),
        (["--deadline", "0"], "offload_deadline_s must be a finite number > 0, got 0.0"),
        (["--deadline", "nan"], "offload_deadline_s must be a finite number > 0, got nan"),
        (["--idle-seconds", "-5"], "idle_seconds must be a finite number >= 0"),
        (["--close-timeout", "inf"], "close_timeout_s must be a finite number >= 0"),
        (["--device-id", "cam/01"], "may hold only ASCII letters"),
        (["--device-id", "cloud"], "reserved for the cloud service"),
        (["--run-id", "r#1"], "run id 'r#1' may hold only"),
    ],
)
def test_bad_settings_exit_2_with_one_clear_line(
    extra: List[str], message: str, tmp_path: Path, capsys
) -> None:
    base = ["agent", "--broker", "127.0.0.1:1", "--device-id", "cam-01", "--state-dir", str(tmp_path)]
    if not any(a == "--source" for a in extra):
        base += ["--source", "dataset:fashion-mnist:test:1"]
    assert main([*base, *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_an_empty_password_file_is_named_in_the_error(tmp_path: Path, capsys) -> None:
    empty = tmp_path / "empty.pw"
    empty.write_text("\n")
    code = main(
        ["agent", "--broker", "127.0.0.1:1", "--device-id", "cam-01", "--password-file", str(empty),
         "--state-dir", str(tmp_path), "--source", "dataset:fashion-mnist:test:1"]
    )  # fmt: skip
    assert code == 2
    assert f"the password file {empty} is empty" in capsys.readouterr().err


def test_a_nan_threshold_in_the_model_card_is_refused(tiny_models: Path, tmp_path: Path, capsys) -> None:
    models = tmp_path / "models"
    models.mkdir()
    for path in tiny_models.iterdir():
        (models / path.name).write_bytes(path.read_bytes())
    card = json.loads((models / "card.json").read_text())
    card["thresholds"]["entropy_tau"] = float("nan")
    (models / "card.json").write_text(json.dumps(card))
    code = main(
        ["agent", "--broker", "127.0.0.1:1", "--device-id", "cam-01", "--models", str(models),
         "--state-dir", str(tmp_path / "s"), "--source", "dataset:fashion-mnist:test:1",
         "--connect-timeout", "0"]
    )  # fmt: skip
    assert code == 2
    assert "threshold entropy_tau must be in [0, 1], got nan" in capsys.readouterr().err


def test_a_run_where_every_sample_is_refused_exits_1(
    broker: BrokerProcess, site: Dict[str, Any], tiny_models: Path, tmp_path: Path, capsys, monkeypatch
) -> None:
    data = tmp_path / "data" / "tiny8"
    data.mkdir(parents=True)
    header = b"\0\0\x08\x03" + (5).to_bytes(4, "big") + (8).to_bytes(4, "big") * 2
    (data / "t10k-images-idx3-ubyte").write_bytes(header + bytes(5 * 64))  # 8x8: not the model's 28x28
    (data / "t10k-labels-idx1-ubyte").write_bytes(b"\0\0\x08\x01" + (5).to_bytes(4, "big") + bytes(5))
    monkeypatch.setenv("EDGECASCADE_DATA", str(tmp_path / "data"))
    code = main(agent_args(site, broker, tiny_models, tmp_path / "state", "--source", "dataset:tiny8:test"))
    assert code == 1
    captured = capsys.readouterr()
    assert json.loads(captured.out)["rejected_inputs"] == 5
    assert "no sample could be processed (0 failed, 5 not an image the model takes)" in captured.err


def test_a_broker_never_reached_exits_3_and_keeps_the_records(
    tiny_models: Path, tmp_path: Path, capsys
) -> None:
    from broker.launcher import find_free_port

    port = find_free_port()  # nobody listens there
    code = main(
        ["agent", "--broker", f"127.0.0.1:{port}", "--device-id", "cam-01", "--models", str(tiny_models),
         "--policy", "edge-only", "--state-dir", str(tmp_path), "--source", "dataset:fashion-mnist:test:20",
         "--idle-seconds", "0", "--connect-timeout", "0.5", "--close-timeout", "0.5", "--no-progress"]
    )  # fmt: skip
    assert code == 3
    captured = capsys.readouterr()
    from device_agent.outbox import Outbox

    box = Outbox(tmp_path / "outbox-cam-01.sqlite")
    kinds = collections.Counter(
        r["type"] for e in box.take("record", 1000) for r in msgpack.unpackb(e.payload)
    )
    box.close()
    # every inference, its energy window(s) (a loaded host may split 20 samples in two), run and run_end
    assert kinds["inference"] == 20 and kinds["run"] == kinds["run_end"] == 1 and kinds["energy_window"] >= 1
    assert json.loads(captured.out)["outbox_left"]["record"] == sum(kinds.values())
    assert f"broker 127.0.0.1:{port} or the collector not reached" in captured.err


def test_a_wrong_ca_is_an_error_at_once_not_a_broker_that_is_not_up_yet(
    tmp_path: Path, tiny_models: Path, capsys
) -> None:
    from broker.launcher import make_test_certs

    theirs, ours = make_test_certs(tmp_path / "server-ca"), make_test_certs(tmp_path / "other-ca")
    with BrokerProcess(tmp_path / "tls-broker", tls_dir=theirs) as tls:
        creds = tls.credentials("cam-01", tls=True)
        (tmp_path / "pw").write_text(creds.password)
        code = main(
            ["agent", "--broker", f"{creds.host}:{creds.port}", "--device-id", "cam-01",
             "--password-file", str(tmp_path / "pw"), "--tls-ca", str(ours / "ca.crt"),
             "--models", str(tiny_models), "--state-dir", str(tmp_path / "s"),
             "--source", "dataset:fashion-mnist:test:1"]
        )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "TLS with 127.0.0.1" in err and "CERTIFICATE_VERIFY_FAILED" in err


def test_a_login_the_broker_refuses_exits_2_at_once(
    broker: BrokerProcess, tiny_models: Path, tmp_path: Path, capsys
) -> None:
    """Before: "not reachable yet", then a run from the outbox that could never reach anyone, exit 0."""
    broker.credentials("cam-refused")  # the account exists; its password is not this one
    (tmp_path / "pw").write_text("not-the-password\n")
    started = time.monotonic()
    code = main(
        ["agent", "--broker", f"{broker.host}:{broker.port}", "--device-id", "cam-refused",
         "--password-file", str(tmp_path / "pw"), "--models", str(tiny_models),
         "--state-dir", str(tmp_path / "s"), "--source", "dataset:fashion-mnist:test:5",
         "--idle-seconds", "0"]
    )  # fmt: skip
    assert code == 2 and time.monotonic() - started < 8  # well before the 10 s connect timeout
    err = capsys.readouterr().err
    assert "refused 'cam-refused'" in err and ("not authorized" in err or "bad username or password" in err)
    # A refused start is no start of a run: under systemd's restarts it would push real runs out of the
    # device's memory of runs (durable.KEEP_RUNS).
    state = sqlite3.connect(tmp_path / "s" / "outbox-cam-refused.sqlite").execute("SELECT name FROM state")
    assert [name for (name,) in state if name.startswith(("started/", "seq/start/"))] == []


def test_the_collector_exits_2_on_a_refused_login(broker: BrokerProcess, tmp_path: Path, capsys) -> None:
    (tmp_path / "pw").write_text("wrong\n")
    code = main(
        ["collect", "--broker", f"{broker.host}:{broker.port}", "--password-file", str(tmp_path / "pw"),
         "--db", str(tmp_path / "r.db")]
    )  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err
    assert "refused 'collector'" in err and "Traceback" not in err


def test_records_the_collector_refused_are_reported_never_taken_for_stored(
    broker: BrokerProcess, tiny_models: Path, tmp_path: Path
) -> None:
    """A collector that keeps a batch in rejected_records says so in its receipt: the agent counts every such
    record and logs it, instead of reporting the run as stored (before: 200/200 rows lost, exit 0)."""
    from tinymodels import tiny_images

    from device_agent import AgentConfig, DeviceAgent
    from protocol import Receipt, decode_records, encode_receipt
    from protocol.mqtt import new_client, publish_properties

    topics = Topics.namespaced(f"rf{uuid.uuid4().hex[:8]}")
    device = f"cam-{uuid.uuid4().hex[:6]}"
    refusing = new_client(broker.credentials("collector"), f"refusing-{uuid.uuid4().hex[:6]}")

    def refuse(client: Any, userdata: Any, message: Any) -> None:
        n = len(decode_records(message.payload))
        props = publish_properties(correlation_data=message.properties.CorrelationData)
        client.publish(
            message.properties.ResponseTopic,
            encode_receipt(Receipt(0, n, "test: refused")),
            1,
            properties=props,
        )

    subscribed = threading.Event()
    refusing.on_message = refuse
    refusing.on_subscribe = lambda *_: subscribed.set()
    refusing.connect(broker.host, broker.port)
    refusing.subscribe(topics.results(device), qos=1)
    refusing.loop_start()
    assert subscribed.wait(10), "the refusing collector's SUBACK"
    try:
        config = AgentConfig(
            device_id=device,
            broker=broker.credentials(device),
            topics=topics,
            model_dir=tiny_models,
            state_dir=tmp_path,
            policy={"name": "edge-only"},
            meters=["estimate"],
            idle_seconds=0.0,
            flush_s=0.05,
        )
        with DeviceAgent(config) as agent:
            agent.run_dataset([(image, 1) for image in tiny_images(20)])
        final = agent.close()
    finally:
        refusing.loop_stop()
        refusing.disconnect()
    assert final.outbox_left == {"record": 0, "offload": 0}
    # 20 inferences, their energy window(s), run and run_end: all refused
    assert final.refused_records == 20 + agent.stats["windows"] + 2


def test_an_outbox_that_stays_full_stops_the_pass_with_outbox_full_and_loses_no_window(
    tiny_models: Path, tmp_path: Path, monkeypatch
) -> None:
    """The broker is gone for longer than the outbox lasts. Before: the full outbox killed the inference
    thread from inside its `finally` (run_dataset: "thread is gone"), after recording one energy window
    twice; close() then left the link, meter and outbox open."""
    from tinymodels import tiny_images

    from broker.launcher import find_free_port
    from device_agent import AgentConfig, DeviceAgent, inference
    from device_agent.outbox import Outbox, OutboxFull
    from protocol.mqtt import BrokerAddress

    monkeypatch.setattr(inference, "READY_BACKLOG", 16)  # the backlog at which the loop writes itself
    config = AgentConfig(
        device_id="cam-full",
        broker=BrokerAddress("127.0.0.1", find_free_port(), "cam-full", ""),  # nobody listens there
        model_dir=tiny_models,
        state_dir=tmp_path,
        policy={"name": "edge-only"},
        meters=["estimate"],
        idle_seconds=0.0,
        window_size=4,
        outbox_max_entries=3,
        outbox_wait_s=0.2,
        connect_timeout_s=0.2,
        close_timeout_s=0.2,
    )
    agent = DeviceAgent(config).start()
    try:
        with pytest.raises(OutboxFull):
            agent.run_dataset([(image, 1) for image in tiny_images(200)])
        assert agent._thread is not None and agent._thread.is_alive()  # the loop still serves
        sink = agent.settlement.sink
        with sink._flush_lock:  # not while the link thread's flush has them out, trying the outbox
            held = [f.key for f in sink._ready]
        assert len(held) == len(set(held)) and sum(k.startswith("energy_window/") for k in held) >= 1
    finally:
        with pytest.raises(OutboxFull):
            agent.close()  # run_end cannot be written either: said so, and everything is closed
    Outbox(tmp_path / "outbox-cam-full.sqlite").close()  # the lock was released with it
