"""solve_mckp against brute force, and the SurrogateObjective built on it."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware import BITS, CostTable, LayerSpec
from search_spaces import Budget, SurrogateObjective, parse_policy, policy_cost, project, solve_mckp


def brute_force(values: np.ndarray, costs: np.ndarray, limit: float) -> list[tuple[float, tuple]]:
    """Every feasible choice as (total value, choice), best first."""
    num_rows, num_options = values.shape
    out = []
    for choice in itertools.product(range(num_options), repeat=num_rows):
        rows = np.arange(num_rows)
        if costs[rows, choice].sum() <= limit:
            total = values[rows, choice].sum()
            if total > -np.inf:
                out.append((float(total), choice))
    return sorted(out, key=lambda item: -item[0])


def total(values, choice) -> float:
    return float(values[np.arange(values.shape[0]), choice].sum())


instances = st.tuples(
    st.integers(1, 4),  # rows
    st.integers(1, 4),  # options
    st.integers(0, 2**32 - 1),  # seed
    st.floats(0.2, 1.2),  # limit as a fraction of the largest total cost
    st.integers(1, 4),  # top_k
)


@settings(max_examples=60, deadline=None)
@given(instances, st.sampled_from([7, 50, 1000]))
def test_mckp_feasible_sorted_and_within_the_error_bound(instance, resolution):
    rows, options, seed, frac, top_k = instance
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(rows, options))
    costs = rng.uniform(0.0, 1.0, size=(rows, options))
    limit = frac * costs.max(axis=1).sum() + 1e-6
    choices = solve_mckp(values, costs, limit, top_k=top_k, resolution=resolution)
    assert choices.shape[1] == rows and choices.shape[0] <= top_k
    exact = brute_force(values, costs, limit)
    totals = [total(values, c) for c in choices]
    assert totals == sorted(totals, reverse=True)
    assert len({tuple(c) for c in choices}) == len(choices)  # distinct solutions
    for c in choices:  # feasible for the exact costs
        assert costs[np.arange(rows), c].sum() <= limit
    # Error bound: at least as good as the exact optimum under limit * (1 - L / resolution),
    # and never better than the exact optimum under the true limit.
    tighter = brute_force(values, costs, limit * (1 - rows / resolution))
    for rank in range(min(top_k, len(tighter))):
        assert totals[rank] >= tighter[rank][0] - 1e-9
    for rank, value in enumerate(totals):
        assert value <= exact[rank][0] + 1e-9


@settings(max_examples=60, deadline=None)
@given(instances)
def test_mckp_is_exact_on_integer_costs(instance):
    rows, options, seed, frac, top_k = instance
    rng = np.random.default_rng(seed)
    values = np.round(rng.normal(size=(rows, options)), 3)
    costs = rng.integers(0, 10, size=(rows, options)).astype(float)
    limit = float(max(1, int(frac * costs.max(axis=1).sum())))
    # One bin per cost unit: no rounding at all.
    choices = solve_mckp(values, costs, limit, top_k=top_k, resolution=int(limit))
    exact = brute_force(values, costs, limit)
    assert [total(values, c) for c in choices] == pytest.approx([v for v, _ in exact[:top_k]])


def test_mckp_forbidden_options_and_infeasible():
    values = np.array([[1.0, -np.inf], [0.0, 2.0]])
    costs = np.array([[1.0, 0.0], [1.0, 5.0]])
    assert solve_mckp(values, costs, 2.0).tolist() == [[0, 0]]
    assert solve_mckp(values, costs, 6.5).tolist() == [[0, 1]]
    # Costs round UP: an exactly tight solution may be lost (never an infeasible one found).
    assert solve_mckp(values, costs, 6.0, resolution=10_000).tolist() == [[0, 0]]
    assert solve_mckp(values, costs, 1.5).shape == (0, 2)  # nothing fits


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"values": np.zeros((2, 3)), "costs": np.zeros((2, 2))}, "costs: expected the shape"),
    ({"values": np.zeros((0, 3)), "costs": np.zeros((0, 3))}, "values: expected"),
    ({"values": np.full((1, 2), np.nan), "costs": np.zeros((1, 2))}, "values: expected finite"),
    ({"values": np.zeros((1, 2)), "costs": -np.ones((1, 2))}, "costs: expected finite non-negative"),
    ({"limit": 0.0}, "limit: expected a positive"),
    ({"top_k": 0}, "top_k: expected an integer >= 1"),
    ({"resolution": 0}, "resolution: expected an integer >= 1"),
])
def test_mckp_validation(kwargs, match):
    args = {"values": np.zeros((2, 2)), "costs": np.ones((2, 2)), "limit": 2.0}
    args.update(kwargs)
    values, costs, limit = args.pop("values"), args.pop("costs"), args.pop("limit")
    with pytest.raises(ValueError, match=match):
        solve_mckp(values, costs, limit, **args)


# ---- SurrogateObjective ---------------------------------------------------------------------


def _layers(num_layers: int) -> list[LayerSpec]:
    out = []
    for i in range(num_layers):
        depthwise = i % 3 == 1
        ch = 16 * (1 + i // 3)
        groups = ch if depthwise else 1
        out.append(LayerSpec(f"l{i}", "depthwise" if depthwise else "conv", ch, ch, (3, 3), (1, 1),
                             groups, (8, 8), (8, 8), ch * (ch // groups) * 9, 64 * ch * (ch // groups) * 9))
    return out


def _table(layers, seed=0) -> CostTable:
    rng = np.random.default_rng(seed)
    macs = np.array([s.macs for s in layers], float)[:, None, None] * rng.uniform(0.5, 2.0, (len(layers), 1, 1))
    latency = macs * BITS[None, :, None] * BITS[None, None, :] * 1e-12 + 1e-7 * BITS[None, None, :]
    return CostTable(latency, latency, np.array([s.weights for s in layers]))


def test_surrogate_optimum_matches_brute_force_on_a_tiny_network():
    layers = _layers(2)
    sur = SurrogateObjective(layers, _table(layers), Budget("latency_ms", 0.4, relative=True), seed=1)
    policy, acc = sur.optimum(resolution=20_000)
    grid = np.array(list(itertools.product(BITS, repeat=4))).reshape(-1, 2, 2)
    limit = sur.budget.limit_for(sur.table)
    feasible = sur.table.evaluate(grid).latency_ms <= limit * (1 - 1e-7)
    best = sur.accuracy(grid[feasible]).max()
    assert acc == pytest.approx(best, abs=1e-6)
    assert acc <= sur.optimum_upper_bound(resolution=20_000) + 1e-12
    assert policy_cost(sur.table, policy, "latency_ms") <= limit


def test_surrogate_scores_the_projected_policy():
    layers = _layers(9)
    sur = SurrogateObjective(layers, _table(layers), seed=0, ref_acc=0.7, drop_at_4bit=0.03)
    assert sur.accuracy(sur.table.uniform(4))[0] == pytest.approx(0.67)
    assert sur.accuracy(sur.table.uniform(8))[0] > sur.accuracy(sur.table.uniform(4))[0]
    eight = sur.table.uniform(8)
    projected = project(eight, sur.table, sur.budget)
    assert sur.value(eight) == pytest.approx(sur.accuracy(projected)[0])
    result = sur.result(eight)
    assert np.array_equal(parse_policy(result["policy"]), projected)
    assert result["reward"] == pytest.approx(0.1 * (result["val_acc"] - result["ref_acc"]))
    assert result["latency_ms"] <= sur.budget.limit_for(sur.table)
    policy, acc = sur.optimum()
    assert acc >= sur.value(eight) and acc <= sur.optimum_upper_bound()
    # Seeded: same seed, same penalties; another seed, others.
    assert np.array_equal(SurrogateObjective(layers, sur.table, seed=0).penalty,
                          SurrogateObjective(layers, sur.table, seed=0).penalty)
    assert not np.array_equal(sur.penalty, SurrogateObjective(layers, sur.table, seed=1).penalty)


# ---- neighbouring-layer interactions ----------------------------------------------------------


def test_chain_dp_matches_brute_force():
    from search_spaces.knapsack import chain_dp

    rng = np.random.default_rng(3)
    rows, options, capacity = 4, 3, 9
    values = rng.normal(size=(rows, options))
    values[1, 2] = -np.inf  # a forbidden option is never chosen
    pairs = rng.normal(size=(rows - 1, options, options))
    bins = rng.integers(0, 5, (rows, options))
    choice, total = chain_dp(values, pairs, bins, capacity)
    best, best_choice = -np.inf, None
    for combo in itertools.product(range(options), repeat=rows):
        if sum(bins[r, c] for r, c in enumerate(combo)) > capacity:
            continue
        v = sum(values[r, c] for r, c in enumerate(combo))
        v += sum(pairs[r, combo[r], combo[r + 1]] for r in range(rows - 1))
        if v > best:
            best, best_choice = v, combo
    assert total == pytest.approx(best)
    assert tuple(choice) == best_choice
    assert chain_dp(values, pairs, bins + 10, capacity)[1] == -np.inf  # nothing fits
    with pytest.raises(ValueError, match=r"pair_values: expected shape \[3, 3, 3\]"):
        chain_dp(values, pairs[:2], bins, capacity)


def test_pairwise_surrogate_is_not_separable_and_its_optimum_is_exact():
    layers = _layers(3)
    budget = Budget("latency_ms", 0.4, relative=True)
    sur = SurrogateObjective(layers, _table(layers), budget, seed=1, interaction=0.5,
                             drop_at_4bit=0.05)
    assert sur.accuracy(sur.table.uniform(4))[0] == pytest.approx(sur.ref_acc - 0.05)
    # Lowering two neighbours together costs more than the sum of lowering each alone.
    high = sur.table.uniform(8)
    one, other, both = high.copy(), high.copy(), high.copy()
    one[0], other[1], both[:2] = 2, 2, 2
    drop = sur.ref_acc - sur.accuracy(np.stack([high, one, other, both]))
    assert drop[3] - drop[0] > (drop[1] - drop[0]) + (drop[2] - drop[0]) + 1e-6
    # The one-layer probe sees no pair term: what an additive sensitivity model measures.
    assert sur.single_layer_accuracy(0, 2, 2) == pytest.approx(sur.ref_acc - sur.penalty[0, 1, 1])
    # The chain DP's optimum against brute force over all 64^3 policies.
    policy, acc = sur.optimum(resolution=20_000)
    grid = np.array(list(itertools.product(BITS, repeat=6))).reshape(-1, 3, 2)
    limit = budget.limit_for(sur.table)
    feasible = sur.table.evaluate(grid).latency_ms <= limit * (1 - 1e-7)
    assert acc == pytest.approx(sur.accuracy(grid[feasible]).max(), abs=1e-6)
    assert acc <= sur.optimum_upper_bound(resolution=20_000) + 1e-12
    assert policy_cost(sur.table, policy, "latency_ms") <= limit
    with pytest.raises(ValueError, match=r"interaction: expected a fraction in \[0, 1\), got 1.0"):
        SurrogateObjective(layers, sur.table, interaction=1.0)
