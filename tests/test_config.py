import dataclasses

import pytest

from orchestrator.config import SearchConfig, TrainConfig
from orchestrator.errors import HaqtuneError
from search_spaces import Budget


def test_demo_yaml_equals_embedded_defaults():
    assert SearchConfig.from_yaml("configs/demo.yaml") == SearchConfig()


def test_frozen_and_overrides():
    cfg = SearchConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.num_trials = 3
    new = cfg.replace(num_trials=5, budget="size_mb=1.5", searcher=None)
    assert new.num_trials == 5 and new.budget == Budget("size_mb", 1.5) and new.searcher == cfg.searcher
    assert cfg.replace(budget="none").budget is None


def test_roundtrip_through_yaml(tmp_path):
    cfg = SearchConfig(searcher="tpe", num_trials=7, finetune=TrainConfig(epochs=1, lr=0.02))
    cfg.write_yaml(tmp_path / "c.yaml")
    assert SearchConfig.from_yaml(tmp_path / "c.yaml") == cfg


@pytest.mark.parametrize(("content", "message"), [
    ("searcher: [unclosed", "not valid YAML"),
    ("- a\n- b", "expected a mapping"),
    ("bogus_key: 1", "unknown setting"),
    ("num_trials: 0", "num_trials: expected an integer >= 1"),
    ("num_trials: ten", "num_trials: expected an integer"),
    ("min_bits: 0", "bits: expected 1 <= min_bits"),
    ("max_bits: 9", "bits: expected 1 <= min_bits"),
    ("searcher: nope", "unknown searcher 'nope'"),
    ("scheduler: hyperband", "scheduler: choose between"),
    ("budget: speed=2", "budget"),
    ("finetune: {epochs: -1}", "finetune.epochs"),
    ("finetune: {foo: 1}", "finetune: unknown setting"),
])
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(HaqtuneError, match=message):
        SearchConfig.from_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(HaqtuneError, match="not found"):
        SearchConfig.from_yaml(tmp_path / "missing.yaml")


def test_quantizer_options_are_validated():
    cfg = SearchConfig(weight_granularity="per_tensor", weight_quantizer="kmeans",
                       quantize="weights", budget=Budget.parse("size=0.5"))
    options = cfg.quant_options()
    assert (options.weight_granularity, options.weight_quantizer, options.quantize_activations) == (
        "per_tensor", "kmeans", False)
    assert SearchConfig().quant_options().quantize_activations
    with pytest.raises(HaqtuneError, match="weight_quantizer: choose between linear, kmeans, got 'lloyd'"):
        SearchConfig(weight_quantizer="lloyd")
    # Weight-only quantization leaves activations in float: only a size budget is meaningful.
    with pytest.raises(HaqtuneError, match="quantize: weights .* needs a size budget.*got latency=0.5"):
        SearchConfig(quantize="weights")
    assert SearchConfig(quantize="weights", budget=None).budget is None
