"""Training pipeline: `edgecascade train --quick` end to end, resume from checkpoints, the other datasets'
on-disk formats (CIFAR-100 pickles, ImageNet ImageFolder), the MobileNetV2 backbone, the reference rule."""

from __future__ import annotations

import json
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from device_agent.card import load_card, sha256_file
from device_agent.cascade import EdgeCascade
from device_agent.sources import parse_idx
from edgecascade.cli import main as cli_main
from training.datasets import TensorSplit, carve_validation
from training.engine import augment
from training.reference import (
    calibrate_offload,
    edge_rule,
    normalised_entropy,
    select_hard_classes,
)

REPO = Path(__file__).resolve().parent.parent
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_fmnist = pytest.mark.skipif(
    not (FMNIST / "train-images-idx3-ubyte.gz").exists(), reason="dataset-fashion-mnist not installed"
)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One `edgecascade train --quick` through the real console entry point, shared by the tests below."""
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.skip("dataset-fashion-mnist not installed")
    root = tmp_path_factory.mktemp("quick")
    out, ckpt = root / "models", root / "ckpt"
    cmd = [sys.executable, "-m", "edgecascade.cli", "train", "--quick", "--out", str(out)]
    cmd += ["--checkpoint-dir", str(ckpt), "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {
        "out": out,
        "ckpt": ckpt,
        "stdout": proc.stdout,
        "card": json.loads((out / "card.json").read_text()),
    }


@pytest.mark.slow
def test_quick_run_writes_the_contracted_card(quick_run: dict) -> None:
    card, out = quick_run["card"], quick_run["out"]
    assert card["schema"] == 1 and card["dataset"] == "fashion-mnist" and card["backbone"] == "resnet"
    assert card["num_classes"] == 10 and len(card["class_names"]) == 10
    assert card["input"] == {"shape": [1, 28, 28], "dtype": "uint8", "layout": "CHW"}
    assert len(card["hard_classes"]) == 5 and card["hard_classes"] == sorted(card["hard_classes"])
    assert 0.0 <= card["thresholds"]["entropy_tau"] <= 1.0 and 0.0 <= card["thresholds"]["hi_theta"] <= 1.0
    for name in ("main", "extension", "cloud"):
        block = card["blocks"][name]
        assert block["sha256"] == sha256_file(out / block["file"])
        assert block["macs"] > 0 and block["params"] > 0 and block["bytes_moved"] > block["params"] * 4
        assert block["max_abs_diff_vs_torch"] <= 1e-4
    assert card["blocks"]["main"]["macs"] < card["blocks"]["cloud"]["macs"]
    for split in ("validation", "test"):
        acc = card["accuracy"][split]
        for key in ("main", "extension_on_hard", "edge_cascade", "cloud", "cascade", "offload_fraction"):
            assert 0.0 <= acc[key] <= 1.0, (split, key)
        assert acc["offload_fraction"] <= 0.25 + 1e-9 or split == "test"
    assert card["training"]["seed"] == 0 and "--quick" in card["training"]["command"]
    assert "hard classes" in (out / "MODEL_CARD.md").read_text()
    assert "wrote" in quick_run["stdout"]
    reference = card["drift_reference"]  # the drift monitor's profile, on the quick run's validation split
    assert (
        reference["samples"] == card["accuracy"]["validation"]["samples"] and "seed 0" in reference["source"]
    )
    assert "drift reference" in (out / "MODEL_CARD.md").read_text()


@pytest.mark.slow
def test_quick_models_onnx_match_torch_and_runner_agrees(quick_run: dict) -> None:
    """Exports checked again here: ORT vs torch on a fresh batch, and the runner's rule vs the torch rule."""
    from training.meanet import Architecture, build_models

    out = quick_run["out"]
    card = load_card(out)
    arch = Architecture.from_dict(card.raw["architecture"])
    main, ext, _ = build_models(arch, card.input_shape)
    main.load_state_dict(torch.load(out / "torch/main.pt", weights_only=True)["state_dict"])
    ext.load_state_dict(torch.load(out / "torch/extension.pt", weights_only=True)["state_dict"])
    main.eval()
    ext.eval()
    images = torch.randint(0, 256, (48, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        logits, feats = main(images)
        ext_logits = ext(images, feats)
    sess = ort.InferenceSession(str(out / "main.onnx"), providers=["CPUExecutionProvider"])
    got_logits, got_feats = sess.run(None, {"image": images.numpy()})
    assert np.abs(got_logits - logits.numpy()).max() <= 1e-4
    assert np.abs(got_feats - feats.numpy()).max() <= 1e-4
    ref = edge_rule(logits, ext_logits, card.hard_classes)
    decisions = EdgeCascade(out).decide(images.numpy())
    assert [d.prediction for d in decisions] == ref.prediction.tolist()
    assert [d.exit_stage == "extension" for d in decisions] == ref.ran_extension.tolist()
    assert np.allclose([d.entropy for d in decisions], ref.entropy.numpy(), atol=1e-5)


@pytest.mark.slow
def test_publish_from_checkpoints_reproduces_the_card(quick_run: dict, tmp_path: Path) -> None:
    """GPU trains, CPU exports: publishing from saved stages retrains nothing and gives the same card."""
    out2 = tmp_path / "again"
    rc = cli_main(
        ["train", "--quick", "--out", str(out2), "--checkpoint-dir", str(quick_run["ckpt"]), "--no-progress"]
    )
    assert rc == 0
    card2 = json.loads((out2 / "card.json").read_text())
    assert card2["hard_classes"] == quick_run["card"]["hard_classes"]
    assert card2["accuracy"] == quick_run["card"]["accuracy"]
    assert card2["thresholds"]["entropy_tau"] == quick_run["card"]["thresholds"]["entropy_tau"]


@pytest.mark.slow
def test_weight_space_ensembles_write_the_chosen_mix_and_publish_it(quick_run: dict, tmp_path: Path) -> None:
    """`python -m training.wise` end to end, against a perturbed copy of the quick models with a budget wide
    enough for every alpha: alpha 1 is chosen (choose() itself: tests/test_adapt.py), the checkpoints written
    are the perturbed models, and they publish to what wise measured on the same validation split."""
    from training.pipeline import load_checkpoint
    from training.wise import folded_maps
    from training.wise import main as wise_main

    robust = tmp_path / "robust"
    robust.mkdir()
    gen = torch.Generator().manual_seed(5)
    for name in ("main", "extension", "cloud"):
        saved = load_checkpoint(quick_run["ckpt"] / f"{name}.pt")
        for key, value in saved["state_dict"].items():
            if key.endswith("weight"):  # BatchNorm scales included; running statistics stay valid
                value.mul_(1 + 0.2 * torch.randn(value.shape, generator=gen))
        torch.save(saved, robust / f"{name}.pt")
    mixed = tmp_path / "wise"
    args = ["--clean", str(quick_run["out"]), "--robust-edge", str(robust), "--robust-cloud", str(robust)]
    args += ["--steps", "2", "--robustness-images", "50", "--out", str(mixed)]
    assert wise_main([*args, "--budget", "0.9"]) == 0  # every alpha within budget: the largest, 1
    clean_main = load_checkpoint(quick_run["ckpt"] / "main.pt")["state_dict"]
    robust_main = load_checkpoint(robust / "main.pt")["state_dict"]
    written = load_checkpoint(mixed / "main.pt")
    wise = written["facts"]["wise"]
    assert [r["alpha"] for r in wise["validation"]] == [0.0, 0.5, 1.0] and wise["alpha"] == 1.0
    assert written["facts"]["command"].endswith(f"--out {mixed} --budget 0.9")
    assert all(torch.equal(written["state_dict"][k], robust_main[k]) for k in robust_main)
    assert not torch.equal(clean_main["backbone.stem.0.weight"], robust_main["backbone.stem.0.weight"])
    out = tmp_path / "published"
    rc = cli_main(["train", "--quick", "--checkpoint-dir", str(mixed), "--out", str(out), "--no-progress"])
    assert rc == 0
    card = json.loads((out / "card.json").read_text())
    for key in ("main", "edge_cascade"):  # the same validation split wise chose on (the clean recipe's)
        assert card["accuracy"]["validation"][key] == pytest.approx(wise["validation"][-1][key], abs=1e-4)
    cloud_rows = load_checkpoint(mixed / "cloud.pt")["facts"]["wise"]["validation"]
    assert card["accuracy"]["validation"]["cloud"] == pytest.approx(cloud_rows[-1]["cloud"], abs=0.004)
    from training.meanet import Architecture, build_models

    arch = Architecture.from_dict(written["arch"])
    cloud_written, cloud_robust = build_models(arch, (1, 28, 28))[2], build_models(arch, (1, 28, 28))[2]
    cloud_written.load_state_dict(load_checkpoint(mixed / "cloud.pt")["state_dict"])
    cloud_robust.load_state_dict(load_checkpoint(robust / "cloud.pt")["state_dict"])
    for (w, b), (wr, br) in zip(folded_maps(cloud_written.eval()), folded_maps(cloud_robust.eval())):
        assert torch.allclose(w, wr, atol=1e-5) and torch.allclose(b, br, atol=1e-4)


@pytest.mark.slow
def test_reuse_cloud_publishes_a_new_edge_pair_against_the_deployed_cloud(
    quick_run: dict, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """--reuse-cloud: no cloud training; the cloud file and its card facts carried over; ORT calibrates."""
    ckpt = tmp_path / "edge-ckpt"
    ckpt.mkdir()
    for stage in ("main", "extension"):
        (ckpt / f"{stage}.pt").write_bytes((quick_run["ckpt"] / f"{stage}.pt").read_bytes())
    out = tmp_path / "edge2"
    args = ["train", "--quick", "--checkpoint-dir", str(ckpt), "--out", str(out), "--no-progress"]
    assert cli_main([*args, "--reuse-cloud", str(quick_run["out"])]) == 0
    assert not (ckpt / "cloud.pt").exists()  # nothing was trained
    first, card = quick_run["card"], json.loads((out / "card.json").read_text())
    assert (out / "cloud.onnx").read_bytes() == (quick_run["out"] / "cloud.onnx").read_bytes()
    assert card["blocks"]["cloud"] == first["blocks"]["cloud"]
    assert str(quick_run["out"]) in card["training"]["stages"]["cloud"]["reused_from"]
    assert card["training"]["stages"]["cloud"]["epochs"] == first["training"]["stages"]["cloud"]["epochs"]
    for split in ("validation", "test"):
        a, b = card["accuracy"][split], first["accuracy"][split]
        assert a["main"] == b["main"] and a["edge_cascade"] == b["edge_cascade"]
        # onnxruntime's cloud logits instead of torch's: at most a near-tie may flip
        assert abs(a["cloud"] - b["cloud"]) <= 1.0 / a["samples"]
    capsys.readouterr()
    assert cli_main([*args, "--reuse-cloud", str(tmp_path / "nowhere")]) == 2
    assert "--reuse-cloud: no model card" in capsys.readouterr().err


def _write_cifar100(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    """A few images in torchvision's cifar-100-python layout (python pickles, rows of 3072 bytes)."""
    base = root / "cifar-100-python"
    base.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        entry = {
            "filenames": [f"img{i}.png" for i in range(n)],
            "batch_label": f"{split} batch",
            "fine_labels": [int(i % 100) for i in range(n)],
            "coarse_labels": [int(i % 20) for i in range(n)],
            "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
        }
        with open(base / split, "wb") as fh:
            pickle.dump(entry, fh, protocol=2)
    with open(base / "meta", "wb") as fh:
        pickle.dump(
            {
                "fine_label_names": [f"class{i}" for i in range(100)],
                "coarse_label_names": [f"super{i}" for i in range(20)],
            },
            fh,
            protocol=2,
        )


@pytest.mark.slow
def test_cifar100_pickles_train_one_quick_step_and_export(tmp_path: Path) -> None:
    _write_cifar100(tmp_path / "c100")
    out = tmp_path / "out"
    rc = cli_main(
        ["train", "--quick", "--dataset", "cifar100", "--data-dir", str(tmp_path / "c100"), "--out", str(out)]
        + ["--no-progress", "--batch-size", "64"]
    )
    assert rc == 0
    card = load_card(out)
    assert card.num_classes == 100 and card.class_names[7] == "class7"
    assert card.input_shape == [3, 32, 32] and len(card.hard_classes) == 50
    probs = EdgeCascade(out).run_main(np.zeros((2, 3, 32, 32), dtype=np.uint8)).probs
    assert probs.shape == (2, 100) and np.allclose(probs.sum(1), 1.0, atol=1e-5)


@pytest.mark.slow
def test_imagenet_imagefolder_trains_one_quick_step_and_exports(tmp_path: Path) -> None:
    from PIL import Image

    rng = np.random.default_rng(1)
    for split, per_class in (("train", 6), ("val", 2)):
        for cls in ("n01440764", "n01443537", "n01484850"):
            folder = tmp_path / "inet" / split / cls
            folder.mkdir(parents=True)
            for i in range(per_class):
                size = (40 + 3 * i, 36 + 2 * i)
                if i % 3 == 0:  # a greyscale file too: real ImageNet has some
                    Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L").save(
                        folder / f"{i}.JPEG"
                    )
                else:
                    arr = rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8)
                    Image.fromarray(arr, "RGB").save(folder / f"{i}.JPEG")
    out = tmp_path / "out"
    rc = cli_main(
        ["train", "--quick", "--dataset", "imagenet", "--data-dir", str(tmp_path / "inet"), "--out", str(out)]
        + ["--image-size", "32", "--workers", "0", "--no-progress"]
    )
    assert rc == 0
    card = load_card(out)
    assert card.class_names == ["n01440764", "n01443537", "n01484850"]
    assert card.input_shape == [3, 32, 32] and card.hard_classes and len(card.hard_classes) == 1
    assert card.accuracy["test"]["samples"] == 6


@pytest.mark.slow
@needs_fmnist
def test_mobilenetv2_backbone_trains_and_exports(tmp_path: Path) -> None:
    out = tmp_path / "mnv2"
    rc = cli_main(
        ["train", "--quick", "--backbone", "mobilenetv2", "--train-limit", "384", "--out", str(out)]
        + ["--no-progress", "--test-limit", "200"]
    )
    assert rc == 0
    card = load_card(out)
    assert card.backbone == "mobilenetv2"
    assert all(card.raw["blocks"][b]["max_abs_diff_vs_torch"] <= 1e-4 for b in ("main", "extension", "cloud"))
    decisions = EdgeCascade(out).decide(np.zeros((3, 1, 28, 28), dtype=np.uint8))
    assert len(decisions) == 3 and all(d.exit_stage in ("main", "extension") for d in decisions)


def test_missing_dataset_is_a_clear_cli_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    rc = cli_main(
        ["train", "--quick", "--dataset", "cifar100", "--data-dir", str(tmp_path), "--out", str(tmp_path)]
    )
    assert rc == 2
    assert "cifar-100-python" in capsys.readouterr().err


def test_an_unknown_corruption_kind_is_refused_before_training(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["train", "--quick", "--corruption-p", "0.5", "--corruption-kinds", "jpeg,salt-pepper"])
    assert exit_info.value.code == 2
    assert "salt-pepper: choose from gaussian-noise" in capsys.readouterr().err


def test_weight_space_ensembles_refuse_a_checkpoint_directory_without_its_blocks(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from training.wise import main as wise_main

    (tmp_path / "edge").mkdir()
    (tmp_path / "edge" / "main.pt").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        wise_main(["--clean", "models/fashion-mnist", "--robust-edge", str(tmp_path / "edge"), "--out", "x"])
    assert exit_info.value.code == 2 and "has no extension.pt" in capsys.readouterr().err


def test_read_idx_rejects_other_formats() -> None:
    header = bytes([0, 0, 0x08, 1]) + (3).to_bytes(4, "big")
    assert parse_idx(header + bytes([1, 2, 3])).tolist() == [1, 2, 3]
    with pytest.raises(ValueError, match="not an IDX file of unsigned bytes"):
        parse_idx(bytes([0, 0, 0x0D, 1]) + (3).to_bytes(4, "big") + bytes(12))  # float idx
    with pytest.raises(ValueError, match="header says"):
        parse_idx(header + bytes([1, 2]))  # truncated


def test_validation_split_is_seeded_and_disjoint() -> None:
    images = torch.arange(100, dtype=torch.uint8).view(100, 1, 1, 1)
    split = TensorSplit(images, torch.arange(100) % 10)
    train_a, val_a = carve_validation(split, 10, seed=0)
    train_b, val_b = carve_validation(split, 10, seed=0)
    _, val_c = carve_validation(split, 10, seed=1)
    assert isinstance(val_a, TensorSplit) and isinstance(train_a, TensorSplit)
    assert torch.equal(val_a.images, val_b.images) and not torch.equal(val_a.images, val_c.images)
    seen = set(train_a.images.flatten().tolist()) | set(val_a.images.flatten().tolist())
    assert len(val_a) == 10 and len(train_a) == 90 and len(seen) == 100


def test_cpu_description_names_the_widest_vector_unit(tmp_path: Path) -> None:
    from training.estimate import cpu_description

    head = "processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13\n"
    for flags, vector in (("fpu sse2 avx avx2 fma", "AVX2"), ("avx avx2 avx512f avx512bw", "AVX512F")):
        info = tmp_path / f"cpuinfo-{vector}"
        info.write_text(head + f"flags\t\t: {flags}\n\nprocessor\t: 1\n")
        assert cpu_description(info) == f"AMD EPYC 7B13, {vector}"


def test_augment_keeps_shape_and_flip_only_permutes_pixels() -> None:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    cropped = augment(images, 2, True, gen)
    assert cropped.shape == images.shape and cropped.dtype == torch.uint8
    flipped = augment(images, 0, True, gen)
    for a, b in zip(flipped, images):
        assert torch.equal(a, b) or torch.equal(a, b.flip(-1))


def test_edge_rule_keeps_the_more_confident_answer_and_ties_go_to_main() -> None:
    hard = [1, 2]
    main_logits = torch.tensor(
        [
            [2.0, 0.0, 0.0],  # top-1 not hard: exits at main
            [-1.0, 0.5, 0.0],  # hard; the extension is surer
            [-1.0, 2.0, 0.0],  # hard; main is surer
            [-100.0, 0.0, 0.0],  # hard; p_main = 0.5 exactly, ties the extension
        ]
    )
    ext_logits = torch.tensor([[0.0, 0.0], [0.0, 3.0], [0.0, 0.1], [0.0, 0.0]])
    res = edge_rule(main_logits, ext_logits, hard)
    assert res.ran_extension.tolist() == [False, True, True, True]
    assert res.answered_by_extension.tolist() == [False, True, False, False]
    assert res.prediction.tolist() == [0, 2, 1, 1]
    assert torch.isnan(res.p_ext[0]) and float(res.p_main[3]) == 0.5 and float(res.p_ext[3]) == 0.5
    assert float(res.probs[1, 0]) == 0.0 and float(res.probs[1].sum()) == pytest.approx(1.0)


def test_normalised_entropy_bounds() -> None:
    probs = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]])
    assert normalised_entropy(probs).tolist() == pytest.approx([0.0, 1.0])


