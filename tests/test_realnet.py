"""Real networks and data: priced = trained, pretrained references, subsets, bounded calibration."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from imagefolders import write_imagefolder
from torch import nn

from hardware import extract_layers
from orchestrator.config import SearchConfig
from orchestrator.errors import HaqtuneError
from orchestrator.plan import cost_command, format_plan
from orchestrator.search import prepare
from search_spaces import bitwidth_space
from trainables.data import (
    DatasetOptions,
    SubsetError,
    check_subset,
    dataset_facts,
    load_dataset,
)
from trainables.models import WeightsError, apply_weights, build_model, load_weights
from trainables.quantize import (
    MAX_CALIBRATION_VALUES,
    ActivationStats,
    best_activation_alpha,
    quantize_model,
)
from trainables.training import (
    ReferenceSettings,
    evaluate,
    reference_cache_key,
    reference_model,
)

# The HAQ paper's experiments (ImageNet subsets on three accelerators) and CIFAR-10 ones.
CONFIGS = sorted([*Path(__file__).parent.parent.glob("configs/*-imagenet-*.yaml"),
                  *Path(__file__).parent.parent.glob("configs/*-cifar10-*.yaml")])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("imgs"), classes=3, train_per_class=10, val_per_class=3,
                             size=16)


# ---- Python API: extract_layers(model, x), bitwidth_space(layers) -----------------------------

def test_extract_layers_takes_an_example_tensor_or_a_shape():
    model = build_model("mobilenet_v2", input_size=64).model
    by_shape = extract_layers(model, (3, 64, 64))
    by_tensor = extract_layers(model, torch.randn(2, 3, 64, 64))
    assert by_shape == by_tensor and by_shape[0].in_hw == (64, 64)
    with pytest.raises(ValueError, match=r"forward pass on an input of shape \[1, 1, 64, 64\] failed"):
        extract_layers(model, (1, 64, 64))
    with pytest.raises(TypeError, match="expected a \\(C, H, W\\) shape or an example input tensor"):
        extract_layers(model, 3.0)


def test_bitwidth_space_takes_the_layer_list_or_a_count():
    layers = extract_layers(build_model("demo").model, (1, 8, 8))
    assert bitwidth_space(layers).keys() == bitwidth_space(len(layers)).keys()
    assert len(bitwidth_space(layers)) == 2 * len(layers)
    with pytest.raises(TypeError, match="expected a layer list"):
        bitwidth_space(1.5)


# ---- subsets ---------------------------------------------------------------------------------

def test_digits_subset_deterministic_labels_kept_test_untouched():
    full = load_dataset("digits")
    options = {"classes": 4, "train_per_class": 20, "val_per_class": 5}
    a, b = load_dataset("digits", options=options), load_dataset("digits", options=options)
    assert torch.equal(a.train.tensors[0], b.train.tensors[0]) and a.fingerprint == b.fingerprint
    labels = a.train.tensors[1].numpy()
    assert len(a.train) == 80 and len(a.val) == 20
    assert sorted(set(labels)) == sorted(set(a.val.tensors[1].numpy())) and len(set(labels)) == 4
    assert np.bincount(labels).max() == 20
    assert a.num_classes == 10  # full-dataset label indices: the classifier stays the deployed one
    assert torch.equal(a.test.tensors[1], full.test.tensors[1]) and a.fingerprint != full.fingerprint
    with pytest.raises(SubsetError, match="expected at most"):
        load_dataset("digits", options={"train_per_class": 200})


def test_subset_checked_from_facts_without_reading_images():
    facts = dataset_facts("cifar10")
    assert facts.input_shape == (3, 32, 32) and facts.num_classes == 10
    check_subset(facts, DatasetOptions(classes=10, train_per_class=4000, val_per_class=1000))
    with pytest.raises(SubsetError, match="at most 5000 train \\+ val images per class"):
        check_subset(facts, DatasetOptions(train_per_class=4500, val_per_class=1000))
    with pytest.raises(SubsetError, match="at most the 10 classes"):
        check_subset(facts, DatasetOptions(classes=11))
    with pytest.raises(ValueError, match="unknown option"):
        DatasetOptions.from_dict({"clases": 2})


def test_imagefolder_subset_facts_and_fingerprint(folder, tmp_path):
    facts = dataset_facts("imagefolder", root=str(folder), input_size=16)
    assert (facts.num_classes, facts.input_shape, facts.min_pool_per_class) == (3, (3, 16, 16), 10)
    data = load_dataset("imagefolder", root=str(folder), input_size=16,
                        options={"classes": 2, "train_per_class": 6, "val_per_class": 3})
    assert (len(data.train), len(data.val), len(data.test)) == (12, 6, 9)  # test untouched
    assert data.train[0][0].shape == (3, 16, 16)
    # Another folder with the same class count is another dataset (another reference).
    other = write_imagefolder(tmp_path / "other", classes=3, train_per_class=11, val_per_class=3, size=16)
    assert load_dataset("imagefolder", root=str(other), input_size=16).fingerprint != \
        load_dataset("imagefolder", root=str(folder), input_size=16).fingerprint


# ---- bounded calibration ----------------------------------------------------------------------

def test_activation_stats_bounded_and_uniform():
    stats = ActivationStats(capacity=1000)
    values = torch.arange(100_000, dtype=torch.float32) - 10.0
    for chunk in values.split(3_000):
        stats.update(chunk)
        assert stats.kept_count <= 1000
    sample = stats.sample()
    assert 500 <= sample.numel() <= 1000
    assert stats.min == -10.0 and stats.max_abs == float(values.max())
    # A uniform stride over the whole stream: its quantiles are the stream's.
    assert abs(float(sample.median()) - float(values.median())) < 0.02 * float(values.max())


def test_streamed_calibration_matches_one_batch_and_stays_bounded():
    built = build_model("demo", seed=0)
    model = built.model.eval()
    x = torch.randn(256, *built.input_shape, generator=torch.Generator().manual_seed(3))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    policy = [(4, 4)] * len(names)
    one = quantize_model(model, names, policy, x)            # a tensor: split into batches
    streamed = quantize_model(model, names, policy, iter(x.split(7)))  # any iterable of batches
    for name in names:
        a, b = one.get_submodule(name).alpha, streamed.get_submodule(name).alpha
        assert float(a) == pytest.approx(float(b), rel=0.1)
    # Against the old keep-everything calibration of the first layer: the same clip.
    first_input = x.reshape(-1)
    signed = bool(first_input.min() < 0)
    old = best_activation_alpha(first_input, 4, signed)
    assert float(one.get_submodule(names[0]).alpha) == pytest.approx(float(old), rel=0.1)
    assert all(m._stats is None for m in streamed.modules() if hasattr(m, "_stats"))


def test_calibration_memory_does_not_grow_with_samples():
    stats = ActivationStats()
    for _ in range(20):
        stats.update(torch.randn(32, 16, 56, 56))  # 1.6M values per batch
    assert stats.kept_count <= MAX_CALIBRATION_VALUES


# ---- pretrained references and the cache key --------------------------------------------------

def _checkpoint(path, model_name, **kwargs):
    torch.save(build_model(model_name, seed=1, **kwargs).model.state_dict(), path)
    return str(path)


def test_pretrained_checkpoint_is_evaluated_not_trained(tmp_path):
    data = load_dataset("digits")
    ckpt = _checkpoint(tmp_path / "demo.pt", "demo")
    key = {"model": "demo"}
    settings = ReferenceSettings(epochs=50, lr=0.05, weights=ckpt)
    state, acc, path = reference_model(lambda: build_model("demo", seed=0).model, data, settings, seed=0,
                                       cache_dir=tmp_path / "cache", key=key, device=torch.device("cpu"),
                                       model_name="demo")
    expected = build_model("demo", seed=0).model
    expected.load_state_dict(torch.load(ckpt, weights_only=True))
    assert acc == evaluate(expected, data.val, device=torch.device("cpu"))  # as is: not trained
    assert all(torch.equal(state[k], expected.state_dict()[k]) for k in state)
    cached = torch.load(path, weights_only=True)  # loadable without unpickling code
    assert cached["val_acc"] == acc and not list(path.parent.glob(".*.tmp"))
    # An edited checkpoint is another reference.
    torch.save({k: v + 1 for k, v in torch.load(ckpt, weights_only=True).items()}, ckpt)
    _, _, path2 = reference_model(lambda: build_model("demo", seed=0).model, data, settings, seed=0,
                                  cache_dir=tmp_path / "cache", key=key, device=torch.device("cpu"),
                                  model_name="demo")
    assert path2 != path


def test_reference_cache_key_covers_model_source_data_and_options(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    (tmp_path / "my_net.py").write_text("from torch import nn\n\ndef net(num_classes=10):\n"
                                        "    return nn.Sequential(nn.Flatten(), nn.Linear(64, num_classes))\n")
    data = load_dataset("digits")
    kwargs = {"num_classes": 10, "input_size": 8, "in_channels": 1}

    def key(**over):
        base = dict(model="my_net:net", dataset="digits", data=data, dataset_options={}, data_root="./data",
                    model_kwargs=kwargs)
        return reference_cache_key(**{**base, **over})

    first = key()
    assert first == key()
    (tmp_path / "my_net.py").write_text((tmp_path / "my_net.py").read_text() + "# edited\n")
    assert key() != first  # an edited user model is another model
    assert key(data_root="/elsewhere") != first
    assert key(dataset_options={"classes": 3}) != first
    assert key(data=load_dataset("digits", options={"classes": 3})) != key()


def test_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(WeightsError, match="checkpoint 'missing.pt' not found"):
        load_weights("mobilenet_v2", "missing.pt")
    other = load_weights("mobilenet_v2", _checkpoint(tmp_path / "r18.pt", "resnet18"))
    with pytest.raises(WeightsError, match="does not fit model 'mobilenet_v2'.*missing key"):
        apply_weights(build_model("mobilenet_v2").model, other, "mobilenet_v2")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not load checkpoint"):
        load_weights("mobilenet_v2", str(tmp_path / "junk.pt"))
    with pytest.raises(WeightsError, match="unknown weights 'IMAGENET9K'.*IMAGENET1K_V1"):
        load_weights("mobilenet_v2", "IMAGENET9K")
    # Offline, empty torch cache: a clear error at once, never a download.
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    with pytest.raises(WeightsError, match="not in the local torch cache"):
        load_weights("mobilenet_v2", "IMAGENET1K_V1")
    # In the cache (torch.hub's layout): loaded with weights_only=True.
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    _checkpoint(cache / "mobilenet_v2-b0353104.pth", "mobilenet_v2", num_classes=1000)
    weights = load_weights("mobilenet_v2", "MobileNet_V2_Weights.IMAGENET1K_V1")
    assert weights.identity == "MobileNet_V2_Weights.IMAGENET1K_V1"
    apply_weights(build_model("mobilenet_v2", num_classes=1000).model, weights, "mobilenet_v2")


# ---- priced = trained: prepare --------------------------------------------------------------

def test_prepare_prices_the_shape_trials_run_or_cost_input_size(folder):
    config = SearchConfig(model="mobilenet_v2", dataset="imagefolder", data_root=str(folder), input_size=16,
                          budget=None)
    prepared = prepare(config)
    assert prepared.input_shape == prepared.priced_shape == (3, 16, 16)
    assert prepared.layers[0].in_hw == (16, 16) and prepared.layers[-1].out_channels == 3
    deploy = prepare(config.replace(cost_input_size=224))
    assert deploy.input_shape == (3, 16, 16) and deploy.priced_shape == (3, 224, 224)
    assert deploy.layers[0].in_hw == (224, 224)
    assert float(deploy.table.uniform(8).size) and \
        deploy.table.evaluate(deploy.table.uniform(8)[None]).latency_ms[0] > \
        prepared.table.evaluate(prepared.table.uniform(8)[None]).latency_ms[0]
    plan = format_plan(deploy)
    assert "trials run 3x16x16 inputs, priced at 3x224x224 (cost_input_size)" in plan
    assert "--input-size 224 --num-classes 3" in cost_command(deploy)


@pytest.mark.parametrize(("overrides", "message"), [
    ({"model": "mobilenet_v2", "dataset": "mnist"}, "takes 3-channel images"),
    ({"model": "user_models:tiny_cnn"}, "takes 3-channel images, but dataset 'digits' has 1-channel"),
    ({"dataset_options": {"classes": 11}}, "at most the 10 classes"),
    ({"dataset_options": {"train_per_class": 150}}, "expected at most 139 train \\+ val images"),
    ({"model": "mobilenet_v2", "dataset": "cifar10", "input_size": 224}, "set cost_input_size"),
    ({"model": "mobilenet_v2", "dataset": "cifar10",
      "reference": ReferenceSettings(epochs=1, lr=0.1, weights="gone.pt")}, "checkpoint 'gone.pt' not found"),
])
def test_prepare_rejects_mismatches(overrides, message):
    with pytest.raises(HaqtuneError, match=message):
        prepare(dataclasses.replace(SearchConfig(), **overrides))


def test_config_settings_roundtrip_and_validation(tmp_path):
    cfg = SearchConfig.from_dict({"dataset_options": {"classes": 3}, "cost_input_size": 224,
                                  "reference": {"weights": "w.pt"}})
    assert cfg.reference.weights == "w.pt" and cfg.reference.epochs == SearchConfig().reference.epochs
    cfg.write_yaml(tmp_path / "c.yaml")
    assert SearchConfig.from_yaml(tmp_path / "c.yaml") == cfg
    from orchestrator.config import TrainConfig

    # A plain TrainSettings (Python API) is a reference without weights.
    assert SearchConfig(reference=TrainConfig(epochs=1, lr=0.1)).reference.weights is None
    for bad, message in (({"dataset_options": {"classes": 0}}, "dataset_options.classes"),
                         ({"dataset_options": {"foo": 1}}, "unknown option"),
                         ({"cost_input_size": 0}, "cost_input_size"),
                         ({"finetune": {"weights": "w.pt"}}, "finetune: unknown setting")):
        with pytest.raises(HaqtuneError, match=message):
            SearchConfig.from_dict(bad)


# ---- the HAQ experiment configs ---------------------------------------------------------------

IMAGENET_CLASSES, IMAGENET_PER_CLASS = 1000, 1300


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_configs_load_and_validate(path, tmp_path, monkeypatch):
    config = SearchConfig.from_yaml(path)
    if config.dataset == "imagefolder":
        # ImageNet's layout without its 1.3M files: the listing validation reads, and the
        # pretrained weights in a local torch cache (random weights of the right shapes).
        labels = np.repeat(np.arange(IMAGENET_CLASSES), IMAGENET_PER_CLASS).tolist()
        monkeypatch.setattr("trainables.data._imagefolder_files",
                            lambda root: ([f"n{i:08d}" for i in range(IMAGENET_CLASSES)], labels))
        monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
        import torchvision.models as tvm

        url = tvm.get_weight(config.reference.weights).url
        (tmp_path / "checkpoints").mkdir()
        _checkpoint(tmp_path / "checkpoints" / Path(url).name, config.model, num_classes=IMAGENET_CLASSES)
        assert config.input_size == 224 and config.dataset_options["classes"] == 100
    prepared = prepare(config)
    plan = format_plan(prepared)
    size = 224 if config.dataset == "imagefolder" else 32
    assert prepared.input_shape == (3, size, size) and f"trials run 3x{size}x{size}" in plan
    assert config.min_bits == 2 and config.searcher == "haq"
    assert yaml.safe_load(path.read_text())["hardware"] == prepared.table.hardware
