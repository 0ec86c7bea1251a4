"""End-to-end: the real CLI, a local Ray instance, real training, a real sqlite MLflow store."""

import json

import pytest

from e2e import run_cli, runs_of

pytestmark = pytest.mark.slow


def _search_dir(cwd):
    dirs = [p for p in (cwd / "haqtune_runs").iterdir() if not p.name.startswith("_")]
    assert len(dirs) == 1
    return dirs[0]


def test_demo_search_defaults(tmp_path):
    n = 4
    # The default final fine-tune (30 distilled epochs) shortened: what is checked is that it
    # and the uniform comparisons run, not the accuracy they reach.
    proc = run_cli(["search", "--num-trials", n, "--final-epochs", 1], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[{n}/{n}]" in proc.stdout and "policy w/a per layer" in proc.stdout
    assert "workflowType=machine_learning" in proc.stdout
    search_dir = _search_dir(tmp_path)
    for name in ("config.yaml", "mlflow_runs.json", "summary.json"):
        assert (search_dir / name).exists(), name
    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["ref_acc"] >= 0.95  # the demo net in full precision
    assert summary["best"] and 0 <= summary["best"][0]["test_acc"] <= 1
    # The uniform 8-bit policy is fine-tuned and tested too: the loss vs 8-bit is readable.
    assert 0.9 <= summary["uniform_8bit"]["test_acc"] <= 1
    # And so is the widest uniform policy inside the budget (the demo searches every layer,
    # first and last too): the baseline the mixed policy must beat, with its verdict.
    uniform = summary["uniform_in_budget"]
    assert (uniform["w_bits"], uniform["a_bits"]) == (2, 2)
    assert uniform["policy"] == " ".join(["2/2"] * 12)
    limit = 0.5 * summary["uniform_8bit"]["energy_mj"]
    assert uniform["energy_mj"] <= limit and 0 <= uniform["test_acc"] <= 1
    gain = (summary["best"][0]["test_acc"] - uniform["test_acc"]) * 100
    assert (f"haqtune: uniform 2/2, the widest uniform policy inside the budget (energy "
            f"{summary['uniform_8bit']['energy_mj'] / uniform['energy_mj']:.2f}x lower than 8-bit)") in proc.stdout
    assert f"best policy's test_acc vs it: {gain:+.2f} points" in proc.stdout

    parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == n
    parent = parents[0]
    assert parent.data.tags["haqtune.searcher"] == "haq"  # the default searcher
    assert parent.data.params["hardware"] == "bitfusion" and parent.data.params["budget"] == "energy=0.5"
    assert parent.data.params["fix_first_last"] == "False" and parent.data.params["bits"] == "w 2-8 a 2-8"
    assert "distill_weight=0.5" in parent.data.params["final_finetune"]
    assert parent.data.metrics["uniform_in_budget_test_acc"] == float(f"{uniform['test_acc']:.4g}")  # 4 digits
    assert parent.data.metrics["uniform_in_budget_w_bits"] == 2
    num_layers = int(parent.data.params["num_layers"])
    keys = {f"{p}_{i}" for i in range(num_layers) for p in "wa"}
    for child in children:
        assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
        assert keys <= set(child.data.params)
        assert 0 <= child.data.metrics["val_acc"] <= 1
        assert child.data.metrics["energy_mj"] <= limit  # default budget energy=0.5
        assert child.info.status == "FINISHED"


def test_tpe_size_budget_with_asha(tmp_path):
    (tmp_path / "small.yaml").write_text("reference: {epochs: 3}\ntest_top_k: 1\nfinal_finetune: null\n")
    proc = run_cli(["search", "small.yaml", "--searcher", "tpe", "--budget", "size=0.5", "--num-trials", 8,
                    "--scheduler", "asha", "--tracking-uri", f"sqlite:///{tmp_path / 'store.db'}"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((_search_dir(tmp_path) / "summary.json").read_text())
    size8 = summary["uniform_8bit"]["size_mb"]
    _, children = runs_of(f"sqlite:///{tmp_path / 'store.db'}")
    assert len(children) == 8
    assert all(c.data.metrics["size_mb"] <= 0.5 * size8 for c in children)
    # Without a final fine-tune the uniform baseline gets the trials' fine-tune; 4 bits is
    # exactly half the 8-bit size, so 4/4 is the widest uniform policy inside size=0.5.
    uniform = summary["uniform_in_budget"]
    assert (uniform["w_bits"], uniform["a_bits"]) == (4, 4) and uniform["size_mb"] == 0.5 * size8
    # ASHA may stop trials after their first epoch: they end KILLED, with the val_acc reached.
    assert {c.info.status for c in children} <= {"FINISHED", "KILLED"}
    assert not (tmp_path / "mlflow.db").exists()  # --tracking-uri was honoured


def test_failed_trials_do_not_kill_the_search(tmp_path):
    # Trials 1 and 2 raise; trial 3 succeeds, but the final fine-tune's learning rate
    # overflows float32 on the first step (inf loss): its policy and uniform 8-bit fail there.
    (tmp_path / "diverge.yaml").write_text(
        "num_trials: 3\nmax_failures: 0\nmax_concurrent: 1\nsearcher: random\n"
        "reference: {epochs: 3}\nfinetune: {epochs: 1}\nfinal_finetune: {epochs: 1, lr: 1.0e+38}\n")
    faults = {"HAQTUNE_TEST_FAULTS": "raise@1,raise@2", "HAQTUNE_TEST_FAULTS_DIR": str(tmp_path / "faults")}
    proc = run_cli(["search", "diverge.yaml"], tmp_path, env=faults)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("FAILED") >= 2
    _, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert sorted(c.info.status for c in children) == ["FAILED", "FAILED", "FINISHED"]
    summary = json.loads((_search_dir(tmp_path) / "summary.json").read_text())
    assert summary["failed_trials"] == 2 and summary["best"] == []
    assert "the final fine-tune of trial" in proc.stdout and "DivergedError" in proc.stdout
    # The uniform 8-bit comparison diverges too: reported as a warning, not a crash.
    assert "uniform 8-bit policy's fine-tune failed" in proc.stdout
    assert ("the fine-tune of uniform 2/2 (the widest uniform policy inside the budget) failed "
            "(trainables.training.DivergedError") in proc.stdout
    assert summary["uniform_in_budget"] is None
    assert "test_acc" not in summary["uniform_8bit"]


@pytest.mark.parametrize(("args", "setup", "message"), [
    (["search", "missing.yaml"], None, "not found"),
    (["search", "bad.yaml"], "searcher: [oops", "not valid YAML"),
    (["search", "--searcher", "nope"], None, "unknown searcher 'nope'"),
    (["search", "--max-bits", "9"], None, "max_bits <= 8"),
    (["search", "--min-bits", "0"], None, "1 <= min_bits"),
    (["search", "bad.yaml"], "bits: {w: [2, 9], a: [8]}", "bits.w: expected bit widths in [2, 8], got 9"),
    (["search", "bad.yaml"], "bits: {w: [4], a: []}", "bits.a: expected at least one bit width"),
    (["search", "--budget", "size_mb=0.000001"], None, "infeasible"),
    (["search", "--num-trials", "0"], None, "num_trials: expected an integer >= 1"),
    (["search", "--hardware", "tpu"], None, "unknown hardware 'tpu'"),
    (["search", "--model", "user_models:no_layers"], None, "no quantizable layer"),
    # real networks and data
    (["search", "--model", "mobilenet_v2", "--dataset", "cifar10", "--weights", "missing.pt"], None,
     "checkpoint 'missing.pt' not found"),
    (["search", "--model", "mobilenet_v2", "--dataset", "cifar10", "--weights", "resnet18.pt"],
     "checkpoint:resnet18", "does not fit model 'mobilenet_v2'"),
    (["search", "--model", "mobilenet_v2", "--dataset", "cifar10", "--weights", "IMAGENET1K_V1"], None,
     "not in the local torch cache"),  # TORCH_HOME is an empty directory: no download is tried
    (["search", "bad.yaml"], "dataset_options: {classes: 4, train_per_class: 150}",
     "expected at most 139 train + val images per class"),
    (["search", "--model", "mobilenet_v2", "--dataset", "mnist"], None, "takes 3-channel images"),
    # storage (the S3 cases are in test_e2e_s3.py, against a local S3 server)
    (["search", "--storage-dir", "foo://bucket/runs"], None, "storage_dir: cannot use 'foo://bucket/runs'"),
    (["resume", "foo://bucket/runs/haq-1"], None, "SEARCH_DIR: cannot use 'foo://bucket/runs/haq-1'"),
    (["search", "bad.yaml"], "model: mobilenet_v2\ndataset: imagefolder\ndata_root: no_such_dir",
     "expected an ImageNet-layout folder with train/<class>/* and val/<class>/* images, got no train/"),
])
def test_bad_input_one_line_exit_2_nothing_written(tmp_path, args, setup, message):
    if setup is not None and setup.startswith("checkpoint:"):  # a checkpoint of another architecture
        import torch

        from trainables.models import build_model

        torch.save(build_model(setup.partition(":")[2], num_classes=10).model.state_dict(), tmp_path / "resnet18.pt")
    elif setup is not None:
        (tmp_path / "bad.yaml").write_text(setup)
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(__import__("pathlib").Path(__file__).parent),
                                          os.environ.get("PYTHONPATH", "")]),
           "TORCH_HOME": str(tmp_path / "torch_home")}
    proc = run_cli(args, tmp_path, timeout=120, env=env)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("haqtune: error: "), proc.stderr
    assert message in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "haqtune_runs").exists()
    assert not (tmp_path / "data").exists() and not (tmp_path / "torch_home").exists()  # nothing downloaded
