"""Small ImageFolder datasets written by tests (generated images, nothing downloaded)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_imagefolder(root: Path, *, classes: int = 3, train_per_class: int = 10, val_per_class: int = 3,
                      size: int = 32, seed: int = 0) -> Path:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png`` (ImageNet layout).

    Each class has its own mean colour plus noise, so a model can tell them apart.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in range(classes):
        colour = rng.uniform(40, 215, size=3)
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            folder = Path(root) / split / f"class_{c:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.clip(colour + rng.normal(0, 30, size=(size, size, 3)), 0, 255).astype(np.uint8)
                Image.fromarray(pixels).save(folder / f"img_{i:03d}.png")
    return Path(root)
