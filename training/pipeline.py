"""The recipe: stage 1 (main), hard classes, stage 2 (adaptive + extension), cloud; per-stage checkpoints.

`train_models` trains (or resumes from checkpoints) and `training.publish.publish` calibrates, exports and
writes the card — so a GPU machine can train and a CPU machine export, through the code path `make train`
runs.
"""

from __future__ import annotations

import logging
import platform
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from training.augment import DEFAULT_KINDS
from training.datasets import DatasetBundle, load_dataset, take
from training.engine import OptimConfig, collect, resolve_device, train_stage
from training.meanet import Architecture, CloudNet, ExtensionBlock, MainBlock, build_models
from training.reference import select_hard_classes

logger = logging.getLogger(__name__)

STAGES = ("main", "extension", "cloud")


@dataclass
class Recipe:
    """Every knob of a training run; the defaults are what `make train` runs."""

    dataset: str = "fashion-mnist"
    backbone: str = "resnet"
    seed: int = 0
    epochs_main: int = 15
    epochs_ext: int = 20
    epochs_cloud: int = 15
    batch_size: int = 128
    max_lr: float = 0.1
    weight_decay: float = 5e-4
    label_smoothing: float = 0.05
    hard_count: Optional[int] = None  # None: half of the classes
    hard_mode: str = "lowest-accuracy"
    val_size: int = 5000
    image_size: int = 64  # ImageFolder datasets only
    max_offload: float = 0.25
    tolerance: float = 0.003  # the cascade may trail the cloud by this much (the target) ...
    confidence: float = 0.95  # ... on unseen data with this probability (reference.calibrate_offload)
    quick: bool = False
    train_limit: Optional[int] = None
    val_limit: Optional[int] = None
    test_limit: Optional[int] = None
    main_size: str = "main"
    cloud_size: str = "cloud"
    adaptive_channels: Tuple[int, int] = (32, 64)
    adaptive_blocks: int = 1
    extension_width: int = 96
    extension_blocks: int = 2
    main_overrides: Dict[str, Any] = field(default_factory=dict)
    cloud_overrides: Dict[str, Any] = field(default_factory=dict)
    # Robust training (issue 16): corrupt this share of training images (training/augment.py), crop shifts of
    # up to `crop_padding` px (None: H // 8), and start from a published model directory (fine-tuning: its
    # architecture and hard classes are kept) instead of from scratch.
    corruption_p: float = 0.0
    corruption_kinds: Tuple[str, ...] = DEFAULT_KINDS
    crop_padding: Optional[int] = None
    init_from: Optional[str] = None
    # Distillation from the cloud model of a published directory (its ONNX, on each clean training image):
    # fine-tuning under corruptions then keeps learning the clean answers, not only the labels.
    distill_from: Optional[str] = None
    distill_weight: float = 0.5
    distill_temperature: float = 2.0

    @classmethod
    def quick_recipe(cls, **kw: Any) -> Recipe:
        """A smoke-test recipe: subsets, tiny nets, one epoch per stage (well under a minute on 2 cores)."""
        base: Dict[str, Any] = dict(
            quick=True,
            epochs_main=1,
            epochs_ext=1,
            epochs_cloud=1,
            train_limit=2000,
            val_limit=500,
            test_limit=500,
            main_size="tiny",
            cloud_size="tiny-cloud",
            adaptive_channels=(8, 16),
            adaptive_blocks=0,
            extension_width=16,
            extension_blocks=1,
        )
        base.update({k: v for k, v in kw.items() if v is not None})
        return cls(**base)

    def optim(self, epochs: int) -> OptimConfig:
        return OptimConfig(
            epochs=epochs,
            batch_size=self.batch_size,
            max_lr=self.max_lr,
            weight_decay=self.weight_decay,
            label_smoothing=self.label_smoothing,
            crop_padding=self.crop_padding,
            corruption_p=self.corruption_p,
            corruption_kinds=tuple(self.corruption_kinds),
            distill_weight=self.distill_weight if self.distill_from else 0.0,
            distill_temperature=self.distill_temperature,
        )

    def to_dict(self) -> Dict[str, Any]:
        d = asdict(self)
        d["adaptive_channels"] = list(self.adaptive_channels)
        d["corruption_kinds"] = list(self.corruption_kinds)
        return d


