import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hardware import BITS, CostTable
from search_spaces import (
    Budget,
    InfeasibleBudgetError,
    bitwidth_space,
    config_from_policy,
    format_policy,
    parse_policy,
    policy_cost,
    policy_from_config,
    project,
)


def synthetic_table(num_layers: int, seed: int = 0) -> CostTable:
    rng = np.random.default_rng(seed)
    macs = rng.uniform(1e5, 1e7, num_layers)[:, None, None]
    w, a = BITS[None, :, None], BITS[None, None, :]
    mem = rng.uniform(1e3, 1e5, num_layers)[:, None, None]
    latency = macs * w * a * 1e-12 + mem * (w + a) * 1e-10
    return CostTable(latency, latency * 2.0, rng.integers(100, 10_000, num_layers))


@pytest.mark.parametrize(("text", "metric", "limit", "relative"), [
    ("latency=0.5", "latency_ms", 0.5, True),
    ("latency_ms=12.5", "latency_ms", 12.5, False),
    ("energy=0.3", "energy_mj", 0.3, True),
    ("energy_mj=2", "energy_mj", 2.0, False),
    ("size=0.5", "size_mb", 0.5, True),
    ("size_mb=1.0", "size_mb", 1.0, False),
])
def test_budget_parse(text, metric, limit, relative):
    b = Budget.parse(text)
    assert (b.metric, b.limit, b.relative) == (metric, limit, relative)
    assert Budget.parse(str(b)) == b


@pytest.mark.parametrize("text", ["latency", "speed=0.5", "latency=abc", "size=0", "size=-1", "latency=1.5"])
def test_budget_parse_errors(text):
    with pytest.raises(ValueError, match="budget"):
        Budget.parse(text)


def test_relative_size_budget_is_exact():
    table = synthetic_table(6)
    budget = Budget.parse("size=0.5")
    size8 = policy_cost(table, table.uniform(8), "size_mb")
    assert budget.limit_for(table) == pytest.approx(0.5 * size8)
    pol = project(table.uniform(8), table, budget)
    assert policy_cost(table, pol, "size_mb") <= 0.5 * size8
    # Uniform 4-bit weights is exactly half the 8-bit size: already inside, unchanged.
    four = table.uniform(4, 8)
    assert np.array_equal(project(four, table, budget), four)


@settings(max_examples=60, deadline=None)
@given(
    num_layers=st.integers(1, 10),
    seed=st.integers(0, 1000),
    frac=st.floats(0.05, 1.0),
    metric=st.sampled_from(["latency", "energy", "size"]),
    min_bits=st.integers(1, 3),
)
def test_project_properties(num_layers, seed, frac, metric, min_bits):
    table = synthetic_table(num_layers, seed)
    rng = np.random.default_rng(seed)
    policy = rng.integers(1, 9, (num_layers, 2))
    budget = Budget.parse(f"{metric}={frac}")
    metric_name = budget.metric
    floor = table.evaluate(table.uniform(min_bits)).metric(metric_name)[0]
    limit = budget.limit_for(table)
    if floor > limit:
        with pytest.raises(InfeasibleBudgetError, match="infeasible"):
            project(policy, table, budget, min_bits=min_bits)
        return
    out = project(policy, table, budget, min_bits=min_bits)
    clipped = np.clip(policy, min_bits, 8)
    assert out.shape == policy.shape
    assert np.all(out >= min_bits) and np.all(out <= clipped)  # only lowers bits
    assert policy_cost(table, out, metric_name) <= limit  # exact, as trials report it
    assert table.evaluate(out).metric(metric_name)[0] <= limit * (1 + 1e-6)  # float32 fast path
    # Idempotent: a projected policy is inside the budget and stays as it is.
    assert np.array_equal(project(out, table, budget, min_bits=min_bits), out)
    if policy_cost(table, clipped, metric_name) <= limit:
        assert np.array_equal(out, clipped)


def test_project_lowers_last_layer_activations_first():
    table = synthetic_table(4)
    full = table.evaluate(table.uniform(8)).latency_ms[0]
    # A budget barely under 8-bit: one step on the last layer's activations suffices.
    out = project(table.uniform(8), table, Budget("latency_ms", full * 0.999))
    assert out[:-1].tolist() == [[8, 8]] * 3
    assert out[-1].tolist() in ([8, 7], [7, 7])


def test_project_without_budget_clips():
    table = synthetic_table(3)
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        project([[9, 1], [5, 5], [1, 8]], table, None)
    out = project([[8, 1], [5, 5], [1, 8]], table, None, min_bits=2, max_bits=6)
    assert out.tolist() == [[6, 2], [5, 5], [2, 6]]


def test_policy_encoding_roundtrip():
    pol = np.array([[8, 4], [2, 3], [1, 1]])
    cfg = config_from_policy(pol)
    assert list(cfg) == ["w_0", "a_0", "w_1", "a_1", "w_2", "a_2"]
    assert np.array_equal(policy_from_config(cfg, 3), pol)
    assert np.array_equal(parse_policy(format_policy(pol)), pol)
    space = bitwidth_space(3, min_bits=2, max_bits=6)
    assert set(space) == set(cfg)
    assert space["w_0"].lower == 2 and space["w_0"].upper == 7  # tune.randint: upper exclusive


def test_cost_table_validation():
    with pytest.raises(ValueError, match=r"latency_s: expected shape \[2, 8, 8\]"):
        CostTable(np.zeros((2, 8, 7)), np.zeros((2, 8, 8)), [1, 2])
    table = synthetic_table(2)
    with pytest.raises(ValueError, match=r"expected shape \[N, 2, 2\]"):
        table.evaluate(np.ones((3, 3, 2), dtype=int))
    with pytest.raises(ValueError, match=r"bits must be in \[1, 8\]"):
        table.evaluate(np.full((2, 2), 9))


def _project_one_bit_at_a_time(policy, table, budget, min_bits):
    """HAQ's rule written as a plain loop: the reference ``project`` must equal."""
    from search_spaces import policy_cost as cost_of

    pol = np.clip(np.asarray(policy), min_bits, 8).astype(np.int64)
    limit = budget.limit_for(table)
    while cost_of(table, pol, budget.metric) > limit:
        for layer in range(table.num_layers - 1, -1, -1):
            for col in (1, 0):
                if pol[layer, col] > min_bits:
                    pol[layer, col] -= 1
                    if cost_of(table, pol, budget.metric) <= limit:
                        return pol
        if np.all(pol == min_bits):
            return pol
    return pol


@settings(max_examples=80, deadline=None)
@given(num_layers=st.integers(1, 12), seed=st.integers(0, 10_000), frac=st.floats(0.05, 1.0),
       metric=st.sampled_from(["latency", "energy", "size"]), min_bits=st.integers(1, 3))
def test_project_equals_the_one_bit_at_a_time_rule(num_layers, seed, frac, metric, min_bits):
    table = synthetic_table(num_layers, seed)
    policy = np.random.default_rng(seed + 1).integers(1, 9, (num_layers, 2))
    budget = Budget.parse(f"{metric}={frac}")
    try:
        fast = project(policy, table, budget, min_bits=min_bits)
    except InfeasibleBudgetError:
        return
    assert np.array_equal(fast, _project_one_bit_at_a_time(policy, table, budget, min_bits))
