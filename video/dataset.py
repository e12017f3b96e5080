"""On-disk layout of a generated split, its writer and its reader.

```
DIR/
  manifest.json        seed, split, config, sequence count, frames per sequence, fps, generator version
  annotations.json     COCO: images (one per frame: id, file_name = the sequence's npz, frame_index,
                       sequence, width, height), annotations (bbox, area, category_id, iscrowd, track_id,
                       visible_fraction, sprite_index), categories (the 10 Fashion-MNIST classes, ids 1..10)
  seq_00000.npz        frames: uint8 [T, H, W] (deflated), one file per sequence
```
Image ids are `sequence * frames_per_sequence + frame_index + 1`. The npz files are written with a fixed zip
timestamp so the same seed gives the same bytes (numpy's own savez stamps the current time).
"""

from __future__ import annotations

import io
import json
import logging
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np

from video.synth import SynthConfig, coco_categories, make_sequence, sequence_rng

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 1
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)


def save_npz_deterministic(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez_compressed, but the same arrays always give the same bytes."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buffer.getvalue(), compresslevel=6)


def image_id(sequence: int, frame_index: int, frames_per_sequence: int) -> int:
    return sequence * frames_per_sequence + frame_index + 1


def write_split(
    out_dir: Path,
    split: str,
    sequences: int,
    config: SynthConfig,
    seed: int,
    images: np.ndarray,
    labels: np.ndarray,
    progress: Optional[Callable[[int], None]] = None,
    *,
    class_names: Sequence[str],
) -> Dict[str, Any]:
    """Generate `sequences` sequences of `split` into `out_dir`; returns the manifest."""
    if sequences < 1:
        raise ValueError("need at least one sequence")
    out_dir.mkdir(parents=True, exist_ok=True)
    coco_images: List[Dict[str, Any]] = []
    coco_annotations: List[Dict[str, Any]] = []
    for s in range(sequences):
        seq = make_sequence(config, images, labels, sequence_rng(seed, split, s))
        name = f"seq_{s:05d}.npz"
        save_npz_deterministic(out_dir / name, frames=seq.frames)
        for t, anns in enumerate(seq.annotations):
            iid = image_id(s, t, config.frames)
            coco_images.append(
                {
                    "id": iid,
                    "file_name": name,
                    "frame_index": t,
                    "sequence": s,
                    "width": config.width,
                    "height": config.height,
                }
            )
            for ann in anns:
                coco_annotations.append({"id": len(coco_annotations) + 1, "image_id": iid, **ann})
        if progress:
            progress(1)
    coco = {
        "info": {"description": f"edgecascade synthetic video, split {split}, seed {seed}"},
        "images": coco_images,
        "annotations": coco_annotations,
        "categories": coco_categories(class_names),
    }
    (out_dir / "annotations.json").write_text(json.dumps(coco, separators=(",", ":")))
    manifest = {
        "generator_version": GENERATOR_VERSION,
        "split": split,
        "seed": seed,
        "sequences": sequences,
        "frames_per_sequence": config.frames,
        "fps": config.fps,
        "sprite_source": f"fashion-mnist {split} split",
        "config": asdict(config),
        "layout": "seq_NNNNN.npz holds frames uint8 [T,H,W]; annotations.json is COCO; "
        "image id = sequence * frames_per_sequence + frame_index + 1",
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    logger.info("%s: %d sequences, %d annotations", out_dir, sequences, len(coco_annotations))
    return manifest


@dataclass
class VideoSplit:
    """A generated split on disk: its manifest, its COCO dict, and lazily loaded sequences."""

    root: Path
    manifest: Dict[str, Any]
    coco: Dict[str, Any]

    @property
    def sequences(self) -> int:
        return int(self.manifest["sequences"])

    @property
    def frames_per_sequence(self) -> int:
        return int(self.manifest["frames_per_sequence"])

    @property
    def fps(self) -> float:
        return float(self.manifest["fps"])

    def frames(self, sequence: int) -> np.ndarray:
        """uint8 [T, H, W] of one sequence."""
        with np.load(self.root / f"seq_{sequence:05d}.npz") as data:
            return np.asarray(data["frames"])

    def image_ids(self, sequence: int) -> List[int]:
        return [image_id(sequence, t, self.frames_per_sequence) for t in range(self.frames_per_sequence)]

    def annotations_by_image(self) -> Dict[int, List[Dict[str, Any]]]:
        out: Dict[int, List[Dict[str, Any]]] = {img["id"]: [] for img in self.coco["images"]}
        for ann in self.coco["annotations"]:
            out[ann["image_id"]].append(ann)
        return out


def load_split(root: Path) -> VideoSplit:
    """Read a directory written by `write_split` (FileNotFoundError with the command to make one)."""
    root = Path(root)
    if not (root / "manifest.json").exists():
        raise FileNotFoundError(f"{root} holds no generated split; make one with `edgecascade video make`")
    manifest = json.loads((root / "manifest.json").read_text())
    coco = json.loads((root / "annotations.json").read_text())
    return VideoSplit(root, manifest, coco)