def test_calibration_picks_the_smallest_fraction_that_reaches_the_cloud() -> None:
    # 10 samples; the edge is wrong exactly on the 2 most uncertain ones, the cloud is right everywhere
    score = torch.tensor([0.9, 0.8, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01], dtype=torch.float64)
    edge_ok = torch.tensor([0, 0, 1, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    cloud_ok = torch.ones(10, dtype=torch.bool)
    cal = calibrate_offload(score, edge_ok, cloud_ok, max_fraction=0.25, tolerance=0.0, confidence=0.5)
    assert cal.met_target and cal.fraction == pytest.approx(0.2) and cal.accuracy == pytest.approx(1.0)
    assert 0.3 < cal.threshold < 0.8
    # the cap binds: with three uncertain errors and a 20 % cap, the best within the cap is taken
    edge_ok3 = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1, 1, 1], dtype=torch.bool)
    capped = calibrate_offload(score, edge_ok3, cloud_ok, max_fraction=0.2, tolerance=0.0, confidence=0.5)
    assert (
        not capped.met_target
        and capped.fraction == pytest.approx(0.2)
        and capped.accuracy == pytest.approx(0.9)
    )


def test_calibration_margin_grows_with_the_disagreements_it_keeps() -> None:
    # 1,000 samples in decreasing score: the edge is wrong on the 100 most uncertain and on 20 confident
    # ones; the cloud is wrong on 20 other confident ones. Kept, those 40 disagreements cancel on average
    # but make the difference noisy, so the 95 % rule offloads more than the plain one.
    n = 1000
    score = torch.linspace(1.0, 0.0, n, dtype=torch.float64)
    edge_ok = torch.ones(n, dtype=torch.bool)
    edge_ok[:100] = False
    edge_ok[500:520] = False
    cloud_ok = torch.ones(n, dtype=torch.bool)
    cloud_ok[600:620] = False
    plain = calibrate_offload(score, edge_ok, cloud_ok, 0.25, tolerance=0.02, confidence=0.5)
    assert plain.met_target and plain.fraction == pytest.approx(0.080)  # difference −20/1000 reached
    sure = calibrate_offload(score, edge_ok, cloud_ok, 0.25, tolerance=0.02, confidence=0.95)
    # at k = 96: difference −4/1000, 44 kept disagreements: −0.004 − 1.645·√2·√((0.044 − 0.004²)/1000) ≥ −0.02
    assert sure.met_target and sure.fraction == pytest.approx(0.096)
    # a tolerance no fraction within the cap can promise: the most accurate fraction is taken, target unmet
    strict = calibrate_offload(score, edge_ok, cloud_ok, 0.25, tolerance=0.0, confidence=0.95)
    assert not strict.met_target and strict.fraction == pytest.approx(0.100)
    # the cap shrinks by the same margin: 10 % − 1.645·√(2·0.1·0.9/1000) = 7.8 %, so k = 96 is out of reach
    capped = calibrate_offload(score, edge_ok, cloud_ok, 0.10, tolerance=0.02, confidence=0.95)
    assert not capped.met_target and capped.fraction == pytest.approx(0.077)


