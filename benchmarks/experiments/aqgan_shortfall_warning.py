"""Issue 15: does ``haqtune generate``'s shortfall warning (no policy under the budget
predicted within ``SHORTFALL_WARN`` of the target) flag the design points it cannot reach?

    .venv/bin/python benchmarks/experiments/aqgan_shortfall_warning.py

bench_aqgan's surrogate protocol (seeds 0-2, a 40-trial aqgan history on bismo-cloud
latency=0.5, its six new design points, targets p50 and p90 of the history): per point,
the best predicted val_acc of ``generate``'s 20 policies, whether the warning fires, and
whether any of them reaches the target (val_acc >= target - 0.5 point). Results:
RESULTS.md, AQGAN, surrogate cost per design point.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import bench_aqgan as B  # noqa: E402

import hardware  # noqa: E402
from orchestrator.generate_cli import SHORTFALL_WARN  # noqa: E402
from orchestrator.searchers.aqgan import generate_policies  # noqa: E402
from search_spaces import Budget  # noqa: E402


def main() -> None:
    torch.set_num_threads(1)
    layers = B.layers_of("mobilenet_v2", 224)
    table_a = hardware.get_cost_model("bismo-cloud").table(layers)
    budget = Budget("latency_ms", 0.5, relative=True)
    agree = total = 0
    print("| seed | design point | target | best predicted | warns | reached |")
    print("|---:|---|---:|---:|---|---|")
    for seed in (0, 1, 2):
        *_, searcher, (hist_p, hist_a) = B.surrogate_history(layers, table_a, budget, seed)
        measured = (np.stack(hist_p), np.array(hist_a))
        for hw, text in B.SURROGATE_DESIGN_BUDGETS:
            budget_b = Budget.parse(text)
            table_b = hardware.get_cost_model(hw).table(layers)
            sur_b, problem_b, _ = B.surrogate_problem(layers, table_b, budget_b, seed)
            for q in (50, 90):
                target = float(np.percentile(hist_a, q))
                rows = generate_policies(searcher.model, problem_b, target, B.PER_TARGET, measured=measured)
                best = max(r["predicted"] for r in rows)
                warns = best < target - SHORTFALL_WARN
                reached = any(float(sur_b.accuracy(r["policy"])[0]) >= target - B.REACH_TOL for r in rows)
                agree += warns != reached
                total += 1
                print(f"| {seed} | {hw} {text}, p{q} | {target:.4f} | {best:.4f} | {'yes' if warns else 'no'} | "
                      f"{'yes' if reached else 'no'} |", flush=True)
    print(f"\nwarning fired exactly where generate did not reach the target: {agree} of {total} design points")


if __name__ == "__main__":
    main()
