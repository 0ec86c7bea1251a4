import dataclasses
import re

import pytest

from orchestrator.config import SearchConfig, TrainConfig
from orchestrator.errors import HaqtuneError
from search_spaces import AllowedBits, Budget


def test_demo_yaml_equals_embedded_defaults():
    assert SearchConfig.from_yaml("configs/demo.yaml") == SearchConfig.demo()
    # The demo searches every layer; a config file that leaves it unset keeps haq's 8/8 ends.
    assert not SearchConfig.demo().fixes_first_last and SearchConfig().fixes_first_last


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
    ("compare_uniform: maybe", "compare_uniform: expected true or false, got 'maybe'"),
    ("scheduler: hyperband", "scheduler: choose between"),
    ("budget: speed=2", "budget"),
    ("finetune: {epochs: -1}", "finetune.epochs"),
    ("finetune: {foo: 1}", "finetune: unknown setting"),
    ("bits: {w: [2, 9]}", r"bits.w: expected bit widths in \[2, 8\], got 9"),
    ("bits: {a: []}", "bits.a: expected at least one bit width"),
    ("bits: {w: 4}", "bits.w: expected a list of bit widths"),
    ("bits: {weights: [4]}", "bits: expected a mapping with keys w and/or a"),
    ("bits: [4, 8]", "bits: expected a mapping with keys w and/or a"),
    ("bits: {}", "bits: expected a mapping with keys w and/or a"),
    ("min_bits: 4\nbits: {w: [2, 4]}", r"bits.w: expected bit widths in \[4, 8\], got 2"),
    ("fix_first_last: maybe", "fix_first_last: expected true or false"),
    ("final_finetune: {epochs: -1}", "final_finetune.epochs"),
    ("final_finetune: 30", "final_finetune: expected a mapping"),
    ("final_finetune: {epoch: 30}", "final_finetune: unknown setting"),
    ("final_finetune: {distill_weight: 1.5}", "final_finetune.distill_weight: expected a number between 0 and 1"),
    ("finetune: {distill_temperature: 0}", "finetune.distill_temperature: expected a number > 0"),
    ("reference: {distill_weight: 0.5}", "reference.distill_weight: the reference is the teacher"),
])
def test_bad_config_files(tmp_path, content, message):
    path = tmp_path / "bad.yaml"
    path.write_text(content)
    with pytest.raises(HaqtuneError, match=message):
        SearchConfig.from_yaml(path)


def test_missing_config_file(tmp_path):
    with pytest.raises(HaqtuneError, match="not found"):
        SearchConfig.from_yaml(tmp_path / "missing.yaml")


def test_bit_sets_and_fix_first_last(tmp_path):
    cfg = SearchConfig(bits={"w": [8, 4, 4], "a": [8]}, fix_first_last=True)
    assert cfg.bits == {"w": [4, 8], "a": [8]}  # sorted, duplicates dropped
    cfg.write_yaml(tmp_path / "c.yaml")
    assert SearchConfig.from_yaml(tmp_path / "c.yaml") == cfg
    allowed = cfg.allowed_bits(4)
    assert allowed.w == ((8,), (4, 8), (4, 8), (8,)) and allowed.a == ((8,),) * 4
    # Unset, fix_first_last follows the searcher: true for haq (HAQ's convention) only.
    assert SearchConfig(searcher="haq").fixes_first_last
    assert not SearchConfig(searcher="tpe").fixes_first_last
    assert SearchConfig(searcher="tpe").replace(searcher="haq").fixes_first_last  # resolved late
    assert not SearchConfig(searcher="haq", fix_first_last=False).fixes_first_last
    assert SearchConfig(searcher="tpe", fix_first_last=True).fixes_first_last
    assert SearchConfig(searcher="random").allowed_bits(3) == AllowedBits.full(3, 2, 8)  # min_bits 2
    # The default searcher is haq, so the default search fixes the first and last layers.
    assert SearchConfig().allowed_bits(3).w == ((8,), tuple(range(2, 9)), (8,))


