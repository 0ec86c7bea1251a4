"""The baseline searchers: gp, cmaes, qmc, nsga2, uniform, sensitivity-dp; the Pareto front.

(The generic searcher contract runs on them in ``test_searcher_contract.py``.)
"""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
from ray.tune.search import Searcher

from hardware import BITS, CostTable, LayerSpec
from orchestrator.search import pareto_front
from orchestrator.searchers import SearchProblem, make_searcher, searcher_info
from orchestrator.searchers.sensitivity_dp import mckp_solutions, num_oracle_calls
from orchestrator.searchers.uniform import uniform_pairs
from search_spaces import AllowedBits, Budget, policy_cost, policy_from_config, solve_mckp
from search_spaces import metrics as M

NEW_SEARCHERS = ("gp", "cmaes", "qmc", "nsga2", "uniform", "sensitivity-dp")


def _layer(i: int, cin: int, cout: int, hw: int) -> LayerSpec:
    weights = cin * cout * 9
    return LayerSpec(f"conv{i}", "conv", cin, cout, (3, 3), (1, 1), 1, (hw, hw), (hw, hw),
                     weights, hw * hw * weights)


LAYERS = [_layer(0, 3, 8, 8), _layer(1, 8, 16, 8), _layer(2, 16, 16, 4)]


def _table(layers) -> CostTable:
    macs = np.array([s.macs for s in layers], dtype=np.float64)[:, None, None]
    acts = np.array([s.input_elements for s in layers], dtype=np.float64)[:, None, None]
    latency_s = macs * BITS[None, :, None] * BITS[None, None, :] * 1e-12 + acts * BITS[None, None, :] * 1e-10
    return CostTable(latency_s, 2.0 * latency_s, np.array([s.weights for s in layers]))


def _problem(**kwargs) -> SearchProblem:
    fields = dict(layers=LAYERS, table=_table(LAYERS), budget=Budget("latency_ms", 0.5, relative=True),
                  seed=0, num_trials=12)
    fields.update(kwargs)
    return SearchProblem(**fields)


def _policy(problem: SearchProblem, config) -> np.ndarray:
    assert isinstance(config, dict) and set(config) == set(problem.keys)
    pol = policy_from_config(config, problem.num_layers)
    assert pol.min() >= problem.min_bits and pol.max() <= problem.max_bits
    return pol


@pytest.mark.parametrize("name", NEW_SEARCHERS)
def test_builds_and_suggests_valid_policies(name):
    problem = _problem(min_bits=2, max_bits=6)
    searcher = make_searcher(name, problem)
    for i in range(4):
        pol = _policy(problem, searcher.suggest(f"t{i}"))
        costs = problem.table.evaluate(problem.project(pol))
        searcher.on_trial_complete(f"t{i}", {M.VAL_ACC: 0.5 + 0.01 * float(pol.sum()),
                                             M.LATENCY_MS: float(costs.latency_ms[0])})
    assert searcher_info(name).objective == ("multi" if name == "nsga2" else "single")


def test_optuna_samplers_are_the_documented_ones():
    import optuna

    expected = {"gp": optuna.samplers.GPSampler, "cmaes": optuna.samplers.CmaEsSampler,
                "qmc": optuna.samplers.QMCSampler, "nsga2": optuna.samplers.NSGAIISampler}
    for name, cls in expected.items():
        assert isinstance(make_searcher(name, _problem())._sampler, cls), name


def test_nsga2_is_multi_objective_and_works_without_a_budget():
    problem = _problem(budget=None, cost_metric=M.ENERGY_MJ, num_trials=100)
    searcher = make_searcher("nsga2", problem)
    assert searcher.metric == [M.VAL_ACC, M.ENERGY_MJ] and searcher.mode == ["max", "min"]
    assert searcher._sampler._population_size == 20
    assert make_searcher("nsga2", _problem(num_trials=12))._sampler._population_size == 8
    for i in range(25):  # past the first generation
        pol = _policy(problem, searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {M.VAL_ACC: float(pol.mean()) / 8,
                                             M.ENERGY_MJ: float(problem.table.evaluate(pol).energy_mj[0])})
    searcher.on_trial_complete("never-suggested", {M.VAL_ACC: 0.5})  # ignored
    trials = searcher._ot_study.trials
    assert sum(t.values is not None for t in trials) == 25


# ---- uniform -----------------------------------------------------------------------------


def _drain(searcher, problem, limit=50) -> list:
    out = []
    for i in range(limit):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            return out
        pol = _policy(problem, config)
        out.append(tuple(map(tuple, np.unique(pol, axis=0))))
        searcher.on_trial_complete(f"t{i}", {M.VAL_ACC: 0.9})
    raise AssertionError("never FINISHED")


