"""The searcher contract, run against every registered searcher.

A new searcher module that registers itself is covered automatically. Each
suggestion is a valid config (every ``w_i``/``a_i`` key, ints among the layer's
allowed widths ``problem.allowed``: [min_bits, max_bits], or a search's bit sets
with fixed first/last layers), ``None`` or ``Searcher.FINISHED``; failed or empty completions and
unknown trial ids never crash; several trials can be in flight; save -> restore
into a fresh searcher continues (with the same next suggestion for a searcher that
is deterministic for a fixed seed).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from ray.tune.search import Searcher

from hardware import BITS, CostTable, LayerSpec
from orchestrator.searchers import SearchProblem, list_searchers, make_searcher
from search_spaces import AllowedBits, Budget, format_policy, policy_cost, policy_from_config
from search_spaces import metrics as M

MIN_BITS, MAX_BITS = 2, 7  # not the full range: a searcher must respect the bounds
IN_FLIGHT = 4
SEARCHERS = sorted(list_searchers())


def _spec(name, kind, cin, cout, k, stride, hw, groups=1) -> LayerSpec:
    out_hw = (hw // stride, hw // stride)
    weights = cout * (cin // groups) * k * k
    return LayerSpec(name, kind, cin, cout, (k, k), (stride, stride), groups, (hw, hw), out_hw,
                     weights, out_hw[0] * out_hw[1] * weights)


LAYERS = [
    _spec("stem", "conv", 3, 16, 3, 2, 32),
    _spec("dw1", "depthwise", 16, 16, 3, 1, 16, groups=16),
    _spec("pw1", "conv", 16, 32, 1, 1, 16),
    _spec("dw2", "depthwise", 32, 32, 3, 2, 16, groups=32),
    _spec("pw2", "conv", 32, 64, 1, 1, 8),
    LayerSpec("fc", "linear", 64, 10, (1, 1), (1, 1), 1, (1, 1), (1, 1), 640, 640),
]


def synthetic_table(layers) -> CostTable:
    macs = np.array([s.macs for s in layers], dtype=np.float64)[:, None, None]
    acts = np.array([s.input_elements for s in layers], dtype=np.float64)[:, None, None]
    w, a = BITS[None, :, None], BITS[None, None, :]
    latency_s = macs * w * a * 1e-12 + acts * a * 1e-10
    return CostTable(latency_s, 3.0 * latency_s, np.array([s.weights for s in layers]))


def make_problem(seed: int = 0) -> SearchProblem:
    return SearchProblem(
        layers=LAYERS, table=synthetic_table(LAYERS), budget=Budget("latency_ms", 0.6, relative=True),
        min_bits=MIN_BITS, max_bits=MAX_BITS, seed=seed, num_trials=20,
    )


def fake_result(problem: SearchProblem, config: dict, epoch: int = 1) -> dict:
    """What a trial reports: accuracy of the projected policy, which grows with bits."""
    policy = problem.project(policy_from_config(config, problem.num_layers))
    val_acc = 0.5 + 0.4 * float(policy.mean() - MIN_BITS) / (MAX_BITS - MIN_BITS)
    return {
        M.VAL_ACC: val_acc, M.REF_ACC: 0.9, M.REWARD: 0.1 * (val_acc - 0.9),
        M.POLICY: format_policy(policy), M.EPOCH: epoch, "training_iteration": epoch, M.DONE: 1,
    }


def check_suggestion(problem: SearchProblem, suggestion) -> bool:
    """True if ``suggestion`` is a config; asserts it is valid. False for None/FINISHED."""
    if suggestion is None or suggestion == Searcher.FINISHED:
        return False
    assert isinstance(suggestion, dict)
    assert set(suggestion) == set(problem.keys)
    for key, value in suggestion.items():
        assert isinstance(value, int | np.integer) and not isinstance(value, bool), (key, value)
        assert problem.min_bits <= value <= problem.max_bits, (key, value)
    policy = policy_from_config(suggestion, problem.num_layers)
    assert problem.allowed.contains(policy), (format_policy(policy), problem.allowed.describe())
    return True


def run_trials(searcher, problem, ids) -> list:
    out = []
    for trial_id in ids:
        config = searcher.suggest(trial_id)
        out.append(config)
        if check_suggestion(problem, config):
            searcher.on_trial_result(trial_id, fake_result(problem, config, epoch=1))
            searcher.on_trial_complete(trial_id, fake_result(problem, config, epoch=2))
    return out


@pytest.fixture(params=SEARCHERS)
def name(request) -> str:
    return request.param


def test_suggestions_are_valid_configs(name):
    problem = make_problem()
    searcher = make_searcher(name, problem)
    configs = run_trials(searcher, problem, [f"t{i}" for i in range(8)])
    assert any(c not in (None, Searcher.FINISHED) for c in configs)


def test_failed_and_empty_completions_do_not_crash(name):
    problem = make_problem()
    searcher = make_searcher(name, problem)
    run_trials(searcher, problem, ["warm0", "warm1"])
    outcomes = [
        {"error": True},
        {"result": None},
        {"result": {}},
        {"result": {M.EPOCH: 1, "training_iteration": 1}},  # the metric is missing
        {"result": None, "error": True},
    ]
    for i, kwargs in enumerate(outcomes):
        config = searcher.suggest(f"bad{i}")
        if check_suggestion(problem, config):
            searcher.on_trial_complete(f"bad{i}", **kwargs)
    run_trials(searcher, problem, ["after0", "after1"])


def test_unknown_trial_ids_are_ignored(name):
    problem = make_problem()
    searcher = make_searcher(name, problem)
    (config,) = run_trials(searcher, problem, ["known"])
    result = fake_result(problem, config if isinstance(config, dict) else {
        k: MAX_BITS for k in problem.keys})
    searcher.on_trial_result("never-suggested", result)
    searcher.on_trial_complete("never-suggested", result)
    searcher.on_trial_complete("never-suggested", None, error=True)
    run_trials(searcher, problem, ["next"])


def test_several_trials_in_flight(name):
    problem = make_problem()
    searcher = make_searcher(name, problem)
    ids = [f"t{i}" for i in range(IN_FLIGHT)]
    configs = {i: searcher.suggest(i) for i in ids}
    valid = {i: c for i, c in configs.items() if check_suggestion(problem, c)}
    assert valid, "no suggestion with trials in flight"
    for trial_id in reversed(ids):  # complete out of order
        if trial_id in valid:
            searcher.on_trial_complete(trial_id, fake_result(problem, valid[trial_id]))
    run_trials(searcher, problem, ["after"])


def _is_deterministic(name) -> bool:
    """Two searchers with the same seed make the same first suggestions."""
    runs = []
    for _ in range(2):
        problem = make_problem(seed=3)
        runs.append(run_trials(make_searcher(name, problem), problem, [f"d{i}" for i in range(3)]))
    return runs[0] == runs[1]


def test_save_restore_continues(name, tmp_path):
    problem = make_problem()
    searcher = make_searcher(name, problem)
    run_trials(searcher, problem, [f"t{i}" for i in range(3)])
    pending = searcher.suggest("pending")  # in flight across the checkpoint
    path = str(tmp_path / "searcher.ckpt")
    searcher.save(path)
    assert sorted(os.listdir(tmp_path)) == ["searcher.ckpt"]  # no temp file left behind

    restored = make_searcher(name, make_problem())
    restored.restore(path)
    if check_suggestion(problem, pending):
        restored.on_trial_complete("pending", fake_result(problem, pending))
        searcher.on_trial_complete("pending", fake_result(problem, pending))
    original_next = run_trials(searcher, problem, ["n0", "n1"])
    restored_next = run_trials(restored, problem, ["n0", "n1"])
    # An exhaustible searcher may be done by now; if the original still suggests, so must the copy.
    if any(check_suggestion(problem, c) for c in original_next):
        assert any(check_suggestion(problem, c) for c in restored_next)
    if _is_deterministic(name):
        assert restored_next == original_next


# Bit sets a target supports (issue 16) and HAQ's fixed first/last layers (issue 14): the
# acceptance case {w: [4, 8], a: [8]}, and a set that is neither a range nor evenly spaced.
# Budgets are binding but feasible for the synthetic table.
BIT_SET_CASES = {
    "w4,8-a8-fixed": (dict(w_bits=[4, 8], a_bits=[8], fix_first_last=True), 0.85),
    "w2,5,7-a3,6": (dict(w_bits=[2, 5, 7], a_bits=[3, 6]), 0.5),
}


def bit_set_problem(case: str, seed: int = 0) -> SearchProblem:
    options, budget = BIT_SET_CASES[case]
    return SearchProblem(
        layers=LAYERS, table=synthetic_table(LAYERS), budget=Budget("latency_ms", budget, relative=True),
        allowed=AllowedBits.build(len(LAYERS), **options), seed=seed, num_trials=12,
    )


@pytest.mark.parametrize("case", sorted(BIT_SET_CASES))
def test_bit_sets_are_honored(name, case, tmp_path):
    """Every suggestion, and every policy a trial evaluates, uses only allowed widths;
    fixed layers stay at 8/8; this survives save/restore (the space is part of the state)."""
    problem = bit_set_problem(case)
    searcher = make_searcher(name, problem)
    configs = run_trials(searcher, problem, [f"t{i}" for i in range(6)])
    searcher.save(str(tmp_path / "searcher.ckpt"))
    restored = make_searcher(name, bit_set_problem(case))
    restored.restore(str(tmp_path / "searcher.ckpt"))
    configs += run_trials(restored, problem, [f"r{i}" for i in range(4)])
    suggested = [policy_from_config(c, problem.num_layers) for c in configs if check_suggestion(problem, c)]
    assert suggested
    limit = problem.budget.limit_for(problem.table)
    for policy in suggested:
        evaluated = problem.project(policy)  # what the trial runs
        assert problem.allowed.contains(evaluated)
        assert policy_cost(problem.table, evaluated, "latency_ms") <= limit
        if BIT_SET_CASES[case][0].get("fix_first_last"):
            assert evaluated[0].tolist() == evaluated[-1].tolist() == [8, 8]


def test_set_search_properties_accepts_the_objective(name):
    problem = make_problem()
    searcher = make_searcher(name, problem)
    if hasattr(searcher, "set_search_properties"):
        # Optuna's searcher refuses a second space (it has one): both answers are fine,
        # as long as the searcher still works.
        searcher.set_search_properties(M.VAL_ACC, "max", {})
    run_trials(searcher, problem, ["t0", "t1"])
