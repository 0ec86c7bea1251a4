"""AQGAN: the conditional GAN (``_aqgan``), its searcher (``aqgan``) and ``haqtune generate``.

The searcher contract (valid configs, failures, unknown ids, save/restore) is covered for
every registered searcher by ``test_searcher_contract.py``; these tests check what is
AQGAN's own: the accuracy scale, that the generator really follows its condition, that
the regression head ranks policies, warm-up diversity, budget projection, history
seeding, exact continuation after restore, the exported generator, and the CLI end to end.
"""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr
from test_searcher_contract import LAYERS, fake_result, make_problem, run_trials

from orchestrator.searchers import SEARCHER_ARTIFACTS_DIR, SearchProblem, make_searcher
from orchestrator.searchers._aqgan import AQGAN, AccuracyScale, GANConfig, RidgePredictor, one_hot
from orchestrator.searchers.aqgan import (
    GENERATOR_FILE,
    generate_policies,
    load_generator,
    project_many,
    van_der_corput,
)
from search_spaces import AllowedBits, Budget, policy_cost, policy_from_config

FAST = {"train_steps": 60, "hidden": 32}


def _synthetic(n: int, num_layers: int, seed: int, lo: int = 1, hi: int = 8):
    """Policies at a random level each; accuracy grows with mean bits (a noiseless, monotone task)."""
    rng = np.random.default_rng(seed)
    level = rng.uniform(lo, hi, size=(n, 1, 1))
    pol = np.clip(np.rint(level + rng.normal(0, 1.0, size=(n, num_layers, 2))), lo, hi).astype(np.int64)
    acc = 0.3 + 0.6 * (pol.mean(axis=(1, 2)) - lo) / (hi - lo)
    return pol, acc


def test_accuracy_scale_maps_quantiles_with_ties():
    scale = AccuracyScale([0.5, 0.9, 0.7, 0.7, 0.1])
    assert scale.to_unit(0.1) == 0.0 and scale.to_unit(0.9) == 1.0
    assert scale.to_unit(0.7) == pytest.approx(0.625)  # sorted ranks 2 and 3 of 0..4: mid-rank 2.5 / 4
    assert scale.to_unit(0.0) == 0.0 and scale.to_unit(1.0) == 1.0  # outside: clipped to the ends
    values = np.array([0.1, 0.5, 0.7, 0.9])
    np.testing.assert_allclose(scale.to_acc(scale.to_unit(values)), values)
    assert np.all(np.diff(scale.to_unit(np.linspace(0, 1, 50))) >= 0)


def _additive(n: int, num_layers: int, seed: int):
    """Policies at random levels; val_acc = 0.9 minus a fixed per-entry penalty that grows as
    bits drop (what quantization accuracy mostly is), plus a little noise."""
    rng = np.random.default_rng(seed)
    pol, _ = _synthetic(n, num_layers, seed)
    sens = np.random.default_rng(100).lognormal(0, 0.5, size=(num_layers, 2)) * 0.004
    drop = (sens[None] * (8 - pol) ** 1.5).sum(axis=(1, 2))
    return pol, 0.9 - drop + rng.normal(0, 0.002, n)