def test_uniform_enumerates_every_uniform_policy_then_finishes():
    problem = _problem()
    searcher = make_searcher("uniform", problem)
    assert _drain(searcher, problem) == [((k, k),) for k in range(8, 0, -1)]
    assert searcher.suggest("again") == Searcher.FINISHED

    problem = _problem(min_bits=3, max_bits=5)
    assert _drain(make_searcher("uniform", problem), problem) == [((5, 5),), ((4, 4),), ((3, 3),)]
    searcher = make_searcher("uniform", _problem(), bits=[8, 6, 4, 6])
    assert _drain(searcher, _problem()) == [((8, 8),), ((6, 6),), ((4, 4),)]  # duplicates once
    searcher = make_searcher("uniform", _problem(), w_bits=[8, 4, 2], a_bits=[8, 8, 4])
    assert _drain(searcher, _problem()) == [((8, 8),), ((4, 8),), ((2, 4),)]


def test_uniform_uses_only_allowed_widths_and_keeps_fixed_layers():
    allowed = AllowedBits.build(len(LAYERS), w_bits=[4, 8], a_bits=[8], fix_first_last=True)
    problem = _problem(allowed=allowed, budget=None)
    searcher = make_searcher("uniform", problem)
    policies = []
    for i in range(3):
        config = searcher.suggest(f"t{i}")
        if config == Searcher.FINISHED:
            break
        policies.append(_policy(problem, config).tolist())
    # 8/8, then 4/8 on every searched layer; the first and last layers stay at 8/8.
    assert policies == [[[8, 8]] * 3, [[8, 8], [4, 8], [8, 8]]]
    with pytest.raises(ValueError, match=r"expected bits allowed on every searched layer \(8\), got 4"):
        make_searcher("uniform", problem, bits=[4])
    sparse = _problem(allowed=AllowedBits.build(len(LAYERS), w_bits=[2, 4, 8], a_bits=[3, 6]))
    assert uniform_pairs(sparse) == [(8, 6), (4, 6), (4, 3), (2, 3)]


