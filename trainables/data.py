"""Datasets with fixed train / validation / test splits.

The search's reward uses ``val``; ``test`` is touched only to report the final
best policies. Splits are fixed by ``SPLIT_SEED``, independent of the search seed,
so every search (and every resumed search) sees the same partition.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from .node import node_data_root, node_label, prepare_once

SPLIT_SEED = 20190601  # fixed: changing the search seed must not move samples between splits
DIGITS = "digits"
DATASETS = (DIGITS, "mnist", "cifar10", "imagefolder")
DEFAULT_VAL_FRACTION = 0.2
DIGITS_POOL_VAL_FRACTION = 0.25  # digits: val is 20% of all, i.e. 25% of the non-test 80%


SUBSET_OPTIONS = ("classes", "train_per_class", "val_per_class")
# Facts of the downloadable datasets, known without downloading them (validation
# must not write): classes, one image's shape, training images of the smallest class.
KNOWN_FACTS = {"mnist": (10, (1, 28, 28), 5421), "cifar10": (10, (3, 32, 32), 5000)}
IMAGEFOLDER_DEFAULT_SIZE = 224


class UnknownDatasetError(ValueError):
    pass


class SubsetError(ValueError):
    """``dataset_options`` ask for more classes or images than the data has."""


@dataclass(frozen=True)
class DatasetOptions:
    """A HAQ-style subset: ``classes`` classes, ``train_per_class`` / ``val_per_class``
    images of each taken from the training data (HAQ searched ImageNet on 100 classes).

    Deterministic and independent of the search seed (``SPLIT_SEED``), like the splits.
    Labels keep their full-dataset indices, so a model keeps its full classifier
    (a pretrained 1000-way head stays valid on an ImageNet subset, and the cost table
    prices the classifier that is deployed). The test split is left untouched.
    """

    classes: int | None = None
    train_per_class: int | None = None
    val_per_class: int | None = None

    def __post_init__(self) -> None:
        for name in SUBSET_OPTIONS:
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"dataset_options.{name}: expected a positive integer, got {value!r}")

    @classmethod
    def from_dict(cls, options: dict | None) -> DatasetOptions:
        options = options or {}
        if not isinstance(options, dict):
            raise ValueError(f"dataset_options: expected a mapping ({', '.join(SUBSET_OPTIONS)}), got {options!r}")
        unknown = sorted(set(options) - set(SUBSET_OPTIONS))
        if unknown:
            raise ValueError(f"dataset_options: unknown option(s) {', '.join(map(str, unknown))}; "
                             f"expected some of {', '.join(SUBSET_OPTIONS)}")
        return cls(**options)

    @property
    def is_subset(self) -> bool:
        return any(getattr(self, name) is not None for name in SUBSET_OPTIONS)

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in SUBSET_OPTIONS if getattr(self, name) is not None}


@dataclass
class DataSplits:
    train: Dataset
    val: Dataset
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    name: str
    fingerprint: str = ""  # what the data is (sizes, classes, files): part of the reference cache key


@dataclass(frozen=True)
class DatasetFacts:
    """What validation needs to know about a dataset, without reading any image."""

    num_classes: int
    input_shape: tuple[int, int, int]  # one sample, as trials see it
    min_pool_per_class: int  # train + val images of the smallest class (what a subset draws from)
    pool_val_fraction: float = DEFAULT_VAL_FRACTION  # default share of the pool that is validation


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


def _subset_split(labels: np.ndarray, pool: np.ndarray, num_classes: int, options: DatasetOptions,
                  val_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices of a subset drawn from ``pool`` (indices into ``labels``).

    Classes: ``options.classes`` of them, drawn once with ``SPLIT_SEED``; per class,
    the pool is permuted with ``SPLIT_SEED``: the first ``val_per_class`` images are
    validation, the next ``train_per_class`` training (defaults: the usual fractions).
    """
    rng = np.random.default_rng(SPLIT_SEED)
    n_classes = options.classes or num_classes
    if n_classes > num_classes:
        raise SubsetError(f"dataset_options.classes: expected at most the {num_classes} classes "
                          f"the data has, got {n_classes}")
    chosen = np.sort(rng.permutation(num_classes)[:n_classes])
    train, val = [], []
    for label in chosen:
        idx = rng.permutation(pool[labels[pool] == label])
        n_val = options.val_per_class if options.val_per_class is not None else int(round(val_fraction * len(idx)))
        n_train = options.train_per_class if options.train_per_class is not None else len(idx) - n_val
        if n_val + n_train > len(idx):
            raise SubsetError(
                f"dataset_options: expected at most {len(idx)} train + val images for class {int(label)}, "
                f"got train_per_class={n_train} + val_per_class={n_val}"
            )
        val.append(idx[:n_val])
        train.append(idx[n_val:n_val + n_train])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def check_subset(facts: DatasetFacts, options: DatasetOptions) -> None:
    """Raise ``SubsetError`` when ``options`` ask for more than the data has (from facts only)."""
    val_fraction = facts.pool_val_fraction
    if options.classes is not None and options.classes > facts.num_classes:
        raise SubsetError(f"dataset_options.classes: expected at most the {facts.num_classes} classes "
                          f"the data has, got {options.classes}")
    pool = facts.min_pool_per_class
    n_val = options.val_per_class if options.val_per_class is not None else int(round(val_fraction * pool))
    n_train = options.train_per_class if options.train_per_class is not None else max(pool - n_val, 0)
    if n_val + n_train > pool:
        raise SubsetError(
            f"dataset_options: expected at most {pool} train + val images per class (the smallest "
            f"class has {pool}), got train_per_class={n_train} + val_per_class={n_val}"
        )


