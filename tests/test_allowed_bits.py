"""Per-layer allowed bit widths (``AllowedBits``) and the projection that honors them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_budget import synthetic_table

from search_spaces import (
    AllowedBits,
    Budget,
    InfeasibleBudgetError,
    bitwidth_space,
    check_feasible,
    policy_cost,
    project,
    widest_uniform,
)

BITS = list(range(1, 9))


def test_build_bit_sets_and_fixed_first_last():
    allowed = AllowedBits.build(4, w_bits=[8, 2, 4, 4], a_bits=[4, 8], fix_first_last=True)
    assert allowed.w == ((8,), (2, 4, 8), (2, 4, 8), (8,))  # sorted, duplicates dropped
    assert allowed.a == ((8,), (4, 8), (4, 8), (8,))
    assert allowed.fixed.tolist() == [True, False, False, True]
    assert allowed.lowest.tolist() == [[8, 8], [2, 4], [2, 4], [8, 8]]
    assert allowed.highest.tolist() == [[8, 8]] * 4
    assert allowed.mask.shape == (4, 2, 8) and allowed.mask[1, 0].tolist() == [
        False, True, False, True, False, False, False, True]
    assert allowed.describe() == "w 8 a 8 (layers 0, 3); w 2,4,8 a 4,8 (layers 1, 2)"
    assert AllowedBits.from_state(allowed.to_state()) == allowed
    assert hash(AllowedBits.from_state(allowed.to_state())) == hash(allowed)
    # Fixed layers take the highest allowed width: 8 unless the range or the sets exclude it.
    assert AllowedBits.build(3, max_bits=6, fix_first_last=True).w[0] == (6,)
    assert AllowedBits.build(1, w_bits=[2, 4], fix_first_last=True).w == ((4,),)  # one layer: first = last


def test_full_range_is_shared_and_equals_the_build_default():
    assert AllowedBits.full(5, 2, 7) is AllowedBits.full(5, 2, 7)
    assert AllowedBits.full(5, 2, 7) == AllowedBits.build(5, min_bits=2, max_bits=7)
    assert AllowedBits.full(5, 2, 7).describe() == "w 2-7 a 2-7"


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"w_bits": [9]}, r"bits.w: expected bit widths in \[1, 8\], got 9"),
    ({"a_bits": [0, 4]}, r"bits.a: expected bit widths in \[1, 8\], got 0"),
    ({"w_bits": []}, "bits.w: expected at least one bit width"),
    ({"w_bits": 4}, "bits.w: expected a list"),
    ({"w_bits": [True]}, "expected integer bit widths"),
    ({"w_bits": [1, 4], "min_bits": 2}, r"bits.w: expected bit widths in \[2, 8\], got 1"),
    ({"max_bits": 9}, "max_bits <= 8"),
])
def test_build_rejects_bad_sets(kwargs, message):
    with pytest.raises(ValueError, match=message):
        AllowedBits.build(3, **kwargs)


def test_resolve_refuses_both_forms_and_other_layer_counts():
    allowed = AllowedBits.build(3, w_bits=[4, 8])
    with pytest.raises(ValueError, match="either allowed bits or min_bits/max_bits"):
        AllowedBits.resolve(3, allowed, min_bits=2)
    with pytest.raises(ValueError, match="expected 4 layers, got 3"):
        AllowedBits.resolve(4, allowed)


def test_snap_and_step_down():
    allowed = AllowedBits.build(3, w_bits=[2, 4, 8], a_bits=[4, 8], fix_first_last=True)
    policy = [[3, 1], [1, 7], [5, 5]]
    # Largest allowed <= the width, else the lowest; fixed layers get their width.
    assert allowed.snap(policy).tolist() == [[8, 8], [2, 4], [8, 8]]
    assert allowed.step_down[1, 0, [2, 4, 8]].tolist() == [2, 2, 4]  # 2 has no lower: stays
    assert allowed.step_down[1, 1, [4, 8]].tolist() == [4, 4]
    assert allowed.step_down[0, :, 8].tolist() == [8, 8]  # fixed: never lowered
    assert allowed.contains([[8, 8], [4, 8], [8, 8]])
    assert not allowed.contains([[8, 8], [3, 8], [8, 8]]) and not allowed.contains([[4, 8]] * 3)


@settings(max_examples=60, deadline=None)
@given(lo=st.integers(1, 8), span=st.integers(0, 7), bits=st.lists(st.integers(1, 8), min_size=2, max_size=2))
def test_snap_of_a_range_is_a_clip(lo, span, bits):
    hi = min(lo + span, 8)
    allowed = AllowedBits.full(1, lo, hi)
    assert allowed.snap([bits]).tolist() == [np.clip(bits, lo, hi).tolist()]


def test_common_widths_skip_fixed_layers():
    allowed = AllowedBits.build(4, w_bits=[2, 4], a_bits=[4, 6], fix_first_last=True)
    assert allowed.common() == ((2, 4), (4, 6))
    assert AllowedBits.build(1, fix_first_last=True).common() == ((8,), (8,))  # every layer fixed


def test_uniform_pairs_and_policies():
    allowed = AllowedBits.build(4, w_bits=[4, 8], a_bits=[8], fix_first_last=True)
    assert allowed.uniform_pairs() == [(8, 8), (4, 8)]  # w 4,8 a 8: k = 8, then k = 4 (a stays 8)
    assert allowed.uniform(4, 8).tolist() == [[8, 8], [4, 8], [4, 8], [8, 8]]  # fixed layers keep 8/8
    assert AllowedBits.full(3, 2, 5).uniform_pairs() == [(5, 5), (4, 4), (3, 3), (2, 2)]
    # Nothing common to the searched layers (layer 0 takes only 2-bit weights, layer 1 only 8).
    assert AllowedBits(((2,), (8,)), ((8,), (8,))).uniform_pairs() == []


# The widest uniform policy inside a budget, by brute force over the space's uniform pairs
# (k/k per common width k, snapped: ``test_uniform_pairs_and_policies``).
@settings(max_examples=80, deadline=None)
@given(data=st.data(), num_layers=st.integers(1, 8), seed=st.integers(0, 10_000), frac=st.floats(0.02, 1.0),
       metric=st.sampled_from(["latency", "energy", "size"]))
def test_widest_uniform_is_inside_and_nothing_wider_is(data, num_layers, seed, frac, metric):
    table = synthetic_table(num_layers, seed)
    allowed = data.draw(allowed_bits(num_layers))
    budget = Budget.parse(f"{metric}={frac}")
    limit = budget.limit_for(table)
    fits = {(w, a) for w, a in allowed.uniform_pairs()
            if policy_cost(table, allowed.uniform(w, a), budget.metric) <= limit}
    pair = widest_uniform(table, budget, allowed)
    if pair is None:  # nothing fits, not even the narrowest uniform policy
        assert not fits
        return
    assert pair in fits
    # No uniform policy that is at least as wide in both and wider in one fits.
    assert not [(w, a) for w, a in fits if w >= pair[0] and a >= pair[1] and (w, a) != pair]


def test_widest_uniform_under_a_tight_budget():
    table = synthetic_table(5, 3)
    allowed = AllowedBits.full(5, 2, 8)
    costs = {k: policy_cost(table, table.uniform(k), "latency_ms") for k in range(2, 9)}
    # Just above uniform 3/3's latency: 3/3 fits, 4/4 does not.
    budget = Budget("latency_ms", costs[3] * (1 + 1e-9))
    assert widest_uniform(table, budget, allowed) == (3, 3)
    assert widest_uniform(table, Budget("latency_ms", costs[2] * 0.99), allowed) is None


# ---- projection ---------------------------------------------------------------------------


@st.composite
def allowed_bits(draw, num_layers: int):
    sets = st.lists(st.sampled_from(BITS), min_size=1, max_size=8, unique=True)
    return AllowedBits.build(num_layers, w_bits=draw(sets), a_bits=draw(sets),
                             fix_first_last=draw(st.booleans()))


def _project_one_step_at_a_time(policy, table, budget, allowed):
    """HAQ's rule as a plain loop over allowed widths: ``project`` must equal it."""
    pol = allowed.snap(policy)
    limit = budget.limit_for(table)
    while policy_cost(table, pol, budget.metric) > limit:
        for layer in range(table.num_layers - 1, -1, -1):
            for col, widths in ((1, allowed.a[layer]), (0, allowed.w[layer])):
                lower = [b for b in widths if b < pol[layer, col]]
                if lower:
                    pol[layer, col] = lower[-1]
                    if policy_cost(table, pol, budget.metric) <= limit:
                        return pol
        if np.array_equal(pol, allowed.lowest):
            return pol
    return pol


