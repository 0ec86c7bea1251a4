"""End-to-end: a torchvision network on an ImageFolder the test writes, from a pretrained
checkpoint, on a class/image subset, through the real CLI (Ray, MLflow, training)."""

import json
import re

import pytest
import torch
import yaml
from imagefolders import write_imagefolder

from e2e import run_cli, runs_of

pytestmark = pytest.mark.slow

SUBSET = {"classes": 2, "train_per_class": 6, "val_per_class": 3}


def _config(tmp_path):
    from trainables.models import build_model

    root = write_imagefolder(tmp_path / "imgs", classes=3, train_per_class=10, val_per_class=3, size=32)
    ckpt = tmp_path / "mobilenet_v2.pt"
    torch.save(build_model("mobilenet_v2", seed=5, num_classes=3).model.state_dict(), ckpt)
    config = {
        "searcher": "random", "num_trials": 3, "max_concurrent": 1, "seed": 0,
        "model": "mobilenet_v2", "dataset": "imagefolder", "data_root": str(root), "input_size": 32,
        "dataset_options": SUBSET, "hardware": "bismo-edge", "budget": "latency=0.8", "min_bits": 2,
        # epochs would retrain the reference if the checkpoint were not used as it is
        "reference": {"weights": str(ckpt), "epochs": 3, "lr": 0.05},
        "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 4, "max_steps_per_epoch": 2},
        "test_top_k": 1, "final_finetune": None, "compare_uniform": False,
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(config))
    return root, ckpt


def test_imagefolder_mobilenet_pretrained_subset(tmp_path):
    root, ckpt = _config(tmp_path)

    # The plan: the input size trials use, and the same 8-bit latency as `haqtune cost`.
    plan = run_cli(["search", "search.yaml", "--dry-run"], tmp_path, timeout=300)
    assert plan.returncode == 0, plan.stderr[-3000:]
    assert "trials run 3x32x32 inputs, priced at the same shape" in plan.stdout
    assert "subset classes=2, train_per_class=6, val_per_class=3" in plan.stdout
    assert not (tmp_path / "haqtune_runs").exists() and not (tmp_path / "mlflow.db").exists()
    latency8 = float(re.search(r"uniform 8-bit latency_ms=([0-9.e+-]+)", plan.stdout).group(1))
    command = re.search(r"same cost: haqtune (.*)", plan.stdout).group(1).split()
    from click.testing import CliRunner

    from orchestrator.cli import main

    cost = CliRunner().invoke(main, [*command[:-2], "--bits", "8", "--json"])  # in-process: no second torch import
    assert cost.exit_code == 0, cost.output
    assert json.loads(cost.output)["latency_ms"] == pytest.approx(latency8, rel=1e-5)

    proc = run_cli(["search", "search.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[3/3]" in proc.stdout and "trials run 3x32x32 inputs" in proc.stdout
    header_line = next(line for line in proc.stdout.splitlines() if line.startswith("haqtune: search "))
    header = re.search(r"uniform 8-bit latency_ms=([0-9.e+-]+)", header_line)
    assert header and float(header.group(1)) == latency8  # the search header prices what cost prices
    assert f"(pretrained: {ckpt}, not retrained)" in proc.stdout
    search_dir = next(p for p in (tmp_path / "haqtune_runs").iterdir() if not p.name.startswith("_"))
    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["uniform_8bit"]["latency_ms"] == pytest.approx(latency8, rel=1e-5)

    # The reference is the checkpoint evaluated on the subset's validation split, as it is.
    from orchestrator.config import SearchConfig
    from orchestrator.search import prepare
    from trainables import QuantLayer, TrialContext, finetune_policy
    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.training import evaluate

    data = load_dataset("imagefolder", root=str(root), input_size=32, options=SUBSET)
    assert (len(data.train), len(data.val)) == (12, 6)
    reference = build_model("mobilenet_v2", num_classes=3).model
    reference.load_state_dict(torch.load(ckpt, weights_only=True))
    assert summary["ref_acc"] == evaluate(reference, data.val, device=torch.device("cpu"))

    parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(children) == 3 and all(c.info.status == "FINISHED" for c in children)
    params = parents[0].data.params
    assert params["input_shape"] == params["priced_shape"] == "3x32x32"
    assert params["reference_weights"] == str(ckpt)

    # Priced = trained: the cost table's layer shapes are those a trial's quantized layers
    # see (forward hooks on every QuantLayer call during a trial's quantize + fine-tune).
    config = SearchConfig.from_yaml(search_dir / "config.yaml")
    prepared = prepare(config)
    context = TrialContext(
        model=config.model, dataset=config.dataset, model_kwargs=prepared.model_kwargs,
        input_size=config.input_size, layer_names=tuple(s.name for s in prepared.layers),
        reference_state=reference.state_dict(), ref_acc=summary["ref_acc"], table=prepared.table,
        budget=None, finetune=config.finetune, seed=config.seed, min_bits=config.min_bits,
        data_root=config.data_root, dataset_options=config.dataset_options)
    seen = {}

    def hook(module, args, out):
        if isinstance(module, QuantLayer):
            seen.setdefault(id(module), set()).add((tuple(args[0].shape[1:]), tuple(out.shape[1:])))

    handle = torch.nn.modules.module.register_module_forward_hook(hook)
    try:
        qmodel, *_ = finetune_policy(context, prepared.table.uniform(4))
    finally:
        handle.remove()
    names = {id(m): n for n, m in qmodel.named_modules()}
    assert [names[i] for i in seen] == [s.name for s in prepared.layers]  # execution order
    for spec, shapes in zip(prepared.layers, seen.values(), strict=True):
        assert len(shapes) == 1, (spec.name, shapes)  # one shape for every batch
        (inp, out), = shapes
        if spec.kind == "linear":
            assert (inp[-1], out[-1]) == (spec.in_channels, spec.out_channels)
        else:
            assert (inp[0], tuple(inp[1:]), out[0], tuple(out[1:])) == (
                spec.in_channels, spec.in_hw, spec.out_channels, spec.out_hw), spec.name