def test_hard_classes_by_accuracy_and_by_confusion_pairs() -> None:
    labels = torch.tensor([0] * 10 + [1] * 10 + [2] * 10 + [3] * 10)
    pred = labels.clone()
    pred[:4] = 1  # class 0 confused with 1 four times
    pred[20:22] = 3  # class 2 confused with 3 twice
    pred[30] = 2
    logits = torch.nn.functional.one_hot(pred, 4).float()
    assert select_hard_classes(logits, labels, 4, 2, "lowest-accuracy") == [0, 2]
    assert select_hard_classes(logits, labels, 4, 2, "confusion-pairs") == [0, 1]
    with pytest.raises(ValueError):
        select_hard_classes(logits, labels, 4, 4)


def test_training_rotation_turns_as_the_suites_rotation() -> None:
    from scipy import ndimage

    from training.augment import _rotate

    bar = torch.zeros(1, 1, 28, 28)
    bar[0, 0, 4:24, 12:16] = 1.0
    turned = _rotate(bar, torch.tensor([30.0]))[0, 0].numpy()
    suite = ndimage.rotate(bar[0, 0].numpy(), 30.0, reshape=False, order=1, mode="constant")
    assert np.abs(turned - suite).max() < 1e-5 and np.abs(turned - bar[0, 0].numpy()).max() > 0.5