def test_ridge_predictor_leave_one_out_is_exact_and_it_learns_additive_accuracy():
    pol, acc = _additive(30, len(LAYERS), seed=0)
    ridge = RidgePredictor(policies=pol, accs=acc, min_bits=1, max_bits=8)
    assert ridge.alpha in (0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    # The closed form (hat-matrix leverages) against refitting without each point in turn.
    residuals = []
    for i in range(len(acc)):
        keep = np.arange(len(acc)) != i
        fit = RidgePredictor(policies=pol[keep], accs=acc[keep], min_bits=1, max_bits=8, alphas=(ridge.alpha,))
        residuals.append(acc[i] - fit.predict(pol[i:i + 1])[0])
    assert ridge.loo_mse == pytest.approx(np.mean(np.square(residuals)), rel=1e-6)
    # Thermometer code: one "bits <= t" column per entry and threshold 1..7.
    np.testing.assert_array_equal(ridge.features(np.full((1, len(LAYERS), 2), 3))[0].reshape(-1, 7)[0],
                                  [0, 0, 1, 1, 1, 1, 1])
    held_out, true_acc = _additive(200, len(LAYERS), seed=1)
    # The same linear model on the one-hot code (what the generator's consistency term uses).
    weights, bias = ridge.one_hot_weights()
    on_one_hot = one_hot(held_out, 1, 8).double() @ weights.double() + bias
    np.testing.assert_allclose(on_one_hot.numpy(), ridge.predict(held_out), atol=1e-5)
    assert np.mean(np.abs(ridge.predict(held_out) - true_acc)) < 0.25 * np.mean(np.abs(true_acc - acc.mean()))
    assert spearmanr(ridge.predict(held_out), true_acc).statistic > 0.9


def test_van_der_corput_fills_the_interval():
    points = [van_der_corput(i) for i in range(1, 9)]
    assert points[:3] == [0.5, 0.25, 0.75]
    assert len(set(points)) == 8 and all(0 < p < 1 for p in points)


def test_generator_follows_the_condition_and_head_ranks_policies():
    pol, acc = _synthetic(80, len(LAYERS), seed=0)
    model = AQGAN(num_layers=len(LAYERS), min_bits=1, max_bits=8, config=GANConfig(train_steps=300), seed=0)
    model.fit(pol, acc)
    targets = np.quantile(acc, [0.1, 0.3, 0.5, 0.7, 0.9])
    mean_bits = [model.generate(64, t).mean() for t in targets]
    # An unconditional generator (one that ignores its target) would give a flat line.
    assert spearmanr(targets, mean_bits).statistic == pytest.approx(1.0)
    assert mean_bits[-1] - mean_bits[0] > 1.5
    held_out, true_acc = _synthetic(60, len(LAYERS), seed=1)
    assert spearmanr(model.predict(held_out), true_acc).statistic > 0.8
    samples = model.generate(32, 0.6)
    assert samples.shape == (32, len(LAYERS), 2) and samples.dtype == np.int64
    assert samples.min() >= 1 and samples.max() <= 8


def test_same_seed_same_generator():
    pol, acc = _synthetic(30, len(LAYERS), seed=2)
    outs = []
    for _ in range(2):
        model = AQGAN(num_layers=len(LAYERS), min_bits=1, max_bits=8, config=GANConfig(**FAST), seed=7)
        model.fit(pol, acc)
        outs.append((model.generate(16, 0.5), model.predict(pol)))
    np.testing.assert_array_equal(outs[0][0], outs[1][0])
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_warmup_is_diverse_and_inside_the_budget():
    problem = make_problem()
    searcher = make_searcher("aqgan", problem, warmup=8, **FAST)
    configs = run_trials(searcher, problem, [f"w{i}" for i in range(8)])
    policies = [policy_from_config(c, problem.num_layers) for c in configs]
    limit = problem.budget.limit_for(problem.table)
    assert all(policy_cost(problem.table, p, problem.budget.metric) <= limit for p in policies)
    # The first is the projected all-max policy; the rest spread over the bit range.
    np.testing.assert_array_equal(policies[0], problem.project(np.full((problem.num_layers, 2), 7)))
    means = sorted(p.mean() for p in policies)
    assert means[-1] - means[0] > 1.5
    assert len({p.tobytes() for p in policies}) == 8


def test_selection_predictor_is_refitted_on_every_completed_trial_and_restored(tmp_path):
    problem = make_problem(seed=3)
    searcher = make_searcher("aqgan", problem, warmup=4, retrain_every=3, **FAST)
    run_trials(searcher, problem, [f"t{i}" for i in range(6)])  # trained at 4, data at 6
    assert searcher.model.rounds == 1
    fresh = RidgePredictor(policies=np.stack(searcher.policies), accs=np.array(searcher.accs),
                           min_bits=problem.min_bits, max_bits=problem.max_bits)
    probe = np.stack(searcher.policies)
    np.testing.assert_array_equal(searcher.model.predict(probe), fresh.predict(probe))
    path = str(tmp_path / "aqgan.ckpt")
    searcher.save(path)
    restored = make_searcher("aqgan", make_problem(seed=3), warmup=4, retrain_every=3, **FAST)
    restored.restore(path)
    np.testing.assert_array_equal(restored.model.predict(probe), fresh.predict(probe))


def test_condition_spread_widens_the_pool():
    pol, acc = _synthetic(80, len(LAYERS), seed=0)
    model = AQGAN(num_layers=len(LAYERS), min_bits=1, max_bits=8, config=GANConfig(train_steps=300), seed=0)
    model.fit(pol, acc)
    target = float(np.median(acc))
    narrow = model.generate(256, target).mean(axis=(1, 2))
    wide = model.generate(256, target, spread=0.4).mean(axis=(1, 2))
    assert wide.std() > narrow.std()
    assert wide.min() >= 1 and wide.max() <= 8


def test_trained_suggestions_are_projected_unseen_and_deterministic():
    runs = []
    for _ in range(2):
        problem = make_problem(seed=5)
        searcher = make_searcher("aqgan", problem, warmup=4, retrain_every=2, **FAST)
        runs.append(run_trials(searcher, problem, [f"t{i}" for i in range(12)]))
        assert searcher.model.trained and searcher.model.rounds >= 4
    assert runs[0] == runs[1]
    problem = make_problem(seed=5)
    policies = [problem.project(policy_from_config(c, problem.num_layers)) for c in runs[0]]
    assert all(np.array_equal(problem.project(p), p) for p in policies)  # already inside the budget
    assert len({p.tobytes() for p in policies}) == len(policies)  # never the same policy twice


def test_history_seeds_the_generator_before_any_trial():
    problem = make_problem()
    pol, acc = _synthetic(12, problem.num_layers, seed=3, lo=2, hi=7)
    history = [(" ".join(f"{w}/{a}" for w, a in p), float(a_)) for p, a_ in zip(pol, acc, strict=True)]
    searcher = make_searcher("aqgan", problem, history=history, warmup=6, **FAST)
    assert searcher.model.trained and len(searcher.accs) == 12
    config = searcher.suggest("first")
    policy = policy_from_config(config, problem.num_layers)
    assert np.array_equal(problem.project(policy), policy)
    with pytest.raises(ValueError, match="expected policies of 6 layers"):
        make_searcher("aqgan", problem, history=[("8/8 8/8", 0.9)])


def test_restore_after_training_continues_exactly(tmp_path):
    problem = make_problem(seed=1)
    searcher = make_searcher("aqgan", problem, warmup=4, retrain_every=2, **FAST)
    run_trials(searcher, problem, [f"t{i}" for i in range(7)])
    pending = searcher.suggest("pending")
    path = str(tmp_path / "aqgan.ckpt")
    searcher.save(path)
    restored = make_searcher("aqgan", make_problem(seed=1), warmup=4, retrain_every=2, **FAST)
    restored.restore(path)
    for s in (searcher, restored):
        s.on_trial_complete("pending", fake_result(problem, pending))
    assert run_trials(restored, problem, ["n0", "n1", "n2"]) == run_trials(searcher, problem, ["n0", "n1", "n2"])
    # Same layers and bit range, but first and last layers fixed at 8 bits: another space.
    fixed = dataclasses.replace(make_problem(seed=1), allowed=AllowedBits.build(
        len(LAYERS), min_bits=problem.min_bits, max_bits=problem.max_bits, fix_first_last=True))
    with pytest.raises(ValueError, match=r"aqgan checkpoint .* expected a search over 6 layers with bits .*\(layers 0, 5\)"):
        make_searcher("aqgan", fixed, **FAST).restore(path)


def test_options_are_validated():
    problem = make_problem()
    with pytest.raises(ValueError, match="unknown option 'nope'"):
        make_searcher("aqgan", problem, nope=1)
    with pytest.raises(ValueError, match="loss: choose between hinge, wgan-gp"):
        make_searcher("aqgan", problem, loss="bce")
    with pytest.raises(ValueError, match="target_acc: expected a number in"):
        make_searcher("aqgan", problem, target_acc=1.5)


def test_wgan_gp_loss_trains():
    pol, acc = _synthetic(30, len(LAYERS), seed=4)
    model = AQGAN(num_layers=len(LAYERS), min_bits=1, max_bits=8,
                  config=GANConfig(loss="wgan-gp", **FAST), seed=0)
    model.fit(pol, acc)
    assert all(np.isfinite(v) for v in model.losses.values())


def test_exported_generator_reloads_and_serves_another_budget(tmp_path):
    problem = make_problem()
    searcher = make_searcher("aqgan", problem, warmup=4, **FAST)
    run_trials(searcher, problem, [f"t{i}" for i in range(6)])
    searcher.save_to_dir(str(tmp_path), "s")
    path = tmp_path / SEARCHER_ARTIFACTS_DIR / GENERATOR_FILE
    model, exported = load_generator(path)
    assert len(exported["accs"]) == len(searcher.accs)
    np.testing.assert_allclose(model.predict(np.stack(searcher.policies)),
                               searcher.model.predict(np.stack(searcher.policies)))
    # Another hardware budget: a tighter size limit, which the search never saw.
    other = SearchProblem(layers=LAYERS, table=problem.table, budget=Budget("size_mb", 0.4, relative=True),
                          min_bits=problem.min_bits, max_bits=problem.max_bits, cost_metric="size_mb")
    target = float(np.median(searcher.accs))
    rows = generate_policies(model, other, target, 5, pool=128)
    limit = other.budget.limit_for(other.table)
    assert 1 <= len(rows) <= 5
    assert all(policy_cost(other.table, r["policy"], "size_mb") <= limit for r in rows)
    gaps = [abs(r["predicted"] - target) for r in rows]
    assert gaps == sorted(gaps)
    assert len({r["policy"].tobytes() for r in rows}) == len(rows)
    # Known policies are ranked by their measured accuracy, not the estimate: measured
    # exactly at the target, the last two candidates of a draw come first in the same draw.
    model.torch_rng.manual_seed(11)
    rows = generate_policies(model, other, target, 5, pool=128)
    known = np.stack([r["policy"] for r in rows[-2:]])
    model.torch_rng.manual_seed(11)
    again = generate_policies(model, other, target, 5, pool=128, measured=(known, np.full(2, target)))
    assert [r["measured"] for r in again] == [True, True, False, False, False]
    assert {r["policy"].tobytes() for r in again[:2]} == {p.tobytes() for p in known}
    assert all(r["predicted"] == target for r in again[:2])
    with pytest.raises(ValueError, match="expected an aqgan generator"):
        torch.save({"version": 99}, tmp_path / "bad.pt")
        load_generator(tmp_path / "bad.pt")


def test_project_many_equals_project_one_by_one():
    problem = make_problem()
    rng = np.random.default_rng(0)
    raw = rng.integers(1, 9, size=(200, problem.num_layers, 2))
    expected = np.unique(np.stack([problem.project(p) for p in raw]), axis=0)
    np.testing.assert_array_equal(project_many(problem, raw), expected)


def test_history_from_an_mlflow_experiment(tmp_path, tmp_path_factory, monkeypatch):
    from test_tracking import FakeTrial, empty_store, report

    from orchestrator.tracking import MlflowTracker, load_trial_history

    monkeypatch.chdir(tmp_path)
    uri = empty_store(tmp_path_factory, tmp_path / "mlflow.db")
    base = {"model": "demo", "dataset": "digits", "num_layers": 3, "min_bits": 1, "max_bits": 8,
            "finetune_epochs": 2, "seed": 0}
    searches = (("tpe-a", "tpe", {**base, "hardware": "bismo-edge"}, ["8/8 4/4 2/2", "6/6 6/6 6/6"]),
                ("haq-b", "haq", {**base, "hardware": "bitfusion"}, ["3/3 3/3 3/3"]),
                ("tpe-c", "tpe", {**base, "finetune_epochs": 5}, ["1/1 1/1 1/1"]))  # other fine-tune
    for search_id, searcher, params, policies in searches:
        tracker = MlflowTracker(tracking_uri=uri, experiment="hist", search_id=search_id, searcher=searcher,
                                search_dir=tmp_path / search_id, params=params)
        tracker.start()
        for i, policy in enumerate(policies):
            trial = FakeTrial(f"{search_id}-{i}")
            tracker.on_trial_start(0, [], trial)
            trial.last_result = report(0.5 + 0.1 * i, 1, final=True, policy=policy)
            tracker.on_trial_result(0, [], trial, trial.last_result)
            tracker.on_trial_complete(0, [], trial)
        failed = FakeTrial(f"{search_id}-failed")
        tracker.on_trial_start(0, [], failed)
        tracker.on_trial_error(0, [], failed)
        tracker.end()
    history = load_trial_history(uri, "hist", base)
    assert sorted(history) == [("3/3 3/3 3/3", 0.5), ("6/6 6/6 6/6", 0.6), ("8/8 4/4 2/2", 0.5)]
    assert load_trial_history(uri, "no-such-experiment", base) == []
    assert load_trial_history(f"sqlite:///{tmp_path / 'missing.db'}", "hist", base) == []


def test_history_matches_on_every_fine_tune_setting():
    """A search fine-tuned at another learning rate (or distilling) measured other accuracies:
    its trials must not seed this one, whatever the epochs say."""
    from orchestrator.config import SearchConfig
    from orchestrator.search import HISTORY_MATCH, _search_params, prepare

    base = SearchConfig()
    prepared = prepare(base)

    def matched(**finetune):
        config = base.replace(finetune=dataclasses.replace(base.finetune, **finetune))
        params = _search_params(config, prepared)
        return {k: str(params[k]) for k in HISTORY_MATCH}

    assert matched() == matched(lr=base.finetune.lr)
    for change in ({"lr": base.finetune.lr * 2}, {"batch_size": 32}, {"weight_decay": 1e-4},
                   {"epochs": 5}, {"distill_weight": 0.5}, {"max_steps_per_epoch": 3}):
        assert matched(**change) != matched(), change


# ---- end to end: the real CLI, Ray Tune, MLflow ---------------------------------------------


@pytest.mark.slow
def test_search_then_generate_evaluate(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from e2e import run_cli, runs_of
    from orchestrator.cli import main

    (tmp_path / "aq.yaml").write_text(
        "searcher: aqgan\nnum_trials: 6\nhardware: bitfusion\nbudget: energy=0.5\nexperiment: aq\n"
        "reference: {epochs: 3}\nfinetune: {epochs: 1}\ntest_top_k: 1\nfinal_finetune: null\nmin_bits: 1\ncompare_uniform: false\n"
        "searcher_options: {warmup: 4, train_steps: 60, hidden: 32, history_from_experiment: true}\n")
    proc = run_cli(["search", "aq.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "0 finished trials of earlier searches in experiment 'aq'" in proc.stdout  # a new store
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    from mlflow.tracking import MlflowClient

    (search_parent,), _ = runs_of(uri, "aq")
    artifacts = {a.path for a in MlflowClient(uri).list_artifacts(search_parent.info.run_id)}
    assert {GENERATOR_FILE, "config.yaml"} <= artifacts

    accs = sorted(c.data.metrics["val_acc"] for c in runs_of(uri, "aq")[1])
    target = accs[len(accs) // 2]
    proc = run_cli(["generate", "--experiment", "aq", "--target-acc", target, "--num", 2,
                    "--hardware", "bismo-edge", "--budget", "latency=0.5", "--output", "gen.json",
                    "--evaluate"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[2/2]" in proc.stdout and "mean |val_acc - target|" in proc.stdout
    written = json.loads((tmp_path / "gen.json").read_text())
    assert written["hardware"] == "bismo-edge" and written["target_acc"] == target
    limit = 0.5 * written["uniform_8bit"]["latency_ms"]
    assert len(written["policies"]) == 2
    assert all(p["latency_ms"] <= limit and 0 <= p["val_acc"] <= 1 for p in written["policies"])

    parents, children = runs_of(uri, "aq")
    (gen_parent,) = [p for p in parents if p.data.tags["haqtune.searcher"] == "aqgan-generate"]
    assert gen_parent.data.params["source_search_id"] == search_parent.data.tags["haqtune.search_id"]
    assert gen_parent.info.status == "FINISHED"
    kids = [c for c in children if c.data.tags["mlflow.parentRunId"] == gen_parent.info.run_id]
    assert len(kids) == 2
    by_policy = {p["policy"]: p for p in written["policies"]}
    for kid in kids:
        assert float(kid.data.params["target_acc"]) == target
        assert kid.data.params["policy"] in by_policy  # MLflow and the output file agree
        assert kid.data.metrics["val_acc"] == pytest.approx(by_policy[kid.data.params["policy"]]["val_acc"])
        assert kid.data.metrics["latency_ms"] <= limit * (1 + 1e-9)
    err = np.mean([abs(p["val_acc"] - target) for p in written["policies"]])
    assert gen_parent.data.metrics["mean_abs_target_error"] == pytest.approx(err, abs=1e-3)

    # Bad input: one line, exit 2, nothing new in the store (through the console script
    # once; the other cases in-process, from the same directory and store).
    proc = run_cli(["generate", "--experiment", "aq", "--target-acc", "1.5"], tmp_path, timeout=120)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "--target-acc: expected a fraction" in lines[0], proc.stderr
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    # A budget far tighter than the search's (min_bits 1 above keeps it feasible), at its
    # best accuracy: every policy that fits
    # is predicted short of the target, and generate says so (one warning, no failure).
    result = CliRunner().invoke(main, ["generate", "--experiment", "aq", "--target-acc", str(accs[-1]),
                                       "--num", "2", "--hardware", "bitfusion", "--budget", "energy=0.35"])
    assert result.exit_code == 0, result.output
    (warning,) = [line for line in result.stderr.splitlines() if "predicted at val_acc" in line]
    assert "points below the target: the budget is outside what search" in warning
    for args, message in (
        (["generate", "--experiment", "nope", "--target-acc", "0.5"], "unknown experiment 'nope'"),
        (["generate", "--experiment", "aq", "--target-acc", "0.5", "--hardware", "tpu"], "unknown hardware"),
    ):
        result = CliRunner().invoke(main, args)
        lines = result.stderr.strip().splitlines()
        assert result.exit_code == 2 and len(lines) == 1 and message in lines[0], result.output
    assert len(runs_of(uri, "aq")[0]) == 2
    assert os.path.exists(tmp_path / "gen.json")
