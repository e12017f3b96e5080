"""Model rollout over the real broker: signed versions delivered in chunks, verified on the device, swapped in
between two samples; bad signatures, tampered and truncated files refused while the old model keeps serving;
the canary watch rolls a version back when its agreement with the cloud falls; only the operator publishes.

Real Mosquitto (the project's ACL and roles), real onnxruntime on the tiny models, a real collector into a
SQLite file, the real `edgecascade models` CLI for the canary."""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import uuid
from pathlib import Path
from typing import Any, Iterator, List, Tuple

import numpy as np
import pytest
from agents import quick_agent_config
from tinymodels import tiny_images, write_tiny_model_dir
from waiting import wait_for

from broker.launcher import BrokerProcess
from cloud_worker import CloudWorker, WorkerConfig
from device_agent import DeviceAgent
from device_agent.cascade import EdgeCascade
from device_agent.model_store import model_version_of
from device_agent.rollout import RolloutSettings
from edgecascade.cli import main as cli_main
from edgecascade.rollout.bundles import Bundle, build_bundle
from edgecascade.rollout.keys import keygen, load_private_key
from edgecascade.rollout.operator import Operator, RolloutError
from protocol import ProtocolError
from protocol.bundle import BundleError, decode_signed, sign
from protocol.status import Agreement, DeviceStatus, ModelStatus, decode_status, encode_status
from protocol.topics import Topics
from results_db import Collector, CollectorConfig

pytestmark = pytest.mark.integration

ALL_OFFLOADED = {"hi_theta": 1.0}  # hi-threshold offloads every sample: each one is an agreement check


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Tuple[Any, Path]:
    """(the signing key, the public key file a device trusts)."""
    private, public = keygen(tmp_path_factory.mktemp("keys"))
    assert private.stat().st_mode & 0o077 == 0  # the private key is the operator's alone
    return load_private_key(private), public


@pytest.fixture(scope="module")
def other_key(tmp_path_factory: pytest.TempPathFactory) -> Any:
    private, _ = keygen(tmp_path_factory.mktemp("other-keys"))
    return load_private_key(private)


