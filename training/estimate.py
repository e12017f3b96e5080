"""Extrapolate the wall time of a recipe on this machine from a few timed training steps of each block."""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import torch

from training.engine import augment
from training.meanet import ExtensionBlock, build_models
from training.pipeline import Recipe, recipe_architecture

FMNIST_TRAIN = 55_000  # 60,000 minus the 5,000-image validation split
FMNIST_HARD_FRACTION = 0.5  # half of the classes are hard, and Fashion-MNIST is balanced
PUBLISH_S = (
    180.0  # evaluation of val + test for all blocks, calibration, export (measured: ~2-3 min on 2 cores)
)


def cpu_description(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """CPU model and widest vector unit: hosts of one machine kind differ ~4x in training speed by these."""
    try:
        info = cpuinfo.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return platform.processor() or platform.machine()
    fields = dict(
        (k.strip(), v.strip()) for k, _, v in (line.partition(":") for line in info.splitlines()) if v
    )
    flags = set(fields.get("flags", "").split())
    vector = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no AVX")
    return f"{fields.get('model name', platform.machine())}, {vector.upper()}"


def _median_step_s(
    params: List[torch.nn.Parameter],
    forward: Callable,
    images: torch.Tensor,
    labels: torch.Tensor,
    steps: int,
) -> float:
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    gen = torch.Generator().manual_seed(0)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        x = augment(images, 3, True, gen)
        loss = torch.nn.functional.cross_entropy(forward(x), labels, label_smoothing=0.05)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i >= 2:  # the first steps pay for oneDNN's kernel selection
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def estimate_recipe_seconds(
    recipe: Optional[Recipe] = None, threads: Optional[int] = 2, steps: int = 5
) -> Dict[str, Any]:
    """Seconds the recipe's three stages would take on this CPU (Fashion-MNIST sizes), plus publishing."""
    recipe = recipe or Recipe()
    if threads:
        torch.set_num_threads(threads)
    # Fashion-MNIST's shape, its hard classes and normalisation: the step cost does not depend on the values.
    arch = recipe_architecture(recipe, 1, 10, [0, 2, 3, 4, 6], [72.94], [90.02])
    main, _, cloud = build_models(arch, [1, 28, 28])
    ext = ExtensionBlock(arch, main.feature_channels, main.total_stride)
    bs = recipe.batch_size
    x = torch.randint(0, 256, (bs, 1, 28, 28), dtype=torch.uint8)
    y = torch.randint(0, 10, (bs,))
    yh = torch.randint(0, 5, (bs,))
    step: Dict[str, float] = {}
    main.train()
    step["main"] = _median_step_s(list(main.parameters()), lambda z: main(z)[0], x, y, steps)
    main.eval()

    def ext_forward(z: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            _, feats = main(z)
        return ext(z, feats)

    ext.train()
    step["extension"] = _median_step_s(list(ext.parameters()), ext_forward, x, yh, steps)
    cloud.train()
    step["cloud"] = _median_step_s(list(cloud.parameters()), cloud, x, y, max(3, steps - 2))
    steps_per_epoch = {
        "main": -(-FMNIST_TRAIN // bs),
        "extension": -(-int(FMNIST_TRAIN * FMNIST_HARD_FRACTION) // bs),
        "cloud": -(-FMNIST_TRAIN // bs),
    }
    epochs = {"main": recipe.epochs_main, "extension": recipe.epochs_ext, "cloud": recipe.epochs_cloud}
    stages = {s: step[s] * steps_per_epoch[s] * epochs[s] for s in step}
    stages["publish"] = PUBLISH_S
    step["publish"] = 0.0
    return {"step_s": step, "stages_s": stages, "total_s": sum(stages.values())}
