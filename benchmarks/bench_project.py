"""Budget projection benchmark: ``project`` per MobileNetV2 policy, with and without bit sets.

Run from the repository root:

    .venv/bin/python benchmarks/bench_project.py [--policies N] [--repeats R]

Projects N random near-8/8 policies (bits 6-8: what a trained HAQ agent proposes,
the expensive case, ~450 single-width steps each) of MobileNetV2 (224x224,
bismo-edge table) into ``latency=0.5``, single-threaded, and prints the best of R
runs as time per policy, wall and CPU: over the full range 1-8 and, where this
checkout has ``AllowedBits``, over ``bits: {w: [2, 4, 8], a: [2, 4, 8]}`` with
``fix_first_last``. Meant to compare checkouts on the same machine state.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402

from hardware import extract_layers, get_cost_model  # noqa: E402
from search_spaces import Budget, project  # noqa: E402
from trainables.models import build_model  # noqa: E402


def timed(fn, repeats: int) -> tuple[float, float]:
    """Best (wall, CPU) seconds of ``repeats`` calls."""
    best_wall = best_cpu = float("inf")
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best_wall = min(best_wall, time.perf_counter() - wall)
        best_cpu = min(best_cpu, time.process_time() - cpu)
    return best_wall, best_cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()

    built = build_model("mobilenet_v2", num_classes=1000)
    layers = extract_layers(built.model, built.input_shape)
    table = get_cost_model("bismo-edge").table(layers)
    budget = Budget.parse("latency=0.5")
    policies = np.random.default_rng(0).integers(6, 9, (args.policies, len(layers), 2))
    cases = {"range 1-8": {}}
    try:
        from search_spaces import AllowedBits
    except ImportError:  # a checkout from before bit sets
        AllowedBits = None
    if AllowedBits is not None:
        allowed = AllowedBits.build(len(layers), w_bits=[2, 4, 8], a_bits=[2, 4, 8], fix_first_last=True)
        cases["bits {2,4,8} + fix_first_last"] = {"allowed": allowed}
    print("| space | project ms/policy (wall) | ms/policy (CPU) |\n|---|---:|---:|")
    for label, kwargs in cases.items():
        project(policies[0], table, budget, **kwargs)  # warm the per-table plan cache

        def run(kwargs=kwargs):
            for pol in policies:
                project(pol, table, budget, **kwargs)

        wall, cpu = timed(run, args.repeats)
        print(f"| {label} | {1e3 * wall / args.policies:.3f} | {1e3 * cpu / args.policies:.3f} |")


if __name__ == "__main__":
    main()