def test_corrupt_batch_is_seeded_and_corrupts_the_share_asked() -> None:
    from training.augment import corrupt_batch

    images = torch.randint(20, 200, (400, 1, 12, 12), dtype=torch.uint8)
    assert torch.equal(corrupt_batch(images, 0.0, torch.Generator().manual_seed(1)), images)
    once = corrupt_batch(images, 0.5, torch.Generator().manual_seed(1))
    assert torch.equal(once, corrupt_batch(images, 0.5, torch.Generator().manual_seed(1)))
    changed = (once != images).flatten(1).any(1).float().mean().item()
    assert once.dtype == torch.uint8 and 0.4 < changed <= 0.6  # a faint change may round away
    every = corrupt_batch(images, 1.0, torch.Generator().manual_seed(2))
    assert (every != images).flatten(1).any(1).float().mean().item() > 0.95  # a strength near 0 may not show
    with pytest.raises(ValueError, match="salt-pepper"):
        corrupt_batch(images, 0.0, torch.Generator(), kinds=("jpeg", "salt-pepper"))  # even with p 0


def test_the_default_kinds_draw_as_the_published_recipes_did() -> None:
    """The robust models' cards name commands without --corruption-kinds: the default must consume the
    generator exactly as it did when they were trained (before JPEG joined), or those commands train other
    models. The generator's state after a batch pins the sequence of draws (its value was taken from the code
    those models were trained with); pixels are not pinned, their float rounding may differ across CPUs."""
    import hashlib

    from training.augment import DEFAULT_KINDS, corrupt_batch

    assert DEFAULT_KINDS == ("gaussian-noise", "blur", "contrast", "brightness", "rotation")
    images = (torch.arange(64 * 12 * 12) % 251).to(torch.uint8).reshape(64, 1, 12, 12)
    generator = torch.Generator().manual_seed(0)
    corrupt_batch(images, 0.5, generator)
    assert hashlib.sha256(generator.get_state().numpy().tobytes()).hexdigest()[:16] == "11695d1e8262a236"


