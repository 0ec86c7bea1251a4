"""Multiple-choice knapsack (MCKP) by dynamic programming over discretized cost.

A bitwidth policy under a budget is a multiple-choice knapsack: each layer picks
exactly one option (a (w, a) pair, or a weight bitwidth, ...) with a value (e.g.
minus its accuracy drop) and a cost (its latency, energy or size), and the summed
cost must stay within the budget. ``solve_mckp`` returns the ``top_k`` best
choices exactly, up to the cost discretization described below.

Discretization. The limit is cut into ``resolution`` equal bins of
``unit = limit / resolution``; every cost is rounded UP to a whole number of
bins. Hence:

- every returned solution is feasible for the *exact* costs (rounding up can only
  overestimate a sum), so the solver never proposes an over-budget policy;
- each of the L costs is overestimated by less than one bin, so any solution whose
  exact cost is at most ``limit * (1 - L / resolution)`` is still found. The best
  returned value is therefore at least the exact optimum under that slightly
  tighter limit: with ``resolution >> L`` the loss is negligible
  (``resolution=10_000`` and L = 53 layers: within a 0.53% tighter budget).

Rounding DOWN instead gives a relaxation whose optimum is an upper bound on the
exact one (used by ``SurrogateObjective`` to bracket its optimum).

Cost: ``O(L * K * resolution * top_k)`` time, vectorized over the cost axis with
numpy (one array operation per layer and option), and ``O(L * resolution *
top_k)`` memory for the back-pointers.
"""

from __future__ import annotations

import numpy as np

DEFAULT_RESOLUTION = 10_000


def _check_problem(values, costs, limit: float, top_k: int, resolution: int):
    values = np.asarray(values, dtype=np.float64)
    costs = np.asarray(costs, dtype=np.float64)
    if values.ndim != 2 or values.shape[0] == 0 or values.shape[1] == 0:
        raise ValueError(
            f"values: expected a non-empty [L, K] array, got shape {list(values.shape)}"
        )
    if costs.shape != values.shape:
        raise ValueError(
            f"costs: expected the shape of values {list(values.shape)}, got {list(costs.shape)}"
        )
    if np.any(np.isnan(values)) or np.any(values == np.inf):
        raise ValueError("values: expected finite numbers (or -inf for a forbidden option)")
    if not np.all(np.isfinite(costs)) or np.any(costs < 0):
        raise ValueError("costs: expected finite non-negative numbers")
    if not np.isfinite(limit) or limit <= 0:
        raise ValueError(f"limit: expected a positive number, got {limit}")
    if isinstance(top_k, bool) or int(top_k) != top_k or top_k < 1:
        raise ValueError(f"top_k: expected an integer >= 1, got {top_k}")
    if isinstance(resolution, bool) or int(resolution) != resolution or resolution < 1:
        raise ValueError(f"resolution: expected an integer >= 1, got {resolution}")
    return values, costs


def solve_mckp(
    values,
    costs,
    limit: float,
    *,
    top_k: int = 1,
    resolution: int = DEFAULT_RESOLUTION,
) -> np.ndarray:
    """The ``top_k`` best choices of one option per row under a total-cost limit.

    Args:
        values: ``[L, K]`` value of option ``k`` for row (layer) ``l``; ``-inf``
            forbids an option.
        costs: ``[L, K]`` non-negative cost of each option, same unit as ``limit``.
        limit: the largest allowed sum of the chosen costs.
        top_k: how many distinct solutions to return.
        resolution: number of cost bins the limit is cut into (see the module
            docstring for the error bound).

    Returns:
        ``[k, L]`` int64 option indices, one row per solution, sorted by total
        value (descending); ``k <= top_k`` (fewer if fewer feasible solutions
        exist, ``[0, L]`` if none is feasible after rounding costs up).
    """
    values, costs = _check_problem(values, costs, limit, top_k, resolution)
    # Rounding up keeps every solution feasible (to float precision, ~1e-16 relative).
    bins = np.ceil(costs * (resolution / limit)).astype(np.int64)
    choices, _ = mckp_dp(values, bins, int(resolution), int(top_k))
    return choices


def _undominated(values: np.ndarray, bins: np.ndarray, capacity: int) -> list[int]:
    """Options of one row not dominated by a cheaper-or-equal, better-or-equal one.

    Only the best solution is wanted when this is used: a dominated option can always
    be swapped for its dominator without losing value or feasibility.
    """
    order = np.lexsort((np.arange(len(values)), -values, bins))  # cost asc, value desc, index
    keep, best_value = [], -np.inf
    for opt in order:
        if bins[opt] <= capacity and values[opt] > best_value:
            keep.append(int(opt))
            best_value = values[opt]
    return sorted(keep)


