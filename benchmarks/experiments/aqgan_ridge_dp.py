"""Issue 15 exploration: can an exact knapsack over the ridge predictor reach the design
points ``generate`` does not cover (bench_aqgan's surrogate: bitfusion energy=0.5 and
bismo-cloud latency=0.4, whose feasible bits the history never used)?

    .venv/bin/python benchmarks/experiments/aqgan_ridge_dp.py

The ridge is additive in the bits (``RidgePredictor.one_hot_weights``), so its best
policy under any budget is a multiple-choice knapsack over each layer's (w, a) pairs
(``search_spaces.solve_mckp``, as ``sensitivity-dp`` solves it). Per seed: the 40-trial
aqgan history of ``bench_aqgan.py --part surrogate``, then, per design point, the
surrogate accuracy of the DP's top 16 and of ``generate``'s 20 policies at the p50
target. Results: RESULTS.md, AQGAN, surrogate cost per design point.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_aqgan as B  # noqa: E402

import hardware  # noqa: E402
from hardware import MIN_BITS, NUM_BITS  # noqa: E402
from orchestrator.searchers import SearchProblem  # noqa: E402
from orchestrator.searchers.aqgan import generate_policies  # noqa: E402
from orchestrator.searchers.sensitivity_dp import _LIMIT_SLACK, pair_costs, prune_dominated  # noqa: E402
from search_spaces import Budget, solve_mckp  # noqa: E402

DESIGN_POINTS = (("bitfusion", "energy=0.5"), ("bismo-cloud", "latency=0.4"), ("bismo-edge", "latency=0.5"))
TOP_K = 16


def ridge_dp(model, problem: SearchProblem, top_k: int = TOP_K) -> np.ndarray:
    """The ``top_k`` policies ``[k, L, 2]`` the ridge predicts best under ``problem``'s budget."""
    weights, _bias = model.predictor.one_hot_weights()
    num_layers = problem.num_layers
    per_entry = np.full((num_layers, 2, NUM_BITS), -np.inf)
    per_entry[:, :, model.min_bits - MIN_BITS: model.max_bits - MIN_BITS + 1] = (
        weights.numpy().astype(np.float64).reshape(num_layers, 2, model.num_choices))
    mask = problem.allowed.mask
    values = per_entry[:, 0, :, None] + per_entry[:, 1, None, :]
    values = np.where(mask[:, 0, :, None] & mask[:, 1, None, :], values, -np.inf).reshape(num_layers, -1)
    costs = pair_costs(problem, problem.budget.metric)
    limit = problem.budget.limit_for(problem.table) * (1 - _LIMIT_SLACK)
    choices = solve_mckp(prune_dominated(values, costs), costs, limit, top_k=top_k)
    return np.stack([choices // NUM_BITS + MIN_BITS, choices % NUM_BITS + MIN_BITS], axis=-1)


def main() -> None:
    torch.set_num_threads(1)
    layers = B.layers_of("mobilenet_v2", 224)
    table_a = hardware.get_cost_model("bismo-cloud").table(layers)
    budget = Budget("latency_ms", 0.5, relative=True)
    for seed in (0, 1, 2):
        *_, searcher, (hist_p, hist_a) = B.surrogate_history(layers, table_a, budget, seed)
        target = float(np.percentile(hist_a, 50))
        for hw, text in DESIGN_POINTS:
            budget_b = Budget.parse(text)
            table_b = hardware.get_cost_model(hw).table(layers)
            sur_b, problem_b, _ = B.surrogate_problem(layers, table_b, budget_b, seed)
            t0 = time.perf_counter()
            dp = [float(sur_b.accuracy(sur_b.project(p))[0]) for p in ridge_dp(searcher.model, problem_b)]
            dp_s = time.perf_counter() - t0
            rows = generate_policies(searcher.model, problem_b, target, B.PER_TARGET,
                                     measured=(np.stack(hist_p), np.array(hist_a)))
            gen = [float(sur_b.accuracy(r["policy"])[0]) for r in rows]
            print(f"seed {seed} {hw} {text}: optimum {sur_b.optimum()[1]:.4f}, p50 target {target:.4f}; "
                  f"ridge DP best of {TOP_K} {max(dp):.4f} ({dp_s:.1f} s); generate best of "
                  f"{B.PER_TARGET} {max(gen):.4f}", flush=True)


if __name__ == "__main__":
    main()