def test_training_jpeg_is_the_suites_jpeg() -> None:
    from training.augment import _jpeg
    from training.corruptions import Corruption, corrupt

    images = np.random.default_rng(0).integers(0, 256, (3, 1, 28, 28), dtype=np.uint8)
    trained = _jpeg(torch.from_numpy(images).float() / 255.0, torch.tensor([5.0, 5.0, 5.0]))
    suite = corrupt(images, Corruption("jpeg", 3), seed=0)
    assert np.abs(np.round(trained.numpy() * 255.0) - suite.astype(np.float64)).max() <= 1.0
    assert np.abs(suite.astype(int) - images.astype(int)).mean() > 10


def test_distillation_learns_the_teachers_answers_over_the_labels() -> None:
    from training.engine import OptimConfig, train_stage

    gen = torch.Generator().manual_seed(0)
    split = TensorSplit(
        torch.randint(0, 256, (256, 1, 4, 4), dtype=torch.uint8, generator=gen),
        torch.zeros(256, dtype=torch.long),  # every label says class 0 ...
    )
    teacher = torch.tensor([[-4.0, 4.0]]).repeat(256, 1)  # ... the teacher says class 1
    answers = {}
    for weight in (0.0, 1.0):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
        cfg = OptimConfig(epochs=3, batch_size=32, max_lr=0.5, crop_padding=0, flip=False)
        cfg.distill_weight = weight
        train_stage(
            "t",
            list(model.parameters()),
            [model],
            [],
            lambda x, model=model: model(x.float() / 255.0),  # type: ignore[misc]
            split,
            cfg,
            torch.device("cpu"),
            0,
            progress=False,
            soft_targets=teacher,
        )
        with torch.no_grad():
            answers[weight] = model(split.images.float() / 255.0).argmax(1).float().mean().item()
    assert answers[0.0] == 0.0 and answers[1.0] == 1.0
    with pytest.raises(ValueError, match="soft targets"):
        train_stage(
            "t",
            [],
            [],
            [],
            lambda x: x,
            split,
            OptimConfig(epochs=1),
            torch.device("cpu"),
            0,
            soft_targets=teacher[:10],
        )
