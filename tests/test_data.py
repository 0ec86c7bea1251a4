import numpy as np
import torch

from trainables.data import batches, load_digits_splits
from trainables.models import build_model
from trainables.training import TrainSettings, train_reference


def test_digits_splits_fixed_disjoint_stratified():
    a, b = load_digits_splits(), load_digits_splits()
    assert (len(a.train), len(a.val), len(a.test)) == (1078, 360, 359)
    for split in ("train", "val", "test"):
        assert torch.equal(getattr(a, split).tensors[0], getattr(b, split).tensors[0])
    rows = [tuple(x.flatten().tolist()) for s in (a.train, a.val, a.test) for x in s.tensors[0]]
    # Digits has a few duplicate images; allow those, but the splits are index-disjoint.
    assert len(set(rows)) > 0.99 * len(rows)
    counts = np.bincount(a.val.tensors[1].numpy(), minlength=10)
    assert counts.min() >= 34 and counts.max() <= 38  # stratified: ~36 per class
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10


def test_batches_cover_dataset_once():
    d = load_digits_splits()
    seen = sum(len(y) for _, y in batches(d.val, 64, shuffle=True, generator=torch.Generator().manual_seed(0)))
    assert seen == len(d.val)


def test_reference_model_trained_once_and_cached(tmp_path):
    data = load_digits_splits()
    settings = TrainSettings(epochs=1, lr=0.05)
    calls = []

    def build():
        calls.append(1)
        return build_model("demo", seed=0).model

    kwargs = dict(seed=0, cache_dir=tmp_path, key={"model": "demo"}, device=torch.device("cpu"))
    state1, acc1, path1 = train_reference(build, data, settings, **kwargs)
    state2, acc2, path2 = train_reference(build, data, settings, **kwargs)
    assert len(calls) == 1 and path1 == path2 and path1.exists()
    assert acc1 == acc2 and all(torch.equal(state1[k], state2[k]) for k in state1)
    # A different setting is a different cache entry.
    _, _, path3 = train_reference(build, data, TrainSettings(epochs=1, lr=0.02), **kwargs)
    assert path3 != path1 and len(calls) == 2