@settings(max_examples=80, deadline=None)
@given(data=st.data(), num_layers=st.integers(1, 10), seed=st.integers(0, 10_000), frac=st.floats(0.05, 1.0),
       metric=st.sampled_from(["latency", "energy", "size"]))
def test_project_walks_down_only_through_allowed_widths(data, num_layers, seed, frac, metric):
    table = synthetic_table(num_layers, seed)
    allowed = data.draw(allowed_bits(num_layers))
    policy = np.random.default_rng(seed + 1).integers(1, 9, (num_layers, 2))
    budget = Budget.parse(f"{metric}={frac}")
    limit = budget.limit_for(table)
    if policy_cost(table, allowed.lowest, budget.metric) > limit:
        with pytest.raises(InfeasibleBudgetError, match="lowest allowed"):
            project(policy, table, budget, allowed=allowed)
        return
    out = project(policy, table, budget, allowed=allowed)
    assert allowed.contains(out)
    assert np.all(out <= allowed.snap(policy))  # only lowers
    assert np.array_equal(out[allowed.fixed], allowed.lowest[allowed.fixed])  # fixed layers untouched
    assert policy_cost(table, out, budget.metric) <= limit
    assert np.array_equal(project(out, table, budget, allowed=allowed), out)  # idempotent
    assert np.array_equal(out, _project_one_step_at_a_time(policy, table, budget, allowed))