@dataclass
class Trained:
    """The three trained modules, their architecture and per-stage training facts."""

    arch: Architecture
    main: MainBlock
    extension: ExtensionBlock
    cloud: CloudNet
    stages: Dict[str, Dict[str, Any]]
    recipe: Dict[str, Any]


def load_bundle(recipe: Recipe, data_dir: Optional[str], workers: int = 2) -> DatasetBundle:
    """The dataset with its validation split, cut down to the recipe's limits."""
    bundle = load_dataset(
        recipe.dataset,
        data_dir,
        val_size=recipe.val_size,
        seed=recipe.seed,
        image_size=recipe.image_size,
        workers=workers,
    )
    if recipe.train_limit:
        bundle.train = take(bundle.train, recipe.train_limit, recipe.seed)
    if recipe.val_limit:
        bundle.val = take(bundle.val, recipe.val_limit, recipe.seed + 1)
    if recipe.test_limit:
        bundle.test = take(bundle.test, recipe.test_limit, recipe.seed + 2)
    return bundle


def architecture_for(recipe: Recipe, bundle: DatasetBundle, hard_classes: List[int]) -> Architecture:
    return recipe_architecture(
        recipe, bundle.input_shape[0], bundle.num_classes, hard_classes, list(bundle.mean), list(bundle.std)
    )


def recipe_architecture(
    recipe: Recipe,
    in_channels: int,
    num_classes: int,
    hard_classes: List[int],
    mean: List[float],
    std: List[float],
) -> Architecture:
    """The recipe's blocks for data of this shape and normalisation."""
    return Architecture(
        backbone=recipe.backbone,
        in_channels=in_channels,
        num_classes=num_classes,
        hard_classes=list(hard_classes),
        mean=mean,
        std=std,
        main_size=recipe.main_size,
        cloud_size=recipe.cloud_size,
        main_overrides=dict(recipe.main_overrides),
        cloud_overrides=dict(recipe.cloud_overrides),
        adaptive_channels=tuple(recipe.adaptive_channels),  # type: ignore[arg-type]
        adaptive_blocks=recipe.adaptive_blocks,
        extension_width=recipe.extension_width,
        extension_blocks=recipe.extension_blocks,
    )


def _stage_facts(
    stats: Dict[str, float], epochs: int, device: torch.device, start: Any = None
) -> Dict[str, Any]:
    fine_tuned = {} if start is None else {"fine_tuned_from": start.source}
    return {
        **fine_tuned,
        "epochs": epochs,
        "seconds": round(stats.get("seconds", 0.0), 1),
        "train_loss": round(stats.get("loss", float("nan")), 5),
        "train_accuracy": round(stats.get("accuracy", float("nan")), 5),
        "device": device.type,
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "torch": str(torch.__version__),  # a plain str: TorchVersion does not pass weights_only loading
    }


def save_checkpoint(path: Path, module: nn.Module, arch: Architecture, recipe: Recipe, facts: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in module.state_dict().items()}
    torch.save(
        {"state_dict": state, "arch": arch.to_dict(), "recipe": recipe.to_dict(), "facts": facts}, path
    )


def load_checkpoint(path: Path) -> Dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