@pytest.mark.parametrize(("options", "message"), [
    ({"bits": [9]}, "allowed on every searched layer"),
    ({"bits": []}, "at least one"),
    ({"bits": 4}, "expected a list"),
    ({"w_bits": [8]}, "together"),
    ({"w_bits": [8, 4], "a_bits": [8]}, "equal length"),
    ({"bits": [8], "w_bits": [8], "a_bits": [8]}, "either bits or"),
])
def test_uniform_rejects_bad_options(options, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        make_searcher("uniform", _problem(), **options)


def test_uniform_save_restore_is_atomic_and_keeps_position(tmp_path):
    problem = _problem()
    searcher = make_searcher("uniform", problem, bits=[8, 4, 2])
    searcher.suggest("a")
    searcher.on_trial_complete("a", {M.VAL_ACC: 0.9})
    pending = searcher.suggest("b")
    path = tmp_path / "uniform.json"
    searcher.save(str(path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["uniform.json"]
    state = json.loads(path.read_text())
    assert state["metric"] == M.VAL_ACC and state["mode"] == "max"
    assert state["space"]["keys"] == problem.keys

    restored = make_searcher("uniform", _problem())  # default options: the checkpoint wins
    restored.restore(str(path))
    assert restored.suggest("b") == pending  # in flight across the checkpoint
    restored.on_trial_complete("b", {M.VAL_ACC: 0.9})
    assert np.all(_policy(problem, restored.suggest("c")) == 2)
    assert restored.suggest("d") == Searcher.FINISHED
    with pytest.raises(ValueError, match="expected a search over 2 layers"):
        make_searcher("uniform", _problem(layers=LAYERS[:2], table=_table(LAYERS[:2]))).restore(str(path))


def test_checkpoints_carry_the_allowed_bits(tmp_path):
    path = tmp_path / "uniform.json"
    make_searcher("uniform", _problem()).save(str(path))
    sets = _problem(allowed=AllowedBits.build(len(LAYERS), w_bits=[4, 8], fix_first_last=True))
    with pytest.raises(ValueError, match=r"expected a search over 3 layers with bits w 8 a 8 \(layers 0, 2\)"):
        make_searcher("uniform", sets).restore(str(path))
    # A checkpoint written before bit sets existed meant [min_bits, max_bits] everywhere.
    state = json.loads(path.read_text())
    del state["space"]["allowed"]
    path.write_text(json.dumps(state))
    make_searcher("uniform", _problem()).restore(str(path))
    with pytest.raises(ValueError, match="expected a search over 3 layers"):
        make_searcher("uniform", sets).restore(str(path))


# ---- sensitivity-dp ----------------------------------------------------------------------


class SeparableOracle:
    """acc = ref - sum over quantized layers of sw[l] * f(w) + sa[l] * g(a), f(max) = g(max) = 0."""

    def __init__(self, num_layers: int, max_bits: int, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.ref = 0.9
        self.sens = rng.uniform(0.001, 0.02, size=(num_layers, 2))
        self.max_bits = max_bits
        self.calls = 0

    def noise(self, bits):
        return 2.0 ** -(np.asarray(bits) - 1.0) - 2.0 ** -(self.max_bits - 1.0)

    def drop(self, policy) -> float:
        pol = np.asarray(policy)
        return float((self.sens[:, 0] * self.noise(pol[:, 0]) + self.sens[:, 1] * self.noise(pol[:, 1])).sum())

    def __call__(self, layer, w_bits, a_bits):
        self.calls += 1
        if layer is None:
            return self.ref
        return self.ref - float(self.sens[layer, 0] * self.noise(w_bits) + self.sens[layer, 1] * self.noise(a_bits))


def _brute_force_optimum(problem: SearchProblem, oracle: SeparableOracle):
    limit = problem.budget.limit_for(problem.table)
    bits = range(problem.min_bits, problem.max_bits + 1)
    best, best_drop = None, np.inf
    for flat in itertools.product(bits, repeat=2 * problem.num_layers):
        pol = np.array(flat).reshape(-1, 2)
        if policy_cost(problem.table, pol, problem.budget.metric) <= limit:
            drop = oracle.drop(pol)
            if drop < best_drop:
                best, best_drop = pol, drop
    return best, best_drop


@pytest.mark.parametrize("metric", ["latency_ms", "size_mb"])
def test_sensitivity_dp_finds_the_exact_optimum_with_the_documented_oracle_calls(metric):
    lo, hi = 2, 5
    oracle = SeparableOracle(len(LAYERS), hi)
    problem = _problem(min_bits=lo, max_bits=hi, budget=Budget(metric, 0.55, relative=True),
                       accuracy_oracle=oracle)
    searcher = make_searcher("sensitivity-dp", problem, top_k=3)
    assert oracle.calls == 0  # measured lazily
    first = _policy(problem, searcher.suggest("t0"))
    assert oracle.calls == num_oracle_calls(problem) == 1 + 2 * 3 * 3
    assert searcher.sensitivity_source == "oracle"
    _, best_drop = _brute_force_optimum(problem, oracle)
    assert oracle.drop(first) == pytest.approx(best_drop, abs=1e-12)
    assert searcher.predicted_drop(first) == pytest.approx(best_drop, abs=1e-12)
    # The next proposals: distinct, inside the budget, predicted no better than the first.
    limit = problem.budget.limit_for(problem.table)
    seen = {first.tobytes()}
    for i in range(1, 8):
        pol = _policy(problem, searcher.suggest(f"t{i}"))
        assert pol.tobytes() not in seen
        seen.add(pol.tobytes())
        assert policy_cost(problem.table, pol, metric) <= limit
        assert oracle.drop(pol) >= best_drop - 1e-12
    assert oracle.calls == 1 + 2 * 3 * 3  # never measured again


def test_sensitivity_dp_with_bit_sets_measures_less_and_stays_exact():
    allowed = AllowedBits.build(len(LAYERS), w_bits=[2, 4, 8], a_bits=[3, 8], fix_first_last=True)
    oracle = SeparableOracle(len(LAYERS), 8)
    problem = _problem(allowed=allowed, budget=Budget("latency_ms", 0.7, relative=True),
                       accuracy_oracle=oracle)
    searcher = make_searcher("sensitivity-dp", problem, top_k=3)
    first = _policy(problem, searcher.suggest("t0"))
    # Only the middle layer has a choice: w in {2, 4}, a in {3} below 8, plus the reference.
    assert oracle.calls == num_oracle_calls(problem) == 1 + 2 + 1
    limit = problem.budget.limit_for(problem.table)
    feasible = [np.array(p).reshape(-1, 2) for p in itertools.product(
        *[ws for w, a in zip(allowed.w, allowed.a, strict=True) for ws in (w, a)])]
    feasible = [p for p in feasible if policy_cost(problem.table, p, "latency_ms") <= limit]
    best = min(oracle.drop(p) for p in feasible)
    assert oracle.drop(first) == pytest.approx(best, abs=1e-12)
    proposals = [first] + [_policy(problem, c) for c in (searcher.suggest(f"t{i}") for i in range(1, 10))
                           if c != Searcher.FINISHED]
    # Distinct allowed policies inside the budget (dominated ones pruned), then FINISHED.
    assert len({p.tobytes() for p in proposals}) == len(proposals) < 10
    assert {p.tobytes() for p in proposals} <= {p.astype(np.int64).tobytes() for p in feasible}


def test_sensitivity_dp_restores_its_measurements(tmp_path):
    oracle = SeparableOracle(len(LAYERS), 8)
    problem = _problem(accuracy_oracle=oracle)
    searcher = make_searcher("sensitivity-dp", problem, top_k=2)
    configs = [searcher.suggest(f"t{i}") for i in range(2)]  # the whole first batch
    searcher.save(str(tmp_path / "sdp.json"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sdp.json"]

    fresh_oracle = SeparableOracle(len(LAYERS), 8)
    restored = make_searcher("sensitivity-dp", _problem(accuracy_oracle=fresh_oracle))
    restored.restore(str(tmp_path / "sdp.json"))
    assert restored.top_k == 2
    assert restored.suggest("t1") == configs[1]  # pending across the checkpoint
    assert [restored.suggest(f"n{i}") for i in range(3)] == [searcher.suggest(f"n{i}") for i in range(3)]
    assert fresh_oracle.calls == 0


def test_sensitivity_dp_max_proposals_and_exhaustion():
    problem = _problem(min_bits=7, max_bits=8, budget=Budget("latency_ms", 0.95, relative=True),
                       accuracy_oracle=SeparableOracle(len(LAYERS), 8))
    searcher = make_searcher("sensitivity-dp", problem, max_proposals=3)
    assert [searcher.suggest(f"t{i}") != Searcher.FINISHED for i in range(4)] == [True, True, True, False]
    # No budget: every combination is feasible; the pruned ones (dominated) are never proposed.
    problem = _problem(min_bits=7, max_bits=8, budget=None, accuracy_oracle=SeparableOracle(len(LAYERS), 8))
    searcher = make_searcher("sensitivity-dp", problem, top_k=2)
    policies = []
    while (config := searcher.suggest(f"t{len(policies)}")) != Searcher.FINISHED:
        policies.append(_policy(problem, config))
    assert 2 <= len(policies) <= 2 ** 6 and len({p.tobytes() for p in policies}) == len(policies)
    assert np.all(policies[0] == 8)  # predicted lossless


def test_sensitivity_dp_without_oracle_uses_the_proxy():
    problem = _problem()
    searcher = make_searcher("sensitivity-dp", problem)
    pol = _policy(problem, searcher.suggest("t0"))
    assert searcher.sensitivity_source == "proxy" and searcher.oracle_calls == 0
    assert policy_cost(problem.table, pol, "latency_ms") <= problem.budget.limit_for(problem.table)
    assert searcher.top_k == 10  # min(num_trials=12, 10)


def test_mckp_solutions_enumerates_in_exact_order():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(4, 3))
    values[1, 2] = -np.inf  # forbidden
    costs = rng.uniform(0, 1, size=(4, 3))
    limit, resolution = 2.0, 1000
    bins = np.ceil(costs * (resolution / limit))  # the rounded problem both solvers solve
    rows = np.arange(4)
    brute = sorted((values[rows, c].sum() for c in itertools.product(range(3), repeat=4)
                    if np.isfinite(values[rows, c].sum()) and bins[rows, c].sum() <= resolution), reverse=True)
    got = list(mckp_solutions(values, costs, limit, resolution=resolution))
    assert len({c.tobytes() for _, c in got}) == len(got)  # distinct
    assert np.allclose([v for v, _ in got], brute)  # all of them, best first
    assert all(np.isclose(values[rows, c].sum(), v) for v, c in got)
    top = solve_mckp(values, costs, limit, top_k=5, resolution=resolution)
    assert np.allclose([values[rows, c].sum() for c in top], brute[:5])


# ---- the Pareto front --------------------------------------------------------------------


def test_pareto_front_hand_example():
    rows = [
        {"trial_id": "a", M.VAL_ACC: 0.90, M.LATENCY_MS: 3.0},
        {"trial_id": "b", M.VAL_ACC: 0.80, M.LATENCY_MS: 1.0},
        {"trial_id": "c", M.VAL_ACC: 0.85, M.LATENCY_MS: 3.0},  # dominated by a (same cost)
        {"trial_id": "d", M.VAL_ACC: 0.80, M.LATENCY_MS: 2.0},  # dominated by b (same acc)
        {"trial_id": "e", M.VAL_ACC: 0.95, M.LATENCY_MS: 5.0},
        {"trial_id": "f", M.VAL_ACC: 0.80, M.LATENCY_MS: 1.0},  # duplicate of b: kept once
        {"trial_id": "g", M.VAL_ACC: None, M.LATENCY_MS: 0.1},  # no result
    ]
    front = pareto_front(rows)
    assert [r["trial_id"] for r in front] == ["b", "a", "e"]
    assert pareto_front(rows, cost_key=M.ENERGY_MJ) == []


def test_pareto_front_matches_brute_force():
    rng = np.random.default_rng(0)
    rows = [{"trial_id": str(i), M.VAL_ACC: float(rng.integers(0, 20)) / 20,
             M.ENERGY_MJ: float(rng.integers(0, 20))} for i in range(200)]
    front = {r["trial_id"] for r in pareto_front(rows, cost_key=M.ENERGY_MJ)}

    def dominated(r):
        return any(o[M.VAL_ACC] >= r[M.VAL_ACC] and o[M.ENERGY_MJ] <= r[M.ENERGY_MJ]
                   and (o[M.VAL_ACC] > r[M.VAL_ACC] or o[M.ENERGY_MJ] < r[M.ENERGY_MJ]) for o in rows)

    undominated = [r for r in rows if not dominated(r)]
    points = {(r[M.VAL_ACC], r[M.ENERGY_MJ]) for r in undominated}
    assert len(front) == len(points)  # one row per non-dominated point
    assert {(r[M.VAL_ACC], r[M.ENERGY_MJ]) for r in rows if r["trial_id"] in front} == points


# ---- end to end --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("searcher", "budget", "expected_trials"), [
    ("uniform", "latency=0.6", 7),  # 7 uniform policies (8/8 .. 2/2): FINISHED ends the search early
    ("nsga2", "none", 8),
    # sensitivity-dp runs through the CLI in tests/test_cluster.py (its measurement on
    # worker nodes, max_concurrent trials at once, every trial in MLflow).
])
def test_search_through_the_cli(tmp_path, searcher, budget, expected_trials):
    from e2e import run_cli, runs_of

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    # Small on purpose (2 shared cores): what is checked is the searcher's path through the CLI.
    (tmp_path / "small.yaml").write_text("reference: {epochs: 3}\nfinetune: {epochs: 1}\ntest_top_k: 1\nfinal_finetune: null\n")
    proc = run_cli(["search", "small.yaml", "--searcher", searcher, "--num-trials", 12 if searcher == "uniform" else 8,
                    "--hardware", "bismo-cloud", "--budget", budget, "--tracking-uri", uri], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parents, children = runs_of(uri)
    assert len(parents) == 1 and parents[0].data.tags["haqtune.searcher"] == searcher
    assert len(children) == expected_trials
    assert all(c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for c in children)
    (search_dir,) = [p for p in (tmp_path / "haqtune_runs").iterdir() if not p.name.startswith("_")]
    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["num_trials"] == expected_trials
    if searcher == "nsga2":
        front = summary["pareto_front"]
        assert front and "Pareto front" in proc.stdout
        costs = [r[M.LATENCY_MS] for r in front]
        accs = [r[M.VAL_ACC] for r in front]
        assert costs == sorted(costs) and accs == sorted(accs)
    else:
        assert "pareto_front" not in summary
        limit = 0.6 * summary["uniform_8bit"][M.LATENCY_MS]
        assert all(c.data.metrics[M.LATENCY_MS] <= limit for c in children)
        # The uniform searcher's widest trial that stayed uniform (the budget projection
        # lowers wider ones unevenly) is the summary's uniform baseline inside the budget.
        kept = [c.data.params["policy"] for c in children if len(set(c.data.params["policy"].split())) == 1]
        widest = max(kept, key=lambda policy: int(policy.split("/")[0]))
        assert summary["uniform_in_budget"]["policy"] == widest and widest != " ".join(["8/8"] * 12)


def test_registry_lists_every_baseline():
    from click.testing import CliRunner

    from orchestrator.cli import main

    out = CliRunner().invoke(main, ["searchers"]).output
    for name in (*NEW_SEARCHERS, "tpe", "random"):
        line = next(line for line in out.splitlines() if line.split()[0] == name)
        assert ("multi" if name == "nsga2" else "single") in line.split()[1]
    assert "1+2L(max-min)" in out
