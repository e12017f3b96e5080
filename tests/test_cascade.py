"""device_agent.cascade on the committed Fashion-MNIST models: card contract, the rule against the torch
reference on the test set, the cloud model, and clear errors for broken model directories."""

from __future__ import annotations

import gzip
import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from cloud_worker.model import CloudSession
from device_agent.card import ModelCardError, load_card, sha256_file
from device_agent.cascade import EdgeCascade
from device_agent.rule import entropy_row, normalised_entropy, softmax, softmax_row

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models" / "fashion-mnist"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
TIE_EPS = 1e-5  # decisions this close to a boundary may flip between torch and onnxruntime arithmetic


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path) as fh:
        data = fh.read()
    ndim = data[3]
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


@pytest.fixture(scope="module")
def test_set() -> tuple:
    if not (FMNIST / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    images = _idx(FMNIST / "t10k-images-idx3-ubyte.gz")[:, None].copy()
    labels = _idx(FMNIST / "t10k-labels-idx1-ubyte.gz").astype(np.int64)
    return images, labels


@pytest.fixture(scope="module")
def cascade() -> EdgeCascade:
    return EdgeCascade(MODELS)


def test_committed_card_follows_the_contract() -> None:
    card = load_card(MODELS)
    assert card.dataset == "fashion-mnist" and card.num_classes == 10 and card.input_shape == [1, 28, 28]
    assert card.input_dtype == "uint8" and card.hard_classes == sorted(card.hard_classes)
    assert 0 < card.entropy_tau < 1 and 0 < card.hi_theta < 1
    assert "validation" in card.thresholds["calibrated_on"]
    for name in ("main", "extension", "cloud"):
        block = card.blocks[name]
        assert sha256_file(card.block_path(name)) == block.sha256
        assert block.macs > 0 and block.params > 0
    assert card.blocks["main"].macs <= 0.10 * card.blocks["cloud"].macs
    for split in ("validation", "test"):
        acc = card.accuracy[split]
        assert {"main", "extension_on_hard", "edge_cascade", "cloud", "cascade", "offload_fraction"} <= set(
            acc
        )
    assert card.training["seed"] == 0


@pytest.mark.slow
def test_runner_agrees_with_the_torch_reference_on_the_test_set(
    cascade: EdgeCascade, test_set: tuple
) -> None:
    """Exit stage, prediction and complexity of each test image: ORT runner vs torch rule (modulo ties)."""
    import torch

    from training.meanet import Architecture, build_models
    from training.reference import edge_rule

    images, labels = test_set
    card = cascade.card
    arch = Architecture.from_dict(card.raw["architecture"])
    main, ext, _ = build_models(arch, card.input_shape)
    main.load_state_dict(torch.load(MODELS / "torch/main.pt", weights_only=True)["state_dict"])
    ext.load_state_dict(torch.load(MODELS / "torch/extension.pt", weights_only=True)["state_dict"])
    main.eval()
    ext.eval()
    ref_parts, decisions = [], []
    with torch.no_grad():
        for start in range(0, len(labels), 1000):
            x = torch.from_numpy(images[start : start + 1000])
            logits, feats = main(x)
            ref_parts.append((logits, ext(x, feats)))
            decisions += cascade.decide(images[start : start + 1000])
    ref = edge_rule(
        torch.cat([p[0] for p in ref_parts]),
        torch.cat([p[1] for p in ref_parts]),
        card.hard_classes,
        card.extension_gate,
    )
    tau = card.entropy_tau
    pred = np.array([d.prediction for d in decisions])
    ran = np.array([d.exit_stage == "extension" for d in decisions])
    cplx = np.array([d.complex for d in decisions])
    ref_cplx = (ref.entropy > tau).numpy()
    mismatch = (pred != ref.prediction.numpy()) | (ran != ref.ran_extension.numpy()) | (cplx != ref_cplx)
    for i in np.flatnonzero(mismatch):  # each disagreement must be an exact tie up to float rounding
        top2 = np.sort(ref.probs[i].numpy())[-2:]
        margins = [abs(float(ref.entropy[i]) - tau), float(top2[1] - top2[0])]
        margins += [abs(float(ref.p_main[i]) - bound) for bound in card.extension_gate]
        if bool(ref.ran_extension[i]):
            margins.append(abs(float(ref.p_ext[i]) - float(ref.p_main[i])))
        assert min(margins) < TIE_EPS, f"sample {i}: runner and torch reference disagree"
    print(f"runner vs torch: {int(mismatch.sum())} of {len(labels)} decisions differ (ties)")
    assert mismatch.sum() <= 2
    assert np.allclose([d.entropy for d in decisions], ref.entropy.numpy(), atol=1e-4)
    # the runner reproduces the card's test figures (the edge's own ungated: what edge-only answers)
    full = np.array([d.prediction for d in cascade.decide(images, gated=False)])
    edge_acc = float((full == labels).mean())
    assert edge_acc == pytest.approx(card.accuracy["test"]["edge_cascade"], abs=2e-4)
    assert float(cplx.mean()) == pytest.approx(card.accuracy["test"]["offload_fraction"], abs=2e-4)
    assert ran.mean() == pytest.approx(card.accuracy["test"]["extension_rate"], abs=2e-4)


def test_decisions_are_well_formed(cascade: EdgeCascade, test_set: tuple) -> None:
    images, _ = test_set
    decisions = cascade.decide(images[:64])
    hard = set(cascade.card.hard_classes)
    for d in decisions:
        assert d.probs.shape == (10,) and abs(float(d.probs.sum()) - 1.0) < 1e-5
        assert d.prediction == int(np.argmax(d.probs)) and 0.0 <= d.entropy <= 1.0
        assert d.complex == (d.entropy > cascade.card.entropy_tau) and d.edge_ms > 0
        assert (d.exit_stage == "extension") == (d.p_ext is not None)
        if d.answered_by == "extension":
            assert d.prediction in hard and d.p_ext is not None and d.p_ext > d.p_main
    single = cascade.decide(images[0])  # one CHW image is a batch of one
    assert len(single) == 1 and single[0].prediction == decisions[0].prediction
    assert cascade.decide(images[:0]) == []


def test_one_image_at_a_time_decides_exactly_as_the_batch_does(cascade: EdgeCascade, test_set: tuple) -> None:
    """The agent's batch-1 path (plain Python on ~10 values) against the batched numpy path."""
    images, _ = test_set
    batched = cascade.decide(images[:500])
    assert {d.exit_stage for d in batched} == {"main", "extension"}  # both branches are exercised
    assert any(d.answered_by == "extension" for d in batched) and any(d.complex for d in batched)
    for image, want in zip(images[:500], batched):
        for got in (cascade.decide(image[None])[0], cascade.decide(image)[0]):
            assert (got.prediction, got.exit_stage, got.answered_by, got.complex) == (
                want.prediction,
                want.exit_stage,
                want.answered_by,
                want.complex,
            )
            assert got.p_main == want.p_main and got.p_ext == want.p_ext
            np.testing.assert_array_equal(got.probs, want.probs)
            assert got.entropy == pytest.approx(want.entropy, abs=1e-12)


def test_cloud_model_predicts_probabilities(test_set: tuple) -> None:
    images, labels = test_set
    cloud = CloudSession(MODELS / "cloud.onnx")
    probs = softmax(cloud.logits(images[:500]))
    assert probs.shape == (500, 10) and np.allclose(probs.sum(1), 1.0, atol=1e-5)
    assert float((probs.argmax(1) == labels[:500]).mean()) > 0.9


def test_optimised_graph_cache_is_reused(tmp_path: Path, test_set: tuple) -> None:
    images, _ = test_set
    first = EdgeCascade(MODELS, cache_dir=tmp_path)
    cached = sorted(p.name for p in tmp_path.iterdir())
    assert len(cached) == 2 and all(name.endswith(".opt.onnx") for name in cached)
    again = EdgeCascade(MODELS, cache_dir=tmp_path)
    a, b = first.run_main(images[:8]), again.run_main(images[:8])
    assert np.allclose(a.logits, b.logits, atol=1e-5)


def test_bad_inputs_raise_clear_errors(cascade: EdgeCascade) -> None:
    with pytest.raises(ValueError, match="uint8"):
        cascade.decide(np.zeros((2, 1, 28, 28), dtype=np.float32))
    with pytest.raises(ValueError, match="shape"):
        cascade.decide(np.zeros((2, 3, 28, 28), dtype=np.uint8))
    out = cascade.run_main(np.zeros((2, 1, 28, 28), dtype=np.uint8))
    with pytest.raises(ValueError, match="batch"):
        cascade.run_extension(np.zeros((3, 1, 28, 28), dtype=np.uint8), out.features)


def test_broken_model_directories_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelCardError, match="no model card"):
        load_card(tmp_path)
    copy = tmp_path / "m"
    shutil.copytree(MODELS, copy, ignore=shutil.ignore_patterns("cloud.onnx", "torch"))
    data = bytearray((copy / "extension.onnx").read_bytes())
    data[-1] ^= 0xFF
    (copy / "extension.onnx").write_bytes(bytes(data))
    with pytest.raises(ModelCardError, match="sha256"):
        EdgeCascade(copy)
    text = (copy / "card.json").read_text()
    (copy / "card.json").write_text(text.replace('"hard_classes": [', '"hard_classes": [42, ', 1))
    with pytest.raises(ModelCardError, match="hard_classes"):
        load_card(copy)
    (copy / "card.json").write_text("{not json")
    with pytest.raises(ModelCardError, match="JSON"):
        load_card(copy)


