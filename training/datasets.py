"""Datasets as raw uint8 NCHW images: Fashion-MNIST (idx), CIFAR-100 (python pickles), ImageNet (ImageFolder).

Everything here yields *raw pixels* (uint8); normalisation is inside the models (so inside the ONNX graphs).
The validation split is carved from train with a seeded permutation and is what hard classes and thresholds
are fitted on — the test split is only ever evaluated.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset

from device_agent.sources import FASHION_MNIST_CLASSES, load_idx_dataset

logger = logging.getLogger(__name__)

DATASETS = ("fashion-mnist", "cifar100", "imagenet")
DEFAULT_DIRS = {
    "fashion-mnist": "/usr/share/datasets/fashion-mnist",  # Debian package dataset-fashion-mnist
    "cifar100": "data/cifar100",
    "imagenet": "data/imagenet",
}
FMNIST_CLASSES = list(FASHION_MNIST_CLASSES)
# Per-channel mean/std of the raw pixels (0..255 scale), used inside the models' normalisation layer.
STATS = {
    "fashion-mnist": ([72.94], [90.02]),
    "cifar100": ([129.30, 124.07, 112.43], [68.17, 65.39, 70.42]),
    "imagenet": ([123.68, 116.78, 103.94], [58.39, 57.12, 57.38]),
}


class DatasetError(RuntimeError):
    """A dataset is missing or not in the expected on-disk format."""


class TensorSplit:
    """An in-memory split: uint8 images [N,C,H,W] and int64 labels [N]."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or labels.shape[0] != images.shape[0]:
            raise DatasetError(
                f"bad split tensors: {images.dtype} {tuple(images.shape)} / {tuple(labels.shape)}"
            )
        self.images = images
        self.labels = labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Union[torch.Tensor, Sequence[int]]) -> TensorSplit:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return TensorSplit(self.images[idx], self.labels[idx])

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self), generator=generator) if shuffle else torch.arange(len(self))
        for start in range(0, len(self), batch_size):
            idx = order[start : start + batch_size]
            yield self.images[idx], self.labels[idx]


class FolderSplit:
    """A lazily decoded split (ImageFolder) served through a DataLoader; same interface as TensorSplit."""

    def __init__(self, dataset: Dataset, labels: torch.Tensor, workers: int = 2) -> None:
        self.dataset = dataset
        self.labels = labels.long()
        self.workers = workers

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, indices: Union[torch.Tensor, Sequence[int]]) -> FolderSplit:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return FolderSplit(Subset(self.dataset, idx.tolist()), self.labels[idx], self.workers)

    def batches(
        self, batch_size: int, shuffle: bool = False, generator: Optional[torch.Generator] = None
    ) -> Iterator[Tuple[torch.Tensor, torch.Tensor]]:
        loader = DataLoader(
            self.dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            generator=generator,
            num_workers=self.workers,
            persistent_workers=False,
        )
        for images, labels in loader:
            yield images, labels.long()


Split = Union[TensorSplit, FolderSplit]


@dataclass
class DatasetBundle:
    """Train/validation/test splits plus what the models and the card need to know."""

    name: str
    train: Split
    val: Split
    test: Split
    class_names: List[str]
    input_shape: List[int]  # [C, H, W]
    mean: List[float]
    std: List[float]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def load_fashion_mnist_split(directory: Path, split: str) -> TensorSplit:
    """One split ("train"/"test") from the four idx(.gz) files (`device_agent.sources` reads them)."""
    try:
        images, labels = load_idx_dataset("fashion-mnist", split, search=[str(directory)])
    except (FileNotFoundError, ValueError) as exc:
        raise DatasetError(
            f"{exc}; install the Debian package dataset-fashion-mnist or give --data-dir with the idx files"
        ) from None
    return TensorSplit(torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64)))


def _unpickle(path: Path) -> dict:
    if not path.exists():
        raise DatasetError(f"{path} missing (expected torchvision's cifar-100-python layout)")
    with open(path, "rb") as fh:
        return pickle.load(fh, encoding="latin1")  # the files are Python 2 pickles