def test_fixed_layers_make_a_budget_infeasible_before_anything_runs():
    table = synthetic_table(4, seed=3)
    free, fixed = AllowedBits.full(4), AllowedBits.build(4, fix_first_last=True)
    cheapest = policy_cost(table, free.lowest, "latency_ms")
    with_fixed = policy_cost(table, fixed.lowest, "latency_ms")
    budget = Budget("latency_ms", (cheapest + with_fixed) / 2)  # between the two floors
    assert check_feasible(table, budget, allowed=free) == budget.limit
    with pytest.raises(InfeasibleBudgetError, match=r"w 8 a 8 \(layers 0, 3\)"):
        check_feasible(table, budget, allowed=fixed)
    # The relative budget stays relative to uniform 8/8, whatever is fixed.
    assert Budget.parse("latency=0.5").limit_for(table) == pytest.approx(
        0.5 * policy_cost(table, table.uniform(8), "latency_ms"))


def test_bitwidth_space_exposes_only_allowed_widths():
    from ray.tune.search.sample import Categorical, Integer

    allowed = AllowedBits.build(3, w_bits=[2, 4, 8], a_bits=[5, 6, 7], fix_first_last=True)
    space = bitwidth_space(3, allowed=allowed)
    # Fixed layers are constants at their highest allowed width (7: the a set excludes 8).
    assert (space["w_0"], space["a_0"], space["w_2"], space["a_2"]) == (8, 7, 8, 7)
    assert isinstance(space["w_1"], Categorical) and space["w_1"].categories == [2, 4, 8]
    assert isinstance(space["a_1"], Integer) and (space["a_1"].lower, space["a_1"].upper) == (5, 8)
    draws = {space["w_1"].sample() for _ in range(50)} | {space["a_1"].sample() for _ in range(50)}
    assert draws <= {2, 4, 8, 5, 6, 7}