def teacher_logits(model_dir: Path, images: torch.Tensor, cache_dir: Optional[Path] = None) -> torch.Tensor:
    """The cloud model of a published directory on each image (uint8 [N,C,H,W]): logits [N, classes].

    Cached in `cache_dir` by the model's sha256 and the images' own, so parallel stage runs sharing a
    checkpoint directory compute it once."""
    import hashlib

    import numpy as np

    from cloud_worker.model import CloudSession
    from device_agent.card import sha256_file

    session = CloudSession(model_dir)
    digest = hashlib.sha256(images.numpy().tobytes()).hexdigest()[:12]
    model_sha = sha256_file(session.path)[:12]
    cache = cache_dir / f"teacher-{model_sha}-{digest}.pt" if cache_dir else None
    if cache is not None and cache.exists():
        return torch.load(cache, weights_only=True)
    array = images.numpy()
    out = torch.from_numpy(
        np.concatenate([session.logits(array[i : i + 500]) for i in range(0, len(array), 500)])
    )
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp")
        torch.save(out, tmp)
        tmp.replace(cache)
    logger.info("teacher %s: logits of %d training images", model_dir, len(out))
    return out


def train_models(
    recipe: Recipe,
    bundle: DatasetBundle,
    device_name: str = "auto",
    checkpoint_dir: Optional[Path] = None,
    progress: bool = True,
    command: str = "",
    stages: Sequence[str] = STAGES,
) -> Trained:
    """Train main, then (with hard classes from validation) the extension, then the cloud model.

    A stage whose checkpoint is in `checkpoint_dir` is loaded instead of trained; one trained is saved there.
    Stages not in `stages` are neither loaded nor trained (their modules stay untrained).
    """
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    logger.info("training on %s", device)
    facts: Dict[str, Dict[str, Any]] = {}
    ckpt = {s: checkpoint_dir / f"{s}.pt" for s in STAGES} if checkpoint_dir else {}
    start = None
    if recipe.init_from:
        from training.published import load_published

        start = load_published(Path(recipe.init_from), bundle.train.images)  # type: ignore[union-attr]
        facts = {name: {**start.stages.get(name, {}), "kept_from": start.source} for name in STAGES}
        logger.info("starting from %s (hard classes %s)", recipe.init_from, start.arch.hard_classes)
    teacher = None
    if recipe.distill_from:
        teacher = teacher_logits(Path(recipe.distill_from), bundle.train.images, checkpoint_dir)  # type: ignore[union-attr]

    # ---- stage 1: main block on all classes
    if ckpt and ckpt["main"].exists():
        saved = load_checkpoint(ckpt["main"])
        # hard classes come from the checkpoint (they belong to that main block); the rest from the recipe
        hard = Architecture.from_dict(saved["arch"]).hard_classes
        if start is not None and hard != start.arch.hard_classes:
            raise RuntimeError(f"{ckpt['main']} was trained for other hard classes than {recipe.init_from}")
        arch = start.arch if start else architecture_for(recipe, bundle, hard)
        main, extension, cloud = build_models(arch, bundle.input_shape)
        main.load_state_dict(saved["state_dict"])
        if start is not None:  # the stages still to fine-tune start from the published modules
            extension, cloud = start.extension, start.cloud
        facts["main"] = saved["facts"]
        logger.info("main block loaded from %s (hard classes %s)", ckpt["main"], arch.hard_classes)
    elif start is not None and "main" not in stages:
        arch, main, extension, cloud = start.arch, start.main, start.extension, start.cloud
    elif "main" not in stages:
        arch = architecture_for(recipe, bundle, hard_classes=[0])
        main, extension, cloud = build_models(arch, bundle.input_shape)
    else:
        torch.manual_seed(recipe.seed)
        arch = start.arch if start else architecture_for(recipe, bundle, hard_classes=[0])
        main = (start.main if start else MainBlock(arch)).to(device)
        stats = train_stage(
            "main",
            list(main.parameters()),
            [main],
            [],
            lambda x: main(x)[0],
            bundle.train,
            recipe.optim(recipe.epochs_main),
            device,
            recipe.seed,
            progress=progress,
            soft_targets=teacher,
        )
        main.eval()
        if start is None:
            (val_logits, _), val_labels = collect(lambda x: main(x), bundle.val, device)
            count = recipe.hard_count or bundle.num_classes // 2
            hard = select_hard_classes(val_logits, val_labels, bundle.num_classes, count, recipe.hard_mode)
            arch = architecture_for(recipe, bundle, hard)
            logger.info("hard classes (%s, validation): %s", recipe.hard_mode, hard)
        facts["main"] = _stage_facts(stats, recipe.epochs_main, device, start)
        facts["main"]["command"] = command
        if ckpt:
            save_checkpoint(ckpt["main"], main, arch, recipe, facts["main"])
        if start is None:
            main_state = main.state_dict()
            main, extension, cloud = build_models(arch, bundle.input_shape)
            main.load_state_dict(main_state)
        else:
            extension, cloud = start.extension, start.cloud
    main.to(device).eval()

    # ---- stage 2: adaptive + extension on hard-class samples, main frozen (BatchNorm in eval mode)
    if "extension" not in stages:
        pass
    elif ckpt and ckpt["extension"].exists():
        saved = load_checkpoint(ckpt["extension"])
        if saved["arch"]["hard_classes"] != arch.hard_classes:
            raise RuntimeError(f"{ckpt['extension']} was trained for other hard classes than {ckpt['main']}")
        extension.load_state_dict(saved["state_dict"])
        facts["extension"] = saved["facts"]
    else:
        torch.manual_seed(recipe.seed + 1)
        if start is None:
            extension = ExtensionBlock(arch, main.feature_channels, main.total_stride)
        extension.to(device)
        for p in main.parameters():
            p.requires_grad_(False)
        hard_t = torch.as_tensor(arch.hard_classes)
        label_map = torch.full((bundle.num_classes,), -1, dtype=torch.long)
        label_map[hard_t] = torch.arange(len(hard_t))
        hard_rows = torch.nonzero(torch.isin(bundle.train.labels, hard_t)).flatten()
        hard_train = bundle.train.subset(hard_rows)
        ext = extension

        def ext_forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                _, feats = main(x)
            return ext(x, feats)

        stats = train_stage(
            "extension",
            list(extension.parameters()),
            [extension],
            [main],
            ext_forward,
            hard_train,
            recipe.optim(recipe.epochs_ext),
            device,
            recipe.seed + 1,
            label_map=label_map,
            progress=progress,
            soft_targets=None if teacher is None else teacher[hard_rows][:, hard_t],
        )
        facts["extension"] = _stage_facts(stats, recipe.epochs_ext, device, start)
        facts["extension"]["command"] = command
        facts["extension"]["train_samples"] = len(hard_train)
        if ckpt:
            save_checkpoint(ckpt["extension"], extension, arch, recipe, facts["extension"])
    extension.to(device).eval()

    # ---- cloud model: larger backbone on all classes
    if "cloud" not in stages:
        pass
    elif ckpt and ckpt["cloud"].exists():
        saved = load_checkpoint(ckpt["cloud"])
        cloud.load_state_dict(saved["state_dict"])
        facts["cloud"] = saved["facts"]
    else:
        torch.manual_seed(recipe.seed + 2)
        cloud = (cloud if start else CloudNet(arch)).to(device)
        stats = train_stage(
            "cloud",
            list(cloud.parameters()),
            [cloud],
            [],
            cloud,
            bundle.train,
            recipe.optim(recipe.epochs_cloud),
            device,
            recipe.seed + 2,
            progress=progress,
            soft_targets=teacher,
        )
        facts["cloud"] = _stage_facts(stats, recipe.epochs_cloud, device, start)
        facts["cloud"]["command"] = command
        if ckpt:
            save_checkpoint(ckpt["cloud"], cloud, arch, recipe, facts["cloud"])
    cloud.to(device).eval()
    for p in main.parameters():
        p.requires_grad_(True)
    return Trained(arch, main, extension, cloud, facts, recipe.to_dict())
