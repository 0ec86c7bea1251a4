"""End-to-end: a small real search, then `haqtune export` through the console script."""

import json

import numpy as np
import pytest
import torch

from e2e import run_cli, runs_of

pytestmark = pytest.mark.slow

CONFIG = """\
searcher: random
num_trials: 2
max_concurrent: 2
reference: {epochs: 3, lr: 0.05, batch_size: 64}
finetune: {epochs: 1, lr: 0.01, batch_size: 64}
final_finetune: {epochs: 3}
hardware: bismo-edge
budget: latency=0.6
compare_uniform: false
"""


def uniform8(search_dir, *, epochs: int) -> tuple[float, float]:
    """(val_acc, test_acc) of uniform 8-bit fine-tuned ``epochs`` in-process from the
    search's cached reference model (the search's own seed and settings otherwise)."""
    import dataclasses

    from orchestrator.config import SearchConfig
    from orchestrator.search import local_context, prepare
    from search_spaces import metrics as M
    from trainables import evaluate_on_test

    config = SearchConfig.from_yaml(search_dir / "config.yaml")
    prepared = prepare(config)
    cache = search_dir.parent / "_cache"
    cached = sorted(p.name for p in cache.iterdir())
    context = local_context(config, prepared, search_dir.parent,
                            finetune=dataclasses.replace(config.finetune, epochs=epochs))
    # The search's own reference, read from its cache: not a second one trained here.
    assert sorted(p.name for p in cache.iterdir()) == cached
    result = evaluate_on_test(context, prepared.table.uniform(8), project=False)
    return result[M.VAL_ACC], result[M.TEST_ACC]


def test_search_then_export_both_formats(tmp_path):
    import mlflow
    from mlflow import search_logged_models
    from mlflow.tracking import MlflowClient

    from trainables import load_quantized
    from trainables.data import load_dataset
    from trainables.export import ONNX_INPUT, ONNX_OUTPUT, onnx_session
    from trainables.training import evaluate

    (tmp_path / "cfg.yaml").write_text(CONFIG)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    proc = run_cli(["search", "cfg.yaml", "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    search_dir = next(p for p in (tmp_path / "haqtune_runs").iterdir() if not p.name.startswith("_"))
    summary = json.loads((search_dir / "summary.json").read_text())
    best = summary["best"][0]
    (parent,), _ = runs_of(uri)

    # HAQ's final fine-tune: each ranked policy trained 3 more epochs into its own
    # checkpoint (not the trial's), ranked by its val_acc after it; the search's is kept.
    from trainables.trial import load_quantized_checkpoint

    vals = [row["val_acc"] for row in summary["best"]]
    assert vals == sorted(vals, reverse=True)
    for row in summary["best"]:
        final = search_dir / f"trial_{row['trial_id']}" / "checkpoint_final"
        assert row["checkpoint"] == str(final)
        _, saved = load_quantized_checkpoint(final)
        assert saved["metrics"]["val_acc"] == row["val_acc"] and saved["metrics"]["policy"] == row["policy"]
        trial_ckpt = sorted((search_dir / f"trial_{row['trial_id']}").glob("checkpoint_0*"))[-1]
        _, trial = load_quantized_checkpoint(trial_ckpt)
        assert trial["metrics"]["val_acc"] == row["search_val_acc"]
        assert any(not torch.equal(trial["state_dict"][k], saved["state_dict"][k]) for k in saved["state_dict"]
                   if saved["state_dict"][k].is_floating_point())
    metrics = MlflowClient(uri).get_run(parent.info.run_id).data.metrics
    # The final fine-tune's settings are on the parent run, beside the search's (the UI's columns).
    assert parent.data.params["final_finetune"].startswith("epochs=3, lr=")
    assert "distill_weight=0.0" in parent.data.params["final_finetune"]
    assert metrics["final_val_acc"] == pytest.approx(best["val_acc"], abs=1e-4)
    assert metrics["best_test_acc"] == pytest.approx(best["test_acc"], abs=1e-4)
    assert metrics["best_val_acc"] == pytest.approx(max(r["search_val_acc"] for r in summary["best"]), abs=1e-4)
    # Uniform 8-bit, the loss's reference point, got the same final fine-tune.
    eight = summary["uniform_8bit"]
    assert (eight["val_acc"], eight["test_acc"]) == uniform8(search_dir, epochs=3)

    proc = run_cli(["export", search_dir, "--format", "both"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = search_dir / "export" / best["trial_id"]
    assert {p.name for p in out.iterdir()} == {"model.pt", "model.onnx", "policy.json", "policy.md"}
    assert ", exact)" in proc.stdout and "top-1 agreement" in proc.stdout

    # The torch file reproduces the summary's test accuracy exactly; ONNX Runtime agrees.
    data = load_dataset("digits")
    model = load_quantized(out / "model.pt")
    assert evaluate(model, data.test, device=torch.device("cpu")) == best["test_acc"]
    x = torch.stack([data.test[i][0] for i in range(len(data.test))])
    with torch.no_grad():
        torch_pred = model(x).argmax(1).numpy()
    onnx_pred = onnx_session(out / "model.onnx").run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0].argmax(1)
    assert np.mean(torch_pred == onnx_pred) >= 0.995
    report = json.loads((out / "policy.json").read_text())
    assert report["policy"] == best["policy"] and report["trial_id"] == best["trial_id"]

    # Both flavors on the parent run, with signatures; the run keeps its status and end time.
    mlflow.set_tracking_uri(uri)
    models = search_logged_models(experiment_ids=[parent.info.experiment_id], output_format="list",
                                  filter_string=f"source_run_id = '{parent.info.run_id}'")
    assert sorted(m.name for m in models) == [f"{best['trial_id']}-onnx", f"{best['trial_id']}-pytorch"]
    for m in models:
        info = mlflow.models.get_model_info(m.model_uri)
        assert tuple(info.signature.inputs.inputs[0].shape) == (-1, 1, 8, 8)
        flavor = "pytorch" if m.name.endswith("pytorch") else "onnx"
        assert flavor in info.flavors
    after = MlflowClient(uri).get_run(parent.info.run_id).info
    assert (after.status, after.end_time) == (parent.info.status, parent.info.end_time)

    # A rank that does not exist: one line, exit 2, nothing new written.
    before = sorted(search_dir.rglob("*"))
    proc = run_cli(["export", search_dir, "--rank", len(summary["best"]) + 1], tmp_path)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0
    assert "does not exist" in proc.stderr and sorted(search_dir.rglob("*")) == before