@pytest.fixture(scope="module")
def v2_models(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another version of the tiny models (other weights): its answers differ from v1's."""
    return write_tiny_model_dir(tmp_path_factory.mktemp("tiny-v2"), seed=1)


@pytest.fixture
def cloud(broker: BrokerProcess, topics: Topics, tiny_models: Path) -> Iterator[CloudWorker]:
    worker = CloudWorker(
        WorkerConfig(
            broker.credentials("cloud"), topics, tiny_models / "cloud.onnx", f"w{uuid.uuid4().hex[:6]}"
        )
    )
    worker.start()
    yield worker
    worker.stop()


def operator(broker: BrokerProcess, topics: Topics) -> Operator:
    return Operator(broker.credentials("operator"), topics, timeout_s=10.0)


def follow(broker: BrokerProcess, topics: Topics, models: Path, tmp: Path, public: Path, **kw: Any) -> Any:
    """A quick agent config that follows group `g` (or `group=`), trusting `public`."""
    rollout = RolloutSettings(kw.pop("group", "g"), public, download_timeout_s=kw.pop("timeout_s", 30.0))
    kw.setdefault("policy", {"name": "edge-only", "params": {}})
    kw.setdefault("results_receipts", False)  # without a collector, records leave the outbox on PUBACK
    return quick_agent_config(broker, topics, models, tmp / "state", rollout=rollout, **kw)


def images(n: int, seed: int) -> np.ndarray:
    return tiny_images(n, seed)


def refusals_logged(caplog: pytest.LogCaptureFixture) -> List[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("refused model version")]


# -- the format -----------------------------------------------------------------------------------------
def test_a_signed_manifest_verifies_and_any_change_to_it_does_not(
    keys: Tuple[Any, Path], other_key: Any, tiny_models: Path
) -> None:
    from device_agent.rollout import load_public_key

    private, public_file = keys
    public = load_public_key(public_file)
    bundle = build_bundle(tiny_models, "v1", private, chunk_bytes=4096)
    assert [f.name for f in bundle.signed.manifest.files] == [
        "card.json",
        "MODEL_CARD.md",
        "main.onnx",
        "extension.onnx",
    ]  # the device's blocks only: cloud.onnx stays with the cloud worker
    assert decode_signed(bundle.signed.payload, public).manifest == bundle.signed.manifest
    altered = bundle.signed.payload.replace(b'\\"version\\":\\"v1\\"', b'\\"version\\":\\"v9\\"')
    assert altered != bundle.signed.payload
    with pytest.raises(BundleError, match="altered after signing"):
        decode_signed(altered, public)
    foreign = build_bundle(tiny_models, "v1", other_key).signed.payload
    with pytest.raises(BundleError, match="signed by key"):
        decode_signed(foreign, public)
    with pytest.raises(ValueError, match="key_id"):  # a manifest names the key that signs it
        sign(bundle.signed.manifest, other_key)
    with pytest.raises(BundleError, match="not JSON"):
        decode_signed(b"\xff" * 10, public)
    with pytest.raises(ValueError, match="model version"):
        build_bundle(tiny_models, "../v1", private)


def test_the_status_carries_the_model_version_and_its_agreement_and_refuses_nonsense() -> None:
    current, previous = Agreement("v2", 0.25, 40), Agreement("v1", 0.9, 200)
    status = DeviceStatus("online", None, ModelStatus("canary", current, previous, 1))
    assert decode_status(encode_status(status)) == status
    for bad in (
        b'{"v":1,"state":"online","model":{"group":"g","current":{"version":"v","agreement":2,"compared":1},'
        b'"previous":null,"refused":0}}',
        b'{"v":1,"state":"online","model":{"group":"g","current":{"version":"v"},"previous":null,"refused":0}}',
        b'{"v":1,"state":"online","model":{"group":"g","current":{"version":"v","agreement":null,'
        b'"compared":0},"previous":null,"refused":-1}}',
    ):
        with pytest.raises(ProtocolError):
            decode_status(bad)


def test_models_help_has_examples(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        cli_main(["models", "--help"])
    out = capsys.readouterr().out
    assert "examples:" in out and "edgecascade models publish" in out and "--canary" in out
    for action in ("keygen", "publish", "status", "rollback", "prune", "watch"):
        with pytest.raises(SystemExit):
            cli_main(["models", action, "--help"])
        assert f"example:\n  edgecascade models {action} " in capsys.readouterr().out


def test_the_device_keeps_a_bounded_number_of_versions_and_never_serves_one_that_no_longer_verifies(
    keys: Tuple[Any, Path], tiny_models: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from device_agent.model_store import ModelStore
    from device_agent.rollout import load_public_key

    trusted = load_public_key(keys[1])
    store = ModelStore(tmp_path / "models", keep=3)
    for version in ("a", "b", "c", "d"):
        bundle = build_bundle(tiny_models, version, keys[0])
        partial = store.start_partial(version)
        for name, data in bundle.data.items():
            store.write_file(partial, name, data)
        store.finish(partial, bundle.signed)
        store.set_current(version)
    assert sorted(p.name for p in store.root.iterdir() if p.is_dir()) == ["b", "c", "d"]
    assert store.current(trusted) == store.path("d")
    assert model_version_of(store.path("d")) == "d"
    with open(store.path("d") / "main.onnx", "r+b") as fh:  # the disk changed under it
        fh.write(b"\0")
    caplog.set_level(logging.ERROR, logger="device_agent.model_store")
    assert store.current(trusted) is None  # the agent then serves its configured model
    assert "installed model version 'd' is unusable" in caplog.text


# -- the broker's fence -----------------------------------------------------------------------------------
def test_only_the_operator_account_may_publish_models(
    broker: BrokerProcess, topics: Topics, keys: Tuple[Any, Path], tiny_models: Path
) -> None:
    bundle = build_bundle(tiny_models, "v1", keys[0])
    device = f"dev-{uuid.uuid4().hex[:8]}"
    with Operator(broker.credentials(device), topics, timeout_s=2.0, client_id=device) as impostor:
        with pytest.raises(RolloutError, match="refused"):
            impostor.publish_files(bundle)
        with pytest.raises(RolloutError):  # it may not even read the group's history
            impostor.publish(bundle.signed, "g")
    sha = bundle.signed.manifest.files[0].sha256
    with operator(broker, topics) as op:
        assert op.retained([topics.model_manifest("g"), topics.model_chunk(sha, 0)]) == {}  # nothing got in
        op.publish_files(bundle)
        op.publish(bundle.signed, "g")
        assert op.history("g") == [bundle.signed.payload]
        found = op.retained([topics.model_manifest("g"), topics.model_chunk(sha, 0)])
    assert found == {
        topics.model_manifest("g"): bundle.signed.payload,
        topics.model_chunk(sha, 0): bundle.data["card.json"][: 1024 * 1024],
    }


def test_prune_clears_the_chunks_of_files_no_version_in_the_histories_uses(
    broker: BrokerProcess,
    topics: Topics,
    keys: Tuple[Any, Path],
    tiny_models: Path,
    v2_models: Path,
    tmp_path: Path,
) -> None:
    v3_models = write_tiny_model_dir(tmp_path / "v3", seed=2)
    bundles = [
        build_bundle(m, v, keys[0]) for m, v in ((tiny_models, "v1"), (v2_models, "v2"), (v3_models, "v3"))
    ]

    def chunks(bundle: Bundle) -> List[str]:
        return [topics.model_chunk(f.sha256, 0) for f in bundle.signed.manifest.files]

    with Operator(broker.credentials("operator"), topics, timeout_s=10.0, history_size=2) as op:
        for bundle in bundles:
            op.publish_files(bundle)
            op.publish(bundle.signed, "g")
        op.publish(bundles[1].signed, "h")  # another group still uses v2
        assert [m for m in op.history("g")] == [b.signed.payload for b in bundles[1:]]  # v1 fell out
        assert op.prune(["g", "h"]) == len(chunks(bundles[0]))  # v1's files, no other version's
        left = op.retained([t for b in bundles for t in chunks(b)])
        assert op.prune(["g", "h"]) == 0  # nothing left to clear
    assert set(left) == set(chunks(bundles[1]) + chunks(bundles[2]))


# -- delivery, hot swap, tags -------------------------------------------------------------------------------
def test_a_version_rolled_out_mid_stream_is_swapped_in_between_samples_and_every_row_names_its_version(
    broker: BrokerProcess,
    topics: Topics,
    keys: Tuple[Any, Path],
    tiny_models: Path,
    v2_models: Path,
    tmp_path: Path,
    cloud: CloudWorker,
) -> None:
    db = tmp_path / "results.db"
    collector = Collector(
        CollectorConfig(broker.credentials("collector"), topics, db, client_id=f"col-{uuid.uuid4().hex[:8]}")
    ).start()
    config = follow(
        broker,
        topics,
        tiny_models,
        tmp_path,
        keys[1],
        policy={"name": "meanet", "params": {}},
        capacity_aware=False,
    )
    v1 = model_version_of(tiny_models)
    bundle = build_bundle(v2_models, "v2", keys[0], chunk_bytes=16 * 1024)  # several chunks a file
    pictures = images(4000, seed=5)
    futures: List[Any] = []
    try:
        with DeviceAgent(config) as agent, operator(broker, topics) as op:
            assert agent.model_version == v1
            swapped_at: List[int] = []

            def feed() -> None:  # as fast as the queue takes them, until well after the swap
                for i, image in enumerate(pictures):
                    futures.append(agent.submit(image, label=i % 10))
                    if agent.model_version == "v2" and not swapped_at:
                        swapped_at.append(i)
                    if swapped_at and i >= swapped_at[0] + 200 or i >= 3000 and not swapped_at:
                        return

            feeder = threading.Thread(target=feed)
            feeder.start()
            wait_for(lambda: len(futures) >= 200, 30, "the stream under way")
            op.publish_files(bundle)
            op.publish(bundle.signed, "g")
            feeder.join(60)
            assert swapped_at, "v2 never served"
            records = [f.result(30) for f in futures]
            stats = dict(agent.rollout.stats) if agent.rollout else {}
            run_id = agent.run_id
            status = agent.model_status()
        assert stats["installed"] == 1 and stats["swaps"] == 1 and stats["refused"] == 0
        assert (
            status.current.version == "v2" and status.previous is not None and status.previous.version == v1
        )
        wait_for(lambda: _rows(db, run_id) == len(records), 30, "every row in the database")
    finally:
        collector.stop()
    # One swap, between two samples: every sample before it answered by v1, every one after by v2.
    versions = [r.model_version for r in sorted(records, key=lambda r: r.seq)]
    first_v2 = versions.index("v2")
    assert 100 <= first_v2 < len(versions) - 100  # (up to 64 of the first 200 fed may still be queued)
    assert versions == [v1] * first_v2 + ["v2"] * (len(versions) - first_v2)
    # ... and each edge answer is that version's (nothing answered by half of one, half of the other).
    cascades = {v1: EdgeCascade(tiny_models), "v2": EdgeCascade(v2_models)}
    for image, r in zip(pictures, records):  # records in the order their images were fed
        if r.exit_stage in ("main", "extension"):
            assert r.prediction == cascades[r.model_version].decide(image[None])[0].prediction
    # The database has every row, none without a version (what the collector stores, read by name).
    with sqlite3.connect(db) as raw:
        stored = dict(
            raw.execute(
                "SELECT COALESCE(model_version, '<none>'), COUNT(*) FROM inferences WHERE run_id = ? "
                "GROUP BY 1",
                (run_id,),
            ).fetchall()
        )
        seqs = raw.execute(
            "SELECT COUNT(DISTINCT seq) FROM inferences WHERE run_id = ?", (run_id,)
        ).fetchone()
    assert stored == {v1: first_v2, "v2": len(records) - first_v2}
    assert seqs == (len(records),)  # no sample lost, none twice
    # A restart serves the installed version at once, without a download.
    with DeviceAgent(config) as again:
        assert again.model_version == "v2" and again.rollout is not None
        assert again.submit(pictures[0]).result(10).model_version == "v2"
        assert again.rollout.stats["installed"] == 0


# -- refusals ------------------------------------------------------------------------------------------------
def test_a_manifest_with_a_bad_signature_is_refused_in_one_line_and_the_old_model_keeps_serving(
    broker: BrokerProcess,
    topics: Topics,
    keys: Tuple[Any, Path],
    other_key: Any,
    v2_models: Path,
    tiny_models: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="device_agent.rollout")
    forged = build_bundle(v2_models, "v2", other_key)
    with DeviceAgent(follow(broker, topics, tiny_models, tmp_path, keys[1])) as agent, operator(
        broker, topics
    ) as op:
        v1 = agent.model_version
        op.watch_status()
        op.publish_files(forged)
        op.publish(forged.signed, "g")
        assert agent.rollout is not None
        wait_for(lambda: agent.rollout.stats["refused"] == 1, 20, "the refusal")

        def reported() -> bool:  # on the status topic too (edge-only: no offload moves it otherwise)
            with op.lock:
                status = op.statuses.get(agent.device_id)
            return status is not None and status.model is not None and status.model.refused == 1

        wait_for(reported, 20, "the refusal on the status topic")
        assert agent.submit(images(1, 3)[0]).result(10).model_version == v1
        assert dict(agent.rollout.refusals) == {"signature": 1}
        assert agent.rollout.stats["installed"] == 0 and agent.model_status().refused == 1
        summary = agent.close()
    (line,) = refusals_logged(caplog)
    assert "bad signature" in line and "still serving " + v1 in line
    assert summary.rollout["refusals"] == {"signature": 1}


def test_tampered_truncated_and_incomplete_files_are_refused_and_the_old_model_keeps_serving(
    broker: BrokerProcess,
    topics: Topics,
    keys: Tuple[Any, Path],
    tiny_models: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.ERROR, logger="device_agent.rollout")
    config = follow(broker, topics, tiny_models, tmp_path, keys[1], timeout_s=1.0)

    def bad(version: str, how: str, seed: int) -> Bundle:
        # Files are addressed by content: each case its own weights, so no chunk of one is left for another.
        shape = (1, 32, 32) if how == "unusable" else (1, 28, 28)  # a swap cannot change what a sample is
        models = write_tiny_model_dir(tmp_path / how, seed=seed, input_shape=shape)
        good = build_bundle(models, version, keys[0], chunk_bytes=8 * 1024)
        if how == "unusable":
            return good
        data = bytearray(good.data["extension.onnx"])
        if how == "tampered":
            data[len(data) // 2] ^= 0xFF  # same size, one byte changed
        elif how == "truncated":
            del data[-100:]  # the last chunk arrives 100 bytes short
        else:  # incomplete: the last chunk is never published
            del data[(len(data) - 1) // 8192 * 8192 :]
        return Bundle(good.signed, {**good.data, "extension.onnx": bytes(data)})

    with DeviceAgent(config) as agent, operator(broker, topics) as op:
        v1 = agent.model_version
        assert agent.rollout is not None
        for n, how in enumerate(("tampered", "truncated", "incomplete", "unusable"), start=1):
            bundle = bad(f"v2-{how}", how, seed=10 + n)
            op.publish_files(bundle)
            op.publish(bundle.signed, "g")
            wait_for(lambda n=n: agent.rollout.stats["refused"] == n, 20, f"the {how} file refused")
            assert agent.submit(images(1, n)[0]).result(10).model_version == v1
        assert dict(agent.rollout.refusals) == {"tampered": 1, "truncated": 1, "incomplete": 1, "unusable": 1}
        assert (
            agent.rollout.stats["installed"] == 1 and agent.rollout.stats["swaps"] == 0
        )  # (the unusable one)
        store = agent.rollout.store.root
    lines = refusals_logged(caplog)
    assert len(lines) == 4 and all(f"still serving {v1}" in line for line in lines)
    assert "(tampered)" in lines[0] and "sha256 differs" in lines[0]
    assert "(truncated)" in lines[1] and "expected" in lines[1]
    assert "arrived within 1 s" in lines[2]
    assert "(unusable)" in lines[3] and "[1, 32, 32]" in lines[3]
    # Nothing of the broken ones kept on disk (the unusable one is complete and verified: kept, not served).
    assert sorted(p.name for p in store.iterdir()) == ["v2-unusable"]


# -- canary and rollback -------------------------------------------------------------------------------------
def test_the_canary_is_promoted_when_it_agrees_and_rolled_back_when_its_agreement_falls(
    broker: BrokerProcess,
    topics: Topics,
    keys: Tuple[Any, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
) -> None:
    # The cloud runs v1's main block: under v1 (and v1b, the same files) the edge agrees with it every time,
    # under v2 (other weights) about as often as chance.
    v1_dir = write_tiny_model_dir(tmp_path / "v1", seed=0, thresholds=ALL_OFFLOADED)
    v2_dir = write_tiny_model_dir(tmp_path / "v2", seed=1, thresholds=ALL_OFFLOADED)
    worker = CloudWorker(
        WorkerConfig(broker.credentials("cloud"), topics, v1_dir / "main.onnx", f"w{uuid.uuid4().hex[:6]}")
    )
    worker.start()
    namespace = topics.root.split("/")[0]
    login = broker.credentials("operator")
    password = tmp_path / "operator.pw"
    password.write_text(login.password + "\n")
    flags = [
        "--broker",
        f"{login.host}:{login.port}",
        "--password-file",
        str(password),
        "--namespace",
        namespace,
    ]
    watch = ["--min-compared", "40", "--threshold", "0.2", "--canary-timeout", "60"]
    stop = threading.Event()
    config = follow(
        broker,
        topics,
        v1_dir,
        tmp_path,
        keys[1],
        group="canary",
        policy={"name": "hi-threshold", "params": {}},
        capacity_aware=False,
    )
    key = keys[1].parent / "model-signing.key"

    def publish(model_dir: Path, version: str, *extra: str) -> int:
        return cli_main(
            ["models", "publish", str(model_dir), "--version", version, "--key", str(key), *extra, *flags]
        )

    try:
        with DeviceAgent(config) as agent:
            pictures = images(500, seed=9)

            def feed() -> None:  # one sample at a time, each answered before the next: a steady stream
                i = 0
                while not stop.is_set():
                    try:
                        agent.submit(pictures[i % len(pictures)]).result(10)
                    except RuntimeError:  # closed (a failed assertion below)
                        return
                    i += 1

            feeder = threading.Thread(target=feed)
            feeder.start()
            assert publish(v1_dir, "v1", "--group", "canary") == 0
            wait_for(lambda: agent.model_version == "v1", 20, "v1 served")
            assert publish(v1_dir, "v1b", "--group", "fleet", "--canary", "canary", *watch) == 0
            assert agent.model_version == "v1b"
            assert publish(v2_dir, "v2", "--group", "fleet", "--canary", "canary", *watch) == 1
            wait_for(lambda: agent.model_version == "v1b", 20, "the canary back on v1b")
            stop.set()
            feeder.join(20)
            status = agent.model_status()
        assert status.previous is not None and status.previous.version == "v2"
        assert status.previous.agreement is not None and status.previous.agreement < 0.8
        with operator(broker, topics) as op:
            from protocol.bundle import parse_unverified

            fleet = [parse_unverified(m).version for m in op.history("fleet")]
            canary = [parse_unverified(m).version for m in op.history("canary")]
        assert fleet == ["v1b"]  # v2 never reached the fleet
        assert canary == ["v1", "v1b"]  # ... and the canary's history is back where it was
        # What the operator sees, then by hand: back to v1, then nothing left to go back to.
        capsys.readouterr()
        assert cli_main(["models", "status", "--group", "canary", "--json", "--wait", "0.5", *flags]) == 0
        seen = json.loads(capsys.readouterr().out)
        assert seen["groups"] == {"canary": {"serving": "v1b", "history": ["v1", "v1b"]}}
        (device,) = [d for d in seen["devices"] if d["device"] == config.device_id]
        assert device["state"] == "offline" and device["version"] == "v1b"  # its goodbye names its model
        assert cli_main(["models", "rollback", "--group", "canary", *flags]) == 0
        assert cli_main(["models", "rollback", "--group", "canary", *flags]) == 1
    finally:
        stop.set()
        worker.stop()


def _rows(db: Path, run_id: str) -> int:
    if not db.exists():
        return 0
    with sqlite3.connect(db) as raw:
        try:
            return int(
                raw.execute("SELECT COUNT(*) FROM inferences WHERE run_id = ?", (run_id,)).fetchone()[0]
            )
        except sqlite3.OperationalError:  # no schema yet
            return 0
