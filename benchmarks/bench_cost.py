"""Cost-model benchmark: evaluate() throughput, table build time, uniform-bit costs.

Run from the repository root:

    .venv/bin/python benchmarks/bench_cost.py [--policies N] [--loop-policies N]

Prints (as markdown, for benchmarks/RESULTS.md):

1. policies/second for MobileNetV2 (224x224, bismo-edge table): vectorized
   ``CostTable.evaluate`` on uint8 and int64 policies vs a per-layer Python loop over
   the same table, measured in this one run, single-threaded, and their ratio;
2. table build time of each model for MobileNetV2 and ResNet-18;
3. latency_ms / energy_mj of uniform 8/6/4/2/1-bit policies on each model, and per
   layer kind the share of 8-bit latency and how it scales with w and a.
"""

from __future__ import annotations

import os

# Single thread for every timing (BLAS, OpenMP, torch), set before numpy/torch load.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from hardware import CostTable, extract_layers, get_cost_model  # noqa: E402
from trainables.models import build_model  # noqa: E402

NETWORKS = ("mobilenet_v2", "resnet18")
MODELS = ("bismo-edge", "bismo-cloud", "bitfusion")
UNIFORM_BITS = (8, 6, 4, 2, 1)
IMAGENET_CLASSES = 1000
INPUT_SIZE = 224


def layers_of(name: str):
    built = build_model(name, num_classes=IMAGENET_CLASSES, input_size=INPUT_SIZE)
    return extract_layers(built.model, built.input_shape)


def best_time(fn, repeats: int) -> float:
    """Fastest of ``repeats`` runs, wall seconds (the least disturbed by other processes)."""
    return best_times(fn, repeats)[0]


def best_times(fn, repeats: int) -> tuple[float, float]:
    """Fastest wall time and fastest CPU time of this process over ``repeats`` runs.

    On a shared machine the CPU time is what one core delivers when it runs us; the
    wall time also counts the moments the core was running someone else.
    """
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return min(walls), min(cpus)


def loop_evaluate(table: CostTable, policies: np.ndarray) -> np.ndarray:
    """The baseline: for each policy, a Python loop over layers indexing the same table."""
    latency_ms = (table.latency_s * 1e3).tolist()
    energy_mj = (table.energy_j * 1e3).tolist()
    mb_per_bit = (table.weights / 8 / 2**20).tolist()
    out = np.empty((len(policies), 3))
    for i, policy in enumerate(policies.tolist()):
        lat = en = size = 0.0
        for layer, (w, a) in enumerate(policy):
            lat += latency_ms[layer][w - 1][a - 1]
            en += energy_mj[layer][w - 1][a - 1]
            size += mb_per_bit[layer] * w
        out[i] = lat, en, size
    return out


def throughput(specs, n_vector: int, n_loop: int, repeats: int) -> None:
    table = get_cost_model("bismo-edge").table(specs)
    rng = np.random.default_rng(0)
    policies = rng.integers(1, 9, (n_vector, len(specs), 2), dtype=np.uint8)
    policies64 = policies.astype(np.int64)
    table.evaluate(policies[:10])  # first call builds the pair tables
    rebuild = best_time(lambda: CostTable(table.latency_s, table.energy_j, table.weights)
                        .evaluate(policies[:1]), repeats)
    vec8 = n_vector / np.array(best_times(lambda: table.evaluate(policies), repeats))
    vec64 = n_vector / np.array(best_times(lambda: table.evaluate(policies64), repeats))
    loop = n_loop / np.array(best_times(lambda: loop_evaluate(table, policies[:n_loop]), repeats))
    costs = table.evaluate(policies[:n_loop])
    reference = loop_evaluate(table, policies[:n_loop])
    max_rel = np.max(np.abs(np.stack([costs.latency_ms, costs.energy_mj, costs.size_mb], 1)
                            - reference) / reference)
    print(f"## evaluate() throughput: MobileNetV2 ({len(specs)} layers, 224x224), bismo-edge table\n")
    print("| method | policies/s (wall) | policies/s (CPU time) | vs loop (wall) |")
    print("|---|---:|---:|---:|")
    rows = [(f"`CostTable.evaluate`, uint8 policies ({n_vector:,})", vec8),
            (f"`CostTable.evaluate`, int64 policies ({n_vector:,})", vec64),
            (f"per-layer Python loop over the same table ({n_loop:,})", loop)]
    for label, (wall, cpu) in rows:
        print(f"| {label} | {wall:,.0f} | {cpu:,.0f} | {wall / loop[0]:.0f}x |")
    print(f"\nmax relative difference evaluate vs loop: {max_rel:.1e} (float32 sums); "
          f"evaluate's one-off pair-table setup: {rebuild * 1e3:.2f} ms\n")


def build_times(all_specs: dict, repeats: int) -> None:
    print("## Table build time (`model.table(layers)`, best of "
          f"{repeats}; L x 8 x 8 latency and energy)\n")
    print("| model | " + " | ".join(f"{n} ({len(s)} layers)" for n, s in all_specs.items()) + " |")
    print("|---|" + "---:|" * len(all_specs))
    for model_name in MODELS:
        model = get_cost_model(model_name)
        cells = [f"{best_time(lambda s=s, m=model: m.table(s), repeats) * 1e3:.2f} ms"
                 for s in all_specs.values()]
        print(f"| {model_name} | " + " | ".join(cells) + " |")
    print()


def uniform_costs(all_specs: dict) -> None:
    for net, specs in all_specs.items():
        print(f"## {net}: uniform policies (latency_ms / energy_mj per batch)\n")
        print("| model | batch | " + " | ".join(f"{b}/{b}" for b in UNIFORM_BITS) + " |")
        print("|---|---:|" + "---:|" * len(UNIFORM_BITS))
        for model_name in MODELS:
            table = get_cost_model(model_name).table(specs)
            costs = table.evaluate(np.stack([table.uniform(b) for b in UNIFORM_BITS]))
            cells = [f"{lat:.2f} / {en:.2f}" for lat, en in zip(costs.latency_ms, costs.energy_mj, strict=True)]
            print(f"| {model_name} | {table.batch} | " + " | ".join(cells) + " |")
        print()
        print(f"### {net}: by layer kind (share of 8/8 latency; latency relative to 8/8)\n")
        print("| model | kind | layers | share | w=4,a=8 | w=8,a=4 | 4/4 | 2/2 |")
        print("|---|---|---:|---:|---:|---:|---:|---:|")
        kinds = np.array([s.kind for s in specs])
        for model_name in MODELS:
            lat = get_cost_model(model_name).table(specs).latency_s
            total = lat[:, 7, 7].sum()
            for kind in ("conv", "depthwise", "linear"):
                mask = kinds == kind
                if not mask.any():
                    continue
                part = lat[mask].sum(axis=0)
                base = part[7, 7]
                print(f"| {model_name} | {kind} | {mask.sum()} | {base / total:.0%} | "
                      f"{part[3, 7] / base:.2f} | {part[7, 3] / base:.2f} | {part[3, 3] / base:.2f} | "
                      f"{part[1, 1] / base:.2f} |")
        print()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policies", type=int, default=400_000, help="policies for evaluate()")
    parser.add_argument("--loop-policies", type=int, default=20_000, help="policies for the loop")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(1)
    all_specs = {net: layers_of(net) for net in NETWORKS}
    print(f"numpy {np.__version__}, torch {torch.__version__}, one thread\n")
    throughput(all_specs["mobilenet_v2"], args.policies, args.loop_policies, args.repeats)
    build_times(all_specs, args.repeats)
    uniform_costs(all_specs)


if __name__ == "__main__":
    main()
