"""Hardware budgets and the one place they are enforced: ``project``."""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import numpy as np

from hardware import BYTES_PER_MB, MAX_BITS, MIN_BITS, NUM_BITS, CostTable

from ._allowed import AllowedBits

BUDGET_METRICS = ("latency_ms", "energy_mj", "size_mb")
# Relative budgets are written with the metric's bare name: ``latency=0.5``.
_RELATIVE_NAMES = {m.split("_")[0]: m for m in BUDGET_METRICS}


class InfeasibleBudgetError(ValueError):
    """Even the cheapest allowed policy (every layer at its lowest allowed widths) is over the budget."""


@dataclass(frozen=True)
class Budget:
    """A limit on one cost metric: absolute (``latency_ms=12.5``) or a fraction of 8/8-bit.

    ``relative=True`` means ``limit`` is a fraction of the uniform 8-bit policy's cost.
    """

    metric: str
    limit: float
    relative: bool = False

    def __post_init__(self) -> None:
        if self.metric not in BUDGET_METRICS:
            raise ValueError(
                f"budget metric: choose between {', '.join(BUDGET_METRICS)}, got {self.metric!r}"
            )
        if not np.isfinite(self.limit) or self.limit <= 0:
            raise ValueError(f"budget limit: expected a positive number, got {self.limit}")

    @classmethod
    def parse(cls, text: str) -> Budget:
        """Parse ``latency=0.5`` (relative) or ``latency_ms=12`` (absolute), likewise energy/size."""
        key, sep, value = str(text).partition("=")
        key = key.strip()
        forms = [*_RELATIVE_NAMES, *BUDGET_METRICS]
        if not sep or key not in forms:
            raise ValueError(
                f"budget {text!r}: expected NAME=VALUE with NAME one of {', '.join(forms)} "
                "(e.g. latency=0.5 for half the 8-bit latency, size_mb=1.0 for an absolute limit)"
            )
        try:
            limit = float(value)
        except ValueError:
            raise ValueError(f"budget {text!r}: expected a number after '=', got {value!r}") from None
        relative = key in _RELATIVE_NAMES
        if relative and limit > 1:
            raise ValueError(
                f"budget {text!r}: a relative budget is a fraction of the 8-bit cost, expected (0, 1]"
            )
        return cls(_RELATIVE_NAMES.get(key, key), limit, relative)

    def __str__(self) -> str:
        if self.relative:
            return f"{self.metric.split('_')[0]}={self.limit:g}"
        return f"{self.metric}={self.limit:g}"

    def limit_for(self, table: CostTable) -> float:
        """The absolute limit in the metric's unit for this cost table."""
        if not self.relative:
            return float(self.limit)
        return float(self.limit * policy_cost(table, table.uniform(MAX_BITS), self.metric))


_METRIC_COLUMN = {m: i for i, m in enumerate(BUDGET_METRICS)}


def policy_cost(table: CostTable, policy, metric: str) -> float:
    """Exact (float64) cost of one policy: the same sum trials report."""
    return float(table.layer_costs(policy)[_METRIC_COLUMN[metric]].sum())


def widest_uniform(table: CostTable, budget: Budget, allowed: AllowedBits) -> tuple[int, int] | None:
    """The widest uniform (w, a) of the space (``AllowedBits.uniform_pairs``) whose own
    cost is inside the budget, not projected; None when none is. The fixed-bit baseline a
    mixed-precision policy under this budget has to beat."""
    limit = budget.limit_for(table)
    for pair in allowed.uniform_pairs():
        if policy_cost(table, allowed.uniform(*pair), budget.metric) <= limit:
            return pair
    return None


def _layer_metric(table: CostTable, metric: str) -> np.ndarray:
    """Per-layer cost of ``metric`` at every (w, a): shape [L, 8, 8], in the metric's unit."""
    if metric == "latency_ms":
        return table.latency_s * 1e3
    if metric == "energy_mj":
        return table.energy_j * 1e3
    size = table.weights[:, None, None] * np.arange(MIN_BITS, MAX_BITS + 1)[None, :, None]
    return np.broadcast_to(size / 8.0 / BYTES_PER_MB, (table.num_layers, NUM_BITS, NUM_BITS))


# (limit, per-layer cost grid) per (table, budget, allowed bits): searchers project every
# suggestion, and recomputing these each time doubled the cost of a HAQ suggestion.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(table: CostTable, budget: Budget, allowed: AllowedBits) -> tuple[float, np.ndarray]:
    plans = _PLANS.setdefault(table, {})
    key = (budget, allowed)
    if key not in plans:
        plans[key] = (check_feasible(table, budget, allowed=allowed), _layer_metric(table, budget.metric))
    return plans[key]