def _gated_copy(tmp_path: Path, gate: object) -> Path:
    copy = tmp_path / "gated"
    shutil.copytree(MODELS, copy, ignore=shutil.ignore_patterns("cloud.onnx", "torch"))
    card = json.loads((copy / "card.json").read_text())
    card["thresholds"]["extension_gate"] = gate
    (copy / "card.json").write_text(json.dumps(card))
    return copy


def test_the_extension_runs_only_inside_the_cards_gate(tmp_path: Path, test_set: tuple) -> None:
    """A hard top-1 whose main confidence is outside [low, high) exits at the main block; inside, the
    extension runs; one image at a time decides as the batch does."""
    images, _ = test_set
    gated = EdgeCascade(_gated_copy(tmp_path, [0.6, 0.9]))
    assert gated.card.extension_gate == (0.6, 0.9)
    batch = images[:400]
    main = gated.run_main(batch).probs
    hard = np.isin(main.argmax(1), gated.card.hard_classes)
    inside = (main.max(1) >= 0.6) & (main.max(1) < 0.9)
    decisions = gated.decide(batch)
    ran = np.array([d.exit_stage == "extension" for d in decisions])
    assert ran.tolist() == (hard & inside).tolist()
    assert 0 < ran.sum() < hard.sum()  # the gate made a difference on these images
    ungated = [d.exit_stage == "extension" for d in gated.decide(batch, gated=False)]
    assert ungated == hard.tolist()  # edge-only's view: the extension for every hard top-1
    assert [gated.decide(x[None])[0].exit_stage for x in batch[:100]] == [
        d.exit_stage for d in decisions[:100]
    ]
    for i, bad in enumerate(([0.9, 0.6], [0.5], "0.5", [-0.1, 0.5], [0.0, 3.0])):
        with pytest.raises(ModelCardError, match="extension_gate"):
            load_card(_gated_copy(tmp_path / f"bad{i}", bad))


def test_normalised_entropy_is_zero_for_one_hot_and_one_for_uniform() -> None:
    probs = np.array([[0.0, 1.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25], [0.5, 0.5, 0.0, 0.0]], dtype=np.float32)
    assert normalised_entropy(probs).tolist() == pytest.approx([0.0, 1.0, 0.5])


def test_the_batch_1_forms_equal_the_definitions() -> None:
    rng = np.random.default_rng(3)
    logits = (rng.normal(size=(500, 10)) * rng.uniform(0.1, 20, size=(500, 1))).astype(np.float32)
    probs = softmax(logits)
    assert all(np.array_equal(softmax_row(row), p) for row, p in zip(logits, probs))  # bit for bit
    eta = normalised_entropy(probs)
    assert max(abs(entropy_row(p) - e) for p, e in zip(probs, eta)) < 1e-12
    assert entropy_row(np.array([1.0, 0.0], dtype=np.float32)) == 0.0 and entropy_row(np.array([1.0])) == 0.0
