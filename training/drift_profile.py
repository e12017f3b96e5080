"""The model card's drift reference: the main block's outputs and the input statistics on the validation
split, as the device's drift monitor (`device_agent.drift`) compares its own window of samples with them.

Computed with onnxruntime on the exported blocks (what the device runs), on the validation split training
carves from train (`training.datasets.load_dataset`, the card's seed): images no block trained on and the
test split never touches. `edgecascade train` writes it with the card (`publish`); for committed models:

    python -m training.drift_profile --models models/fashion-mnist
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np

from device_agent.card import CARD_FILE, load_card, sha256_file
from device_agent.cascade import EdgeCascade
from device_agent.drift import REFERENCE_KEY, DriftReference, feature_names, features

logger = logging.getLogger(__name__)

LEVELS = 201  # quantiles per feature: CDF steps of 0.5 %, linear between them


def reference_of(model_dir: Path, images: np.ndarray, source: str, batch: int = 1000) -> DriftReference:
    """The drift reference of `images` (uint8 [N, C, H, W]) through the main block in `model_dir`."""
    cascade = EdgeCascade(model_dir)
    rows = [
        features(cascade.run_main(images[i : i + batch]).probs, images[i : i + batch])
        for i in range(0, len(images), batch)
    ]
    names = feature_names(cascade.card.num_classes, inputs=True)
    return DriftReference.of(np.concatenate(rows), names, LEVELS, source)


def card_text(card: Dict[str, Any]) -> str:
    """card.json as `publish` writes it (indent 2), but each quantile row on one line, not one per number."""
    ref = card.get(REFERENCE_KEY)
    if ref is None:
        return json.dumps(card, indent=2) + "\n"
    rows = ref["quantiles"]
    placeholders = [f"@row{i}@" for i in range(len(rows))]
    text = json.dumps({**card, REFERENCE_KEY: {**ref, "quantiles": placeholders}}, indent=2)
    for placeholder, row in zip(placeholders, rows):
        text = text.replace(f'"{placeholder}"', json.dumps(row), 1)
    return text + "\n"


def write_reference(model_dir: Path, images: np.ndarray, source: str) -> Dict[str, Any]:
    """Compute the reference and store it in `model_dir`/card.json; the updated card."""
    reference = reference_of(model_dir, images, source)
    path = Path(model_dir) / CARD_FILE
    card = json.loads(path.read_text(encoding="utf-8"))
    card[REFERENCE_KEY] = reference.to_json()
    path.write_text(card_text(card), encoding="utf-8")
    DriftReference.from_card(load_card(model_dir).raw)  # it reads back
    return card


def validation_images(model_dir: Path, data_dir: Optional[str]) -> np.ndarray:
    """The validation split of the card's training run (its seed, 5,000 images carved from train)."""
    from training.datasets import load_dataset  # torch: only here

    card = load_card(model_dir)
    seed = int(card.training["seed"])
    return split_images(load_dataset(card.dataset, data_dir, val_size=5000, seed=seed).val)


def split_images(split: Any) -> np.ndarray:
    """A training split's images as one uint8 [N, C, H, W] array."""
    return np.concatenate([x.numpy() for x, _ in split.batches(1000)])


def source_text(model_dir: Path, count: int, seed: int) -> str:
    main = sha256_file(load_card(model_dir).block_path("main"))[:16]
    return f"validation ({count} images carved from train, seed {seed}); main block sha256 {main}..."


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m training.drift_profile",
        description=__doc__.split("\n\n")[0],
        epilog="example:\n  python -m training.drift_profile --models models/fashion-mnist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument("--data-dir", help="directory of the IDX files (default: the usual places)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    images = validation_images(args.models, args.data_dir)
    seed = int(load_card(args.models).training["seed"])
    card = write_reference(args.models, images, source_text(args.models, len(images), seed))
    ref = card[REFERENCE_KEY]
    print(
        f"{args.models / CARD_FILE}: {REFERENCE_KEY} of {ref['samples']} samples, "
        f"{len(ref['features'])} features x {ref['levels']} quantiles ({ref['source']})",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