def check_feasible(table: CostTable, budget: Budget, *, allowed: AllowedBits | None = None,
                   min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> float:
    """Return the absolute limit; raise ``InfeasibleBudgetError`` if no allowed policy meets it.

    The cheapest allowed policy has every layer at its lowest allowed widths (costs
    never rise when bits fall), so a fixed layer is priced at its fixed widths.
    ``allowed`` (or, for short, ``min_bits``/``max_bits`` for every layer) is the space.
    """
    allowed = AllowedBits.resolve(table.num_layers, allowed, min_bits, max_bits)
    limit = budget.limit_for(table)
    floor = policy_cost(table, allowed.lowest, budget.metric)
    if floor > limit:
        raise InfeasibleBudgetError(
            f"budget {budget} is infeasible: it allows {budget.metric}={limit:.6g}, but even "
            f"every layer at its lowest allowed bits costs {floor:.6g} (allowed: {allowed.describe()})"
        )
    return limit


def project(
    policy,
    table: CostTable,
    budget: Budget | None,
    *,
    allowed: AllowedBits | None = None,
    min_bits: int = MIN_BITS,
    max_bits: int = MAX_BITS,
) -> np.ndarray:
    """The policy every searcher's suggestion becomes: allowed widths, then inside the budget.

    ``allowed`` is each layer's set of widths (``min_bits``/``max_bits``: the same range
    for every layer). First every width becomes the largest allowed one <= it (the
    layer's lowest if none is: a clip for a range; a fixed layer gets its width).
    Then HAQ's rule: while over budget, sweep the layers from the last to the first
    and, per layer, lower the activation bits one step, then the weight bits one step
    (a step = to the next lower allowed width; a layer at its lowest, e.g. a fixed
    one, is skipped), stopping as soon as the cost is within the limit. Later layers
    go first because they are usually the widest and least sensitive.
    Raises ``InfeasibleBudgetError`` if even the cheapest allowed policy is over budget.
    """
    allowed = AllowedBits.resolve(table.num_layers, allowed, min_bits, max_bits)
    pol = allowed.snap(policy)
    if budget is None:
        return pol
    limit, per_layer = _plan(table, budget, allowed)
    down = allowed.step_down
    cost = policy_cost(table, pol, budget.metric)
    num_layers = table.num_layers
    rows = np.arange(num_layers)
    # A sweep visits 2L positions: layer L-1's activations, its weights, layer L-2's ... .
    a_pos = 2 * (num_layers - 1 - rows)
    near_limit = limit * (1 + 1e-9)
    start = 0  # position the current sweep goes on from
    while cost > limit:
        # One sweep at once: every step's cost change follows from the bits before it
        # (a layer's weight step sees its lowered activations), so a cumulative sum
        # gives the cost after each step and the first step inside the budget is a
        # lookup: HAQ's one-bit-at-a-time rule without a Python step per bit.
        w, a = pol[:, 0], pol[:, 1]
        a_step, w_step = down[rows, 1, a], down[rows, 0, w]
        take_a = (a_pos >= start) & (a_step < a)
        take_w = (a_pos + 1 >= start) & (w_step < w)
        a1 = np.where(take_a, a_step, a)
        w1 = np.where(take_w, w_step, w)
        before = per_layer[rows, w - MIN_BITS, a - MIN_BITS]
        after_a = per_layer[rows, w - MIN_BITS, a1 - MIN_BITS]
        after_w = per_layer[rows, w1 - MIN_BITS, a1 - MIN_BITS]
        delta = np.empty(2 * num_layers)
        delta[a_pos], delta[a_pos + 1] = after_a - before, after_w - after_a
        taken = np.empty(2 * num_layers, dtype=bool)
        taken[a_pos], taken[a_pos + 1] = take_a, take_w
        running = cost + np.cumsum(delta[start:])
        hits = np.flatnonzero((running <= near_limit) & taken[start:])
        last = start + int(hits[0]) if hits.size else 2 * num_layers - 1
        pol[:, 1] = np.where(take_a & (a_pos <= last), a1, a)
        pol[:, 0] = np.where(take_w & (a_pos + 1 <= last), w1, w)
        # The exact sum (what trials report) decides, so float drift never leaves a
        # projected policy over budget.
        cost = policy_cost(table, pol, budget.metric)
        if cost <= limit:
            return pol
        start = last + 1
        if start == 2 * num_layers:
            if np.array_equal(pol, allowed.lowest):
                return pol
            start = 0
    return pol