def load_cifar100_split(root: Path, split: str) -> TensorSplit:
    """One split from `<root>/cifar-100-python/{train,test}` (rows of 3072 bytes, fine labels)."""
    base = root / "cifar-100-python" if (root / "cifar-100-python").exists() else root
    entry = _unpickle(base / split)
    data = np.asarray(entry["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
    labels = np.asarray(entry["fine_labels"], dtype=np.int64)
    return TensorSplit(torch.from_numpy(data.copy()), torch.from_numpy(labels))


def cifar100_classes(root: Path) -> List[str]:
    base = root / "cifar-100-python" if (root / "cifar-100-python").exists() else root
    return [str(n) for n in _unpickle(base / "meta")["fine_label_names"]]


def load_imagenet_split(
    root: Path, split: str, image_size: int, workers: int
) -> Tuple[FolderSplit, List[str]]:
    """ImageFolder tree `<root>/{train,val}/<class>/<image>`, resized + centre-cropped to image_size."""
    from torchvision import transforms
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise DatasetError(f"{folder} missing (expected an ImageFolder tree <root>/{{train,val}}/<class>/*)")
    tf = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.CenterCrop(image_size),
            transforms.Lambda(lambda im: im.convert("RGB")),
            transforms.PILToTensor(),
        ]
    )
    ds = ImageFolder(str(folder), transform=tf)
    return FolderSplit(ds, torch.as_tensor(ds.targets), workers), list(ds.classes)


def carve_validation(train: Split, val_size: int, seed: int) -> Tuple[Split, Split]:
    """Seeded split of `val_size` training images into a validation set (never the test set)."""
    n = len(train)
    val_size = min(val_size, n // 5) if n < 5 * val_size else val_size
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return train.subset(perm[val_size:].sort().values), train.subset(perm[:val_size].sort().values)


def load_dataset(
    name: str,
    data_dir: Optional[Union[str, Path]] = None,
    val_size: int = 5000,
    seed: int = 0,
    image_size: int = 64,
    workers: int = 2,
) -> DatasetBundle:
    """Load a dataset by name with its validation split carved from train."""
    if name not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    root = Path(data_dir or DEFAULT_DIRS[name])
    train: Split
    test: Split
    if name == "fashion-mnist":
        train, test = load_fashion_mnist_split(root, "train"), load_fashion_mnist_split(root, "test")
        classes = list(FMNIST_CLASSES)
    elif name == "cifar100":
        train, test = load_cifar100_split(root, "train"), load_cifar100_split(root, "test")
        classes = cifar100_classes(root)
    else:
        train, classes = load_imagenet_split(root, "train", image_size, workers)
        test, test_classes = load_imagenet_split(root, "val", image_size, workers)
        if test_classes != classes:
            raise DatasetError(f"{root}/val has classes {test_classes[:3]}... unlike train {classes[:3]}...")
    train, val = carve_validation(train, val_size, seed)
    shape = _input_shape(train)
    mean, std = STATS[name]
    if len(mean) != shape[0]:
        raise DatasetError(f"{name}: {shape[0]} channels, statistics for {len(mean)}")
    logger.info("%s: train %d, val %d, test %d, input %s", name, len(train), len(val), len(test), shape)
    return DatasetBundle(name, train, val, test, classes, shape, list(mean), list(std))


def _input_shape(split: Split) -> List[int]:
    if isinstance(split, TensorSplit):
        return [int(d) for d in split.images.shape[1:]]
    image, _ = split.dataset[0]
    return [int(d) for d in image.shape]


def take(split: Split, count: int, seed: int) -> Split:
    """A seeded random subset of at most `count` samples (for --quick)."""
    if count >= len(split):
        return split
    perm = torch.randperm(len(split), generator=torch.Generator().manual_seed(seed))
    return split.subset(perm[:count].sort().values)