def _fingerprint(*parts) -> str:
    """Short hash of ``parts``; lists (file names, indices: millions for ImageNet) item by item."""
    digest = hashlib.sha256()
    for part in parts:
        for item in (part if isinstance(part, list) else [part]):
            digest.update(item.tobytes() if isinstance(item, np.ndarray) else repr(item).encode())
            digest.update(b"\n")
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def _digits_arrays():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float32) / 16.0, bunch.target.astype(np.int64)


def load_digits_splits(options: DatasetOptions | None = None) -> DataSplits:
    """scikit-learn's 8x8 digits (1,797 images, ships with the package): 60/20/20 split.

    A subset (``options``) draws its train and val images from the 80% that is not test.
    """
    x, y = _digits_arrays()
    train_idx, val_idx, test_idx = _stratified_split(y, (0.6, 0.2, 0.2), SPLIT_SEED)
    if options is not None and options.is_subset:
        pool = np.sort(np.concatenate([train_idx, val_idx]))
        train_idx, val_idx = _subset_split(y, pool, 10, options, DIGITS_POOL_VAL_FRACTION)
    # Standardize with training statistics only, so val/test stay unseen.
    mean, std = x[train_idx].mean(), x[train_idx].std()
    x = (x - mean) / std
    xt = torch.from_numpy(x).unsqueeze(1)
    yt = torch.from_numpy(y)

    def part(idx):
        return TensorDataset(xt[idx], yt[idx])

    fingerprint = _fingerprint(DIGITS, len(y), train_idx, val_idx)
    return DataSplits(part(train_idx), part(val_idx), part(test_idx), 10, (1, 8, 8), DIGITS, fingerprint)


def _check_imagefolder(root: str) -> None:
    """A missing ImageFolder root names the node it is missing on: on a cluster each node
    reads its own data root (or a shared file system mounted at the same path)."""
    for split in ("train", "val"):
        if not os.path.isdir(os.path.join(root, split)):
            raise FileNotFoundError(
                f"data_root {root!r} on node {node_label()}: expected an ImageNet-layout folder with "
                f"train/<class>/* and val/<class>/* images, got no {split}/ folder in it")


def _imagefolder_files(root: str) -> tuple[list[str], list[int]]:
    """Class names and labels of ``root/train`` (ImageFolder's own scan: sorted, no image read)."""
    from torchvision import datasets

    _check_imagefolder(root)
    train = datasets.ImageFolder(f"{root}/train")
    return train.classes, [t for _, t in train.samples]


def dataset_facts(name: str, *, root: str | None = None, input_size: int | None = None) -> DatasetFacts:
    """Classes, sample shape and per-class pool size of ``name``, reading no image and
    downloading nothing (an ImageFolder's directories are listed). ``root`` as in
    ``load_dataset``."""
    if name == DIGITS:
        _, y = _digits_arrays()
        train_idx, val_idx, _ = _stratified_split(y, (0.6, 0.2, 0.2), SPLIT_SEED)
        pool = np.bincount(y[np.concatenate([train_idx, val_idx])], minlength=10)
        return DatasetFacts(10, (1, 8, 8), int(pool.min()), DIGITS_POOL_VAL_FRACTION)
    if name in KNOWN_FACTS:
        classes, shape, pool = KNOWN_FACTS[name]
        return DatasetFacts(classes, shape, pool)
    if name != "imagefolder":
        raise UnknownDatasetError(f"unknown dataset {name!r}: choose between {', '.join(DATASETS)}")
    classes, labels = _imagefolder_files(node_data_root(root))
    size = input_size or IMAGEFOLDER_DEFAULT_SIZE
    pool = np.bincount(np.asarray(labels, dtype=np.int64), minlength=len(classes))
    return DatasetFacts(len(classes), (3, size, size), int(pool.min()))


