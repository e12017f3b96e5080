"""The synthetic video generator: boxes match the pixels, same seed same bytes, train/test sprites apart."""

from __future__ import annotations

import hashlib
import json
import struct
from pathlib import Path

import numpy as np
import pytest

from device_agent.sources import FASHION_MNIST_CLASSES
from video.dataset import load_split, write_split
from video.synth import SynthConfig, make_sequence, sequence_rng


def _sprites(n: int = 40, seed: int = 0) -> tuple:
    """Blobs on black, like Fashion-MNIST items: a filled ellipse of random size per image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:28, 0:28]
    images = np.zeros((n, 1, 28, 28), dtype=np.uint8)
    for i in range(n):
        ry, rx = rng.uniform(5, 13, size=2)
        blob = ((yy - 13.5) / ry) ** 2 + ((xx - 13.5) / rx) ** 2 <= 1
        images[i, 0][blob] = rng.integers(120, 256)
    return images, rng.integers(0, 10, size=n)


def test_boxes_are_the_tight_boxes_of_the_visible_sprite_pixels() -> None:
    images, labels = _sprites()
    config = SynthConfig(frames=40, background=False)
    seq = make_sequence(config, images, labels, sequence_rng(3, "test", 0), keep_id_maps=True)
    assert seq.id_maps is not None
    checked = 0
    for t, anns in enumerate(seq.annotations):
        id_map = seq.id_maps[t]
        # on a black background with no noise, the lit pixels are exactly the visible sprite pixels
        assert np.array_equal(seq.frames[t] > 0, id_map >= 0)
        for ann in anns:
            ys, xs = np.nonzero(id_map == ann["track_id"])
            x, y, w, h = ann["bbox"]
            assert (x, y, x + w, y + h) == (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1)
            assert ann["area"] == w * h and ann["category_id"] == labels[ann["sprite_index"]] + 1
            assert ann["iscrowd"] == int(ann["visible_fraction"] < config.visible_min)
            checked += 1
        # every object with enough visible pixels is annotated
        ids, counts = np.unique(id_map[id_map >= 0], return_counts=True)
        expected = {int(i) for i, c in zip(ids, counts) if c >= config.visible_pixels_min}
        assert expected == {a["track_id"] for a in anns}
    assert checked > 100


def test_sequences_have_motion_occlusion_and_objects_entering_and_leaving() -> None:
    images, labels = _sprites()
    seq = make_sequence(
        SynthConfig(frames=150), images, labels, sequence_rng(0, "test", 1), keep_id_maps=True
    )
    per_frame = [{a["track_id"] for a in anns} for anns in seq.annotations]
    assert len(set().union(*per_frame)) > len(per_frame[0])  # new objects entered
    assert any(a - b for a, b in zip(per_frame, per_frame[1:]))  # some left
    assert any(a["visible_fraction"] < 0.95 for anns in seq.annotations for a in anns)  # occluded or cut
    assert 2 <= np.mean([len(p) for p in per_frame]) <= 8


def _tree_digest(root: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path: Path) -> None:
    images, labels = _sprites()
    config = SynthConfig(frames=12)
    for name, seed in (("a", 5), ("b", 5), ("c", 6)):
        write_split(
            tmp_path / name, "test", 2, config, seed, images, labels, class_names=FASHION_MNIST_CLASSES
        )
    assert _tree_digest(tmp_path / "a") == _tree_digest(tmp_path / "b")
    assert _tree_digest(tmp_path / "a")["seq_00000.npz"] != _tree_digest(tmp_path / "c")["seq_00000.npz"]
    split = load_split(tmp_path / "a")
    assert split.frames(1).shape == (12, 128, 128) and split.frames(1).dtype == np.uint8
    assert len(split.coco["images"]) == 24 and len(split.coco["categories"]) == 10


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("split", ["train", "test"])
def test_train_sequences_use_train_sprites_only_and_test_test(tmp_path: Path, split: str) -> None:
    from edgecascade.cli import main

    data = tmp_path / "fmnist"
    data.mkdir()
    images, _ = _sprites(30)
    # train items are all of classes 0-4, test items all of classes 5-9: the categories tell the split apart
    for stem, lo in (("train", 0), ("t10k", 5)):
        _write_idx(data / f"{stem}-images-idx3-ubyte", images[:, 0])
        _write_idx(data / f"{stem}-labels-idx1-ubyte", lo + np.arange(30) % 5)
    out = tmp_path / split
    args = ["video", "make", "--split", split, "--sequences", "2", "--frames", "20", "--data-dir", str(data)]
    assert main([*args, "--out", str(out)]) == 0
    coco = json.loads((out / "annotations.json").read_text())
    categories = {a["category_id"] for a in coco["annotations"]}
    assert categories and categories <= ({1, 2, 3, 4, 5} if split == "train" else {6, 7, 8, 9, 10})
    assert json.loads((out / "manifest.json").read_text())["sprite_source"] == f"fashion-mnist {split} split"