def test_search_states_its_bits_and_the_hardwares_natural_set():
    from orchestrator.search import _echo_bits, prepare

    lines = []
    prepared = prepare(SearchConfig(searcher="haq", hardware="bitfusion", budget=None))
    _echo_bits(prepared, lines.append)
    assert lines[0] == ("haqtune: bits w 8 a 8 (layers 0, 11); w 2-8 a 2-8 (layers 1-10) "
                        "(first and last layers fixed: fix_first_last)")
    assert "natural bits 2, 4, 8" in lines[1] and "bits: {w: [2, 4, 8], a: [2, 4, 8]}" in lines[1]
    lines.clear()  # already on the natural set: no note
    _echo_bits(prepare(SearchConfig(searcher="tpe", hardware="bitfusion", budget=None,
                                    bits={"w": [2, 4, 8], "a": [8]})), lines.append)
    assert lines == ["haqtune: bits w 2,4,8 a 8"]


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
    with pytest.raises(HaqtuneError, match="quantize: weights .* needs a size budget.*got energy=0.5"):
        SearchConfig(quantize="weights")
    assert SearchConfig(quantize="weights", budget=None).budget is None


def test_max_concurrent_auto_fits_the_cluster():
    from orchestrator.config import fit_concurrency

    assert SearchConfig().max_concurrent == "auto"  # the default
    assert SearchConfig(max_concurrent="3").max_concurrent == 3  # a CLI flag's text
    for bad, message in (("many", "expected an integer >= 1 or 'auto', got 'many'"),
                         ("0", "expected an integer >= 1, got 0"), (0, "expected an integer >= 1, got 0")):
        with pytest.raises(HaqtuneError, match=re.escape(f"max_concurrent: {message}")):
            SearchConfig(max_concurrent=bad)
    # 8 GPUs and 64 CPUs, 1 GPU + 4 CPUs a trial: the GPUs bound it.
    cluster = {"CPU": 64.0, "GPU": 8.0}
    assert fit_concurrency(cluster, cpus_per_trial=4, gpus_per_trial=1, num_trials=100) == 8
    assert fit_concurrency(cluster, cpus_per_trial=16, gpus_per_trial=1, num_trials=100) == 4  # CPUs bound
    assert fit_concurrency(cluster, cpus_per_trial=1, gpus_per_trial=0, num_trials=20) == 20  # num_trials caps
    assert fit_concurrency({"CPU": 2.0}, cpus_per_trial=1, gpus_per_trial=0, num_trials=60) == 2
    # No GPU yet (an autoscaler adds GPU nodes for pending trials): one trial, not zero.
    assert fit_concurrency({"CPU": 4.0}, cpus_per_trial=1, gpus_per_trial=1, num_trials=60) == 1


def test_final_finetune_takes_unset_keys_from_the_search_finetune(tmp_path):
    cfg = SearchConfig.from_dict({"finetune": {"epochs": 1, "lr": 0.02, "batch_size": 32},
                                  "final_finetune": {"epochs": 30}})
    assert cfg.final_finetune == TrainConfig(epochs=30, lr=0.02, batch_size=32)
    # Default: HAQ's 30 epochs, distilled from the reference, the rest from ``finetune``.
    assert SearchConfig().final_finetune == TrainConfig(epochs=30, lr=0.01, batch_size=64, distill_weight=0.5,
                                                        distill_temperature=2.0)
    assert SearchConfig.from_dict({"finetune": {"lr": 0.03}}).final_finetune.lr == 0.03
    assert SearchConfig.from_yaml_text("final_finetune: null\n").final_finetune is None  # the trials' own
    cfg.write_yaml(tmp_path / "c.yaml")  # a resumed search reads the same settings back
    assert SearchConfig.from_yaml(tmp_path / "c.yaml") == cfg
    with pytest.raises(HaqtuneError, match="fp16 runs on GPUs only"):
        SearchConfig.from_dict({"final_finetune": {"epochs": 3, "amp": "fp16"}})


def test_final_epochs_flag(tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import main

    result = CliRunner().invoke(main, ["search", "--final-epochs", "12", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert ("final:     the best 3, uniform 8-bit and uniform 2/2 fine-tuned 12 epochs, lr 0.01, batch 64"
            in result.output)
    assert "distilled from the reference (weight 0.5, T 2)" in result.output  # the default's settings kept
    result = CliRunner().invoke(main, ["search", "--final-epochs", "none", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert ("final:     the best 3 trials' own checkpoints tested; uniform 8-bit and uniform 2/2 fine-tuned "
            "like a trial and tested") in result.output
    for bad in ("-1", "ten"):
        result = CliRunner().invoke(main, ["search", "--final-epochs", bad, "--dry-run"])
        assert result.exit_code == 2 and "--final-epochs: expected an integer >= 0 or none" in result.output