def _torchvision_splits(name: str, root: str, input_size: int | None, val_fraction: float,
                        options: DatasetOptions) -> DataSplits:
    import torchvision.transforms as T
    from torchvision import datasets

    if name in ("mnist", "cifar10"):
        if name == "mnist":
            kind, classes, shape = datasets.MNIST, 10, (1, 28, 28)
            tf = T.Compose([T.ToTensor(), T.Normalize((0.1307,), (0.3081,))])
        else:
            kind, classes, shape = datasets.CIFAR10, 10, (3, 32, 32)
            tf = T.Compose([T.ToTensor(), T.Normalize((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))])

        def build(download: bool):
            return (kind(root, train=True, download=download, transform=tf),
                    kind(root, train=False, download=download, transform=tf))

        # Once per node: concurrent trials of a node wait for the first one's download.
        (full, test), _ = prepare_once(root, name, build)
    else:  # imagefolder: ROOT/train/<class>/* and ROOT/val/<class>/* (ImageNet layout)
        _check_imagefolder(root)
        size = input_size or IMAGEFOLDER_DEFAULT_SIZE
        tf = T.Compose([T.Resize(int(size * 256 / 224)), T.CenterCrop(size), T.ToTensor(),
                        T.Normalize((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))])
        full = datasets.ImageFolder(f"{root}/train", transform=tf)
        test = datasets.ImageFolder(f"{root}/val", transform=tf)
        if test.classes != full.classes:
            raise ValueError(f"imagefolder {root!r}: expected the same class folders in train/ and val/, "
                             f"got {len(full.classes)} and {len(test.classes)}")
        classes, shape = len(full.classes), (3, size, size)
    labels = np.asarray(getattr(full, "targets", [t for _, t in full.samples]))
    if options.is_subset:
        train_idx, val_idx = _subset_split(labels, np.arange(len(labels)), classes, options, val_fraction)
    else:
        train_idx, val_idx = _stratified_split(labels, (1 - val_fraction, val_fraction), SPLIT_SEED)
    # What the data is: another ImageFolder with the same class count is another dataset.
    files = [p for p, _ in full.samples] if hasattr(full, "samples") else len(full)
    test_files = [p for p, _ in test.samples] if hasattr(test, "samples") else len(test)
    fingerprint = _fingerprint(name, shape, files, test_files, train_idx, val_idx)
    # The official test split stays the test split; validation is carved from train.
    return DataSplits(Subset(full, train_idx.tolist()), Subset(full, val_idx.tolist()), test,
                      classes, shape, name, fingerprint)


def load_dataset(name: str, *, root: str | None = None, input_size: int | None = None,
                 val_fraction: float = DEFAULT_VAL_FRACTION, options: DatasetOptions | dict | None = None) -> DataSplits:
    """Load ``name`` (digits | mnist | cifar10 | imagefolder) as fixed train/val/test splits.

    ``digits`` ships with scikit-learn (no download); the torchvision datasets are
    downloaded to ``root`` on first use, once per node; ``imagefolder`` reads
    ``root/train`` and ``root/val``. ``root`` is resolved on the node that loads
    (``node.node_data_root``: None or the default = this node's ``~/.cache/haqtune/data``
    or ``$HAQTUNE_DATA_ROOT``).
    ``options`` (``DatasetOptions`` or its dict) takes a HAQ-style class/image subset.
    """
    if not isinstance(options, DatasetOptions):
        options = DatasetOptions.from_dict(options)
    if name == DIGITS:
        return load_digits_splits(options)
    if name not in DATASETS:
        raise UnknownDatasetError(f"unknown dataset {name!r}: choose between {', '.join(DATASETS)}")
    return _torchvision_splits(name, node_data_root(root), input_size, val_fraction, options)


def calibration_batches(dataset: Dataset, indices, batch_size: int, *, device: torch.device | None = None):
    """Yield input batches of ``dataset[indices]``, ``batch_size`` at a time: calibration
    streams these, so only one batch of images (and its activations) is in memory."""
    indices = [int(i) for i in indices]
    for start in range(0, len(indices), batch_size):
        xb = torch.stack([dataset[i][0] for i in indices[start:start + batch_size]])
        yield xb.to(device) if device is not None else xb


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
