"""Datasets with fixed train / validation / test splits.

The search's reward uses ``val``; ``test`` is touched only to report the final
best policies. Splits are fixed by ``SPLIT_SEED``, independent of the search seed,
so every search (and every resumed search) sees the same partition.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

SPLIT_SEED = 20190601  # fixed: changing the search seed must not move samples between splits
DIGITS = "digits"
DATASETS = (DIGITS, "mnist", "cifar10", "imagefolder")
DEFAULT_VAL_FRACTION = 0.2


class UnknownDatasetError(ValueError):
    pass


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str


def _stratified_split(labels: np.ndarray, fractions: tuple[float, ...], seed: int) -> list[np.ndarray]:
    """Indices per split, stratified by label, deterministic for ``seed``."""
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        bounds = np.round(np.cumsum(fractions)[:-1] * len(idx)).astype(int)
        for part, chunk in zip(parts, np.split(idx, bounds), strict=True):
            part.append(chunk)
    return [np.sort(np.concatenate(p)) for p in parts]


def load_digits_splits() -> DataSplits:
    """scikit-learn's 8x8 digits (1,797 images, ships with the package): 60/20/20 split."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = bunch.images.astype(np.float32) / 16.0
    y = bunch.target.astype(np.int64)
    train_idx, val_idx, test_idx = _stratified_split(y, (0.6, 0.2, 0.2), SPLIT_SEED)
    # Standardize with training statistics only, so val/test stay unseen.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    xt = torch.from_numpy(x).unsqueeze(1)
    yt = torch.from_numpy(y)

    def part(idx):
        return TensorDataset(xt[idx], yt[idx])

    return DataSplits(part(train_idx), part(val_idx), part(test_idx), 10, (1, 8, 8), DIGITS)


def _torchvision_splits(name: str, root: str, input_size: int | None, val_fraction: float) -> DataSplits:
    import torchvision.transforms as T
    from torchvision import datasets

    if name == "mnist":
        tf = T.Compose([T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])
        full = datasets.MNIST(root, train=True, download=True, transform=tf)
        test = datasets.MNIST(root, train=False, download=True, transform=tf)
        classes, shape = 10, (1, 28, 28)
    elif name == "cifar10":
        tf = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])
        full = datasets.CIFAR10(root, train=True, download=True, transform=tf)
        test = datasets.CIFAR10(root, train=False, download=True, transform=tf)
        classes, shape = 10, (3, 32, 32)
    else:  # imagefolder: ROOT/train/<class>/* and ROOT/val/<class>/* (ImageNet layout)
        size = input_size or 224
        tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        full = datasets.ImageFolder(f"{root}/train", transform=tf)
        test = datasets.ImageFolder(f"{root}/val", transform=tf)
        classes, shape = len(full.classes), (3, size, size)
    labels = np.asarray(getattr(full, "targets", [t for _, t in full.samples]))
    train_idx, val_idx = _stratified_split(labels, (1 - val_fraction, val_fraction), SPLIT_SEED)
    # The official test split stays the test split; validation is carved from train.
    return DataSplits(Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), test,
                      classes, shape, name)


def load_dataset(name: str, *, root: str = "./data", input_size: int | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION) -> DataSplits:
    """Load ``name`` (digits | mnist | cifar10 | imagefolder) as fixed train/val/test splits.

    ``digits`` ships with scikit-learn (no download); the torchvision datasets are
    downloaded to ``root`` on first use; ``imagefolder`` reads ``root/train`` and ``root/val``.
    """
    if name == DIGITS:
        return load_digits_splits()
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}: choose between {', '.join(DATASETS)}")
    return _torchvision_splits(name, root, input_size, val_fraction)


def batches(dataset: Dataset, batch_size: int, *, shuffle: bool = False,
            generator: torch.Generator | None = None, device: torch.device | None = None):
    """Yield ``(x, y)`` batches. In-memory ``TensorDataset``s are sliced directly
    (no DataLoader worker overhead: a digits epoch is milliseconds)."""
    if isinstance(dataset, TensorDataset):
        x, y = dataset.tensors
        order = torch.randperm(len(x), generator=generator) if shuffle else torch.arange(len(x))
        for start in range(0, len(x), batch_size):
            idx = order[start:start + batch_size]
            xb, yb = x[idx], y[idx]
            yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)
        return
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                         generator=generator, num_workers=2)
    for xb, yb in loader:
        yield (xb.to(device), yb.to(device)) if device is not None else (xb, yb)
