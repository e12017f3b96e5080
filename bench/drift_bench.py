"""How soon does the device's drift monitor flag a corruption, and does it ever flag clean data?

The device's own monitor (`device_agent.drift.DriftMonitor`, default settings, the committed card's
reference) is fed the main block's softmax (onnxruntime, as on the device), and each image where the
reference watches the inputs, for:

- clean: the 10,000 Fashion-MNIST test images in their order: every alarm is a false one (target: none);
- each corruption of the suite (`training.corruptions`): `--prefix` clean test images, then the following
  test images corrupted. Samples to flag = corrupted samples seen when the first alarm came (target: <= 500).
  The onset is tried at `--phases` offsets within one stride (a test every `stride` samples: where the onset
  falls against the tests matters), and the worst is reported.

No broker and no agent: the statistic and its settings are the agent's, the outputs are the ones it would see
(`tests/test_drift.py` checks the agent end to end). Figures are for synthetic corruptions of real test data.

    python -m bench.drift_bench [--models models/fashion-mnist] [--json results/drift.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

import numpy as np

from device_agent.cascade import EdgeCascade
from device_agent.drift import DriftCheck, DriftMonitor, DriftReference, DriftSettings
from device_agent.sources import load_idx_dataset
from training.corruptions import corrupt, suite

TARGET_SAMPLES = 500  # issue #16: flagged within 500 samples of the onset ...
TARGET_CLEAN = 10_000  # ... and never on 10,000 clean test samples


@dataclass
class Flagged:
    corruption: str
    accuracy: float  # the main block's on the corrupted samples
    samples_to_flag: List[Optional[int]]  # per onset phase; None: not flagged within `after`
    alarms_before_onset: int  # false alarms on the clean prefix, all phases together

    @property
    def worst(self) -> Optional[int]:
        return None if any(s is None for s in self.samples_to_flag) else max(self.samples_to_flag)  # type: ignore[type-var]

    @property
    def met(self) -> bool:
        return self.worst is not None and self.worst <= TARGET_SAMPLES and self.alarms_before_onset == 0


def main_probs(cascade: EdgeCascade, images: np.ndarray, batch: int = 1000) -> np.ndarray:
    return np.concatenate(
        [cascade.run_main(images[i : i + batch]).probs for i in range(0, len(images), batch)]
    )


def alarms(
    reference: DriftReference, settings: DriftSettings, probs: np.ndarray, images: Optional[np.ndarray] = None
) -> List[int]:
    """The positions in `probs` at which the monitor flagged drift."""
    return [c.seq for c in checks(reference, settings, probs, images) if c.drift]


def checks(
    reference: DriftReference, settings: DriftSettings, probs: np.ndarray, images: Optional[np.ndarray] = None
) -> List[DriftCheck]:
    """Every test the monitor makes on `probs` (sample i has seq i) and their `images`, which a reference
    that watches the inputs needs and one of the outputs alone leaves aside."""
    monitor = DriftMonitor(reference, settings)
    found = []
    for i, row in enumerate(probs):
        check = monitor.observe(row, i, None if images is None else images[i])
        if check is not None:
            found.append(check)
    return found


def flag_corruption(
    reference: DriftReference,
    settings: DriftSettings,
    clean: np.ndarray,
    corrupted: np.ndarray,
    onsets: Sequence[int],
    clean_images: Optional[np.ndarray] = None,
    corrupted_images: Optional[np.ndarray] = None,
) -> Flagged:
    """`clean` and `corrupted` are the main block's softmax of the same test images, clean and corrupted
    (and the images themselves, for a reference that watches the inputs)."""
    flags: List[Optional[int]] = []
    before = 0
    for onset in onsets:
        stream = np.concatenate([clean[:onset], corrupted[onset:]])
        images = None
        if clean_images is not None and corrupted_images is not None:
            images = np.concatenate([clean_images[:onset], corrupted_images[onset:]])
        found = alarms(reference, settings, stream, images)
        before += sum(i < onset for i in found)
        after = [i for i in found if i >= onset]
        flags.append(after[0] - onset + 1 if after else None)
    return Flagged("", 0.0, flags, before)


def run(models: Path, prefix: int, after: int, phases: int, kinds: Optional[List[str]]) -> Dict[str, Any]:
    cascade = EdgeCascade(models)
    reference = DriftReference.from_card(cascade.card.raw)
    if reference is None:
        raise SystemExit(f"{models}/card.json has no drift reference: python -m training.drift_profile")
    settings = DriftSettings()
    images, labels = load_idx_dataset("fashion-mnist", "test")
    started = time.monotonic()
    clean = main_probs(cascade, images)
    clean_checks = checks(reference, settings, clean, images)
    clean_alarms = [c.seq for c in clean_checks if c.drift]
    step = max(1, settings.stride // phases)
    onsets = [prefix + i * step for i in range(phases)]
    end = min(len(images), onsets[-1] + after)
    rows = []
    for corruption in suite(kinds):
        corrupted = np.zeros_like(clean)
        corrupted_images = images.copy()
        corrupted_images[prefix:end] = corrupt(images[prefix:end], corruption, indices=range(prefix, end))
        corrupted[prefix:end] = main_probs(cascade, corrupted_images[prefix:end])
        flagged = flag_corruption(
            reference,
            settings,
            clean[:end],
            corrupted[:end],
            onsets,
            images[:end],
            corrupted_images[:end],
        )
        flagged.corruption = corruption.describe
        flagged.accuracy = float(np.mean(corrupted[prefix:end].argmax(1) == labels[prefix:end]))
        rows.append(flagged)
        print(f"{corruption.name}: {flagged.samples_to_flag}", file=sys.stderr, flush=True)
    return {
        "settings": {**vars(settings), "level": settings.level(len(reference.features))},
        "reference": reference.source,
        "clean": {
            "samples": len(clean),
            "tests": len(clean_checks),
            "alarms": len(clean_alarms),
            "alarm_positions": clean_alarms[:20],
            "min_p_value": min(c.p_value for c in clean_checks),  # the margin below which an alarm would come
        },
        "clean_accuracy": float(np.mean(clean.argmax(1) == labels)),
        "onsets": onsets,
        "corruptions": [
            {
                "corruption": r.corruption,
                "main_accuracy": r.accuracy,
                "samples_to_flag": r.samples_to_flag,
                "worst": r.worst,
                "alarms_before_onset": r.alarms_before_onset,
                "met": r.met,
            }
            for r in rows
        ],
        "seconds": time.monotonic() - started,
    }


def print_table(result: Dict[str, Any]) -> None:
    s = result["settings"]
    print(
        f"drift monitor: window {s['window']}, a test every {s['stride']} samples, alpha {s['alpha']} over "
        f"{s['horizon']:,} samples (per-test level {s['level']:.2e}); reference {result['reference']}"
    )
    print("synthetic corruptions of the real Fashion-MNIST test split; main-block accuracy on them")
    print()
    print("| corruption | main accuracy | samples to flag (worst of onsets) | per onset | target <= 500 |")
    print("|---|---:|---:|---|---|")
    for r in result["corruptions"]:
        worst = "not flagged" if r["worst"] is None else str(r["worst"])
        per = ", ".join("–" if x is None else str(x) for x in r["samples_to_flag"])
        met = "met" if r["met"] else "NOT met"
        print(f"| {r['corruption']} | {100 * r['main_accuracy']:.1f} % | {worst} | {per} | {met} |")
    clean = result["clean"]
    verdict = "met" if clean["alarms"] == 0 and clean["samples"] >= TARGET_CLEAN else "NOT met"
    print()
    print(
        f"clean test split ({clean['samples']:,} samples, "
        f"main accuracy {100 * result['clean_accuracy']:.2f} %): "
        f"{clean['tests']} tests, {clean['alarms']} false alarms (target 0: {verdict}); smallest p-value "
        f"{clean['min_p_value']:.1e} against the per-test level {s['level']:.1e}"
    )
    met = sum(r["met"] for r in result["corruptions"])
    print(f"flagged within {TARGET_SAMPLES} samples: {met} of {len(result['corruptions'])} corruptions")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.drift_bench",
        description=__doc__.split("\n\n")[0],
        epilog="examples:\n  python -m bench.drift_bench\n"
        "  python -m bench.drift_bench --kinds gaussian-noise,blur --json results/drift.json",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--models", type=Path, default=Path("models/fashion-mnist"))
    parser.add_argument(
        "--prefix", type=int, default=1000, help="clean samples before the onset (default 1000)"
    )
    parser.add_argument("--after", type=int, default=1000, help="corrupted samples after it (default 1000)")
    parser.add_argument("--phases", type=int, default=5, help="onsets tried within one stride (default 5)")
    parser.add_argument("--kinds", help="comma-separated corruption kinds (default: the whole suite)")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    result = run(
        args.models, args.prefix, args.after, args.phases, args.kinds.split(",") if args.kinds else None
    )
    print_table(result)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