def mckp_dp(
    values: np.ndarray, bins: np.ndarray, capacity: int, top_k: int
) -> tuple[np.ndarray, np.ndarray]:
    """The DP on integer costs: ``(choices [k, L], totals [k])`` with sum(bins) <= capacity.

    ``best[c, r]`` is the r-th best total value of the rows seen so far with total
    cost <= c. Row ``l`` option ``j`` shifts that table by ``bins[l, j]`` cells and adds
    its value; the new table keeps the ``top_k`` best of all shifted candidates per
    cell. Candidates of one option are distinct solutions, and candidates of two
    options differ in row ``l``, so the kept solutions are always distinct.
    """
    num_rows, num_options = values.shape
    cells = capacity + 1
    best = np.full((cells, top_k), -np.inf)
    best[:, 0] = 0.0  # no rows yet: one (empty) solution of value 0 at every capacity
    # Back-pointers per row: which option, and which rank of the previous table.
    chosen = np.zeros((num_rows, cells, top_k), dtype=np.int32)
    from_rank = np.zeros((num_rows, cells, top_k), dtype=np.int32)
    rank_ids = np.broadcast_to(np.arange(top_k, dtype=np.int32), (cells, top_k))
    for row in range(num_rows):
        new = np.full((cells, top_k), -np.inf)
        new_opt = np.zeros((cells, top_k), dtype=np.int32)
        new_rank = np.zeros((cells, top_k), dtype=np.int32)
        options = _undominated(values[row], bins[row], capacity) if top_k == 1 else range(num_options)
        for opt in options:
            shift, value = int(bins[row, opt]), values[row, opt]
            if shift > capacity or value == -np.inf:
                continue
            if top_k == 1:
                cand = best[: cells - shift, 0] + value
                better = cand > new[shift:, 0]  # strict: ties keep the earlier option
                np.copyto(new[shift:, 0], cand, where=better)
                np.copyto(new_opt[shift:, 0], opt, where=better)
                continue
            cand = np.full((cells, top_k), -np.inf)
            cand[shift:] = best[: cells - shift] + value
            # Merge two descending lists per cell and keep the top_k (stable: ties
            # keep earlier options first).
            merged = np.concatenate([new, cand], axis=1)
            order = np.argsort(-merged, axis=1, kind="stable")[:, :top_k]
            opt_ids = np.concatenate([new_opt, np.full((cells, top_k), opt, np.int32)], axis=1)
            ranks = np.concatenate([new_rank, rank_ids], axis=1)
            new = np.take_along_axis(merged, order, axis=1)
            new_opt = np.take_along_axis(opt_ids, order, axis=1)
            new_rank = np.take_along_axis(ranks, order, axis=1)
        best, chosen[row], from_rank[row] = new, new_opt, new_rank
    totals = best[capacity]
    found = np.flatnonzero(totals > -np.inf)
    choices = np.zeros((found.size, num_rows), dtype=np.int64)
    for out, rank in enumerate(found):
        cell, r = capacity, int(rank)
        for row in range(num_rows - 1, -1, -1):
            opt = int(chosen[row, cell, r])
            choices[out, row] = opt
            r = int(from_rank[row, cell, r])
            cell -= int(bins[row, opt])
    return choices, totals[found]


def chain_dp(
    values: np.ndarray, pair_values: np.ndarray, bins: np.ndarray, capacity: int
) -> tuple[np.ndarray, float]:
    """The best choice per row when neighbouring rows interact: ``(choice [L], total)``.

    Maximizes ``sum_l values[l, c_l] + sum_l pair_values[l, c_l, c_{l+1}]`` subject to
    ``sum_l bins[l, c_l] <= capacity`` (integer costs, as ``mckp_dp`` after rounding).
    A chain-structured knapsack: the DP state is (this row's option, total cost so far),
    ``best[c, b]`` the best value of rows ``0..l`` with row ``l`` at option ``c`` and total
    cost <= ``b``; row ``l + 1`` option ``c'`` shifts row ``l``'s table by its cost, adds
    the pair value from every ``c`` and keeps the best. ``O(L * K^2 * capacity)`` time,
    ``O(L * K * capacity)`` back-pointers. ``-inf`` forbids an option; returns
    ``(empty, -inf)`` when nothing fits.
    """
    num_rows, num_options = values.shape
    if pair_values.shape != (max(num_rows - 1, 0), num_options, num_options):
        raise ValueError(
            f"pair_values: expected shape [{num_rows - 1}, {num_options}, {num_options}], "
            f"got {list(pair_values.shape)}"
        )
    cells = capacity + 1
    best = np.full((num_options, cells), -np.inf)
    for opt in range(num_options):
        shift = int(bins[0, opt])
        if shift <= capacity and values[0, opt] > -np.inf:
            best[opt, shift:] = values[0, opt]
    back = np.zeros((num_rows, num_options, cells), dtype=np.int16)
    for row in range(1, num_rows):
        new = np.full((num_options, cells), -np.inf)
        for opt in range(num_options):
            shift, value = int(bins[row, opt]), values[row, opt]
            if shift > capacity or value == -np.inf:
                continue
            cand = best[:, : cells - shift] + pair_values[row - 1, :, opt, None]  # [K, cells - shift]
            arg = np.argmax(cand, axis=0)
            new[opt, shift:] = cand[arg, np.arange(cells - shift)] + value
            back[row, opt, shift:] = arg
        best = new
    last = int(np.argmax(best[:, capacity]))
    total = float(best[last, capacity])
    if total == -np.inf:
        return np.zeros(0, dtype=np.int64), total
    choice = np.zeros(num_rows, dtype=np.int64)
    choice[-1], cell = last, capacity
    for row in range(num_rows - 1, 0, -1):
        prev = int(back[row, choice[row], cell])
        cell -= int(bins[row, choice[row]])
        choice[row - 1] = prev
    return choice, total
