"""Searcher benchmarks: per-trial overhead and sample efficiency on the surrogate objective.

    .venv/bin/python benchmarks/bench_searchers.py [--quick] [--searchers haq,tpe,random]
        [--surrogate separable|pairwise|both]

A searcher entry may carry options: ``haq:updates_per_episode=none`` is HAQ's agent at
HAQ's published update rate (one DDPG update per stored transition, 2L per episode,
instead of the default 8), ``haq:updates_per_episode=2`` the fast setting,
``haq:store_actions=evaluated`` the replay of evaluated (projected) bits instead of HAQ's
drawn actions.

Each searcher is driven directly, as Ray Tune would (``suggest(trial_id)`` then
``on_trial_complete(trial_id, result)``), with the ``SurrogateObjective`` as the
trial: MobileNetV2 (torchvision, 224x224, 53 quantizable layers) priced by the
``bismo-cloud`` cost model under a 50% latency budget. Reported:

1. suggest and update (``on_trial_complete``) latency in ms per trial, averaged over
   trials 201-300 of a 300-trial search (one CPU thread);
2. regret = optimum val_acc - best val_acc found, in accuracy percentage points,
   after 50/100/200 trials, mean (and std) over 5 seeds. Seed s seeds both the
   searcher and the surrogate's sensitivities; the optimum is exact up to the
   knapsack discretization (bracketed by ``optimum_upper_bound``).

Searchers that stop on their own (``uniform`` after its 8 policies,
``sensitivity-dp`` only if it runs out of DP solutions) keep their best after they
stop; their overhead is averaged over the trials they ran, and the first
``suggest`` (where ``sensitivity-dp`` measures and solves) is reported separately.
``sensitivity-dp`` gets the surrogate's own one-layer oracle
(``SurrogateOracle``: ref_acc minus that layer's penalty), on which its additive
model is exact for the separable surrogate; its oracle calls are printed.

``--surrogate pairwise`` scores every searcher on the non-separable surrogate
(``interaction=0.5``: half of the 4/4-bit drop comes from neighbouring-layer pairs,
which a one-layer probe never sees), ``both`` runs the two one after the other. ``nsga2`` is scored like everyone on
the budgeted objective (best projected val_acc): its suggestions are projected to
the budget by the trial, so its second objective (latency) is at most the limit.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import optuna
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import hardware  # noqa: E402
from orchestrator.searchers import SearchProblem, make_searcher  # noqa: E402
from search_spaces import Budget, SurrogateObjective  # noqa: E402
from trainables.models import build_model  # noqa: E402

SEARCHERS = ("haq", "tpe", "random", "gp", "cmaes", "qmc", "nsga2", "uniform", "sensitivity-dp")
HARDWARE = "bismo-cloud"
BUDGET = Budget("latency_ms", 0.5, relative=True)
LATENCY_TRIALS = 300
LATENCY_WINDOW = 100  # timings averaged over the last 100 of the 300 trials
CHECKPOINTS = (50, 100, 200)
NUM_SEEDS = 5
PERCENT = 100.0
# Share of the 4/4-bit accuracy drop due to neighbouring-layer pairs, per surrogate variant.
SURROGATES = {"separable": 0.0, "pairwise": 0.5}


def mobilenet_v2_layers() -> list:
    built = build_model("mobilenet_v2", input_size=224)
    return hardware.extract_layers(built.model, built.input_shape)


def cost_table(layers, hardware_name: str) -> tuple[hardware.CostTable, str]:
    """The cost model's table, or (only while it is not registered yet) a synthetic one."""
    if hardware_name in hardware.list_cost_models():
        return hardware.get_cost_model(hardware_name).table(layers), hardware_name
    print(f"WARNING: cost model {hardware_name!r} is not registered; using a synthetic "
          "roofline table (MACs * w * a vs. bytes moved)", file=sys.stderr)
    macs = np.array([s.macs for s in layers], dtype=np.float64)[:, None, None]
    moved = np.array([s.input_elements + s.output_elements for s in layers], float)[:, None, None]
    weights = np.array([s.weights for s in layers], dtype=np.float64)[:, None, None]
    w, a = hardware.BITS[None, :, None], hardware.BITS[None, None, :]
    latency_s = np.maximum(macs * w * a / 64 / 2e11, (weights * w + moved * a) / 8 / 1.6e10)
    return hardware.CostTable(latency_s, latency_s * 5.0, weights[:, 0, 0].astype(np.int64)), "synthetic"


@dataclass
class Run:
    best_so_far: np.ndarray  # [trials] best val_acc after each trial
    suggest_ms: np.ndarray  # [trials] CPU time of suggest
    update_ms: np.ndarray  # [trials] CPU time of on_trial_complete
    suggest_wall_ms: np.ndarray  # [trials] wall-clock time (inflated when the machine is shared)
    update_wall_ms: np.ndarray
    trials_run: int  # < trials when the searcher returned FINISHED
    oracle_calls: int  # sensitivity evaluations (sensitivity-dp)


class SurrogateOracle:
    """``SearchProblem.accuracy_oracle`` of the surrogate: only layer ``layer`` quantized."""

    def __init__(self, surrogate: SurrogateObjective) -> None:
        self.surrogate, self.calls = surrogate, 0

    def __call__(self, layer, w_bits: int, a_bits: int) -> float:
        self.calls += 1
        return self.surrogate.single_layer_accuracy(layer, w_bits, a_bits)


def parse_entry(entry: str) -> tuple[str, dict]:
    """``"haq:updates_per_episode=2,store_actions=evaluated"`` -> ``("haq", {...})``; values
    are ints, floats, ``none`` (None) or (anything else) strings."""
    name, _, rest = entry.partition(":")
    options = {}
    for item in filter(None, rest.split(",")):
        key, _, value = item.partition("=")
        if value.lower() in ("none", "null"):
            options[key] = None
            continue
        for kind in (int, float, str):
            try:
                options[key] = kind(value)
                break
            except ValueError:
                continue
    return name, options


def run_search(entry: str, surrogate: SurrogateObjective, *, trials: int, seed: int) -> Run:
    oracle = SurrogateOracle(surrogate)
    problem = SearchProblem(layers=surrogate.layers, table=surrogate.table, budget=surrogate.budget,
                            seed=seed, num_trials=trials, accuracy_oracle=oracle)
    name, options = parse_entry(entry)
    searcher = make_searcher(name, problem, **options)
    best, best_so_far = -np.inf, np.empty(trials)
    cpu, wall = np.zeros((trials, 2)), np.zeros((trials, 2))
    trials_run = trials
    for i in range(trials):
        trial_id = f"trial_{i:05d}"
        c0, w0 = time.process_time(), time.perf_counter()
        config = searcher.suggest(trial_id)
        c1, w1 = time.process_time(), time.perf_counter()
        if not isinstance(config, dict):  # exhausted searcher: the best stays
            best_so_far[i:] = best
            trials_run = i
            break
        result = surrogate.result(config)
        c2, w2 = time.process_time(), time.perf_counter()
        searcher.on_trial_complete(trial_id, result)
        c3, w3 = time.process_time(), time.perf_counter()
        cpu[i] = (c1 - c0, c3 - c2)
        wall[i] = (w1 - w0, w3 - w2)
        best = max(best, result["val_acc"])
        best_so_far[i] = best
    cpu, wall = cpu * 1e3, wall * 1e3
    return Run(best_so_far, cpu[:trials_run, 0], cpu[:trials_run, 1], wall[:trials_run, 0],
               wall[:trials_run, 1], trials_run, oracle.calls)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 seeds, 60 trials: a smoke run")
    parser.add_argument("--searchers", default=";".join(SEARCHERS),
                        help="';'-separated entries, each NAME or NAME:option=value,option=value")
    parser.add_argument("--hardware", default=HARDWARE)
    parser.add_argument("--checkpoints", help="comma-separated trial counts (default 50,100,200); "
                        "the overhead window is then the last half of the largest, at most 100 trials")
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--surrogate", choices=[*SURROGATES, "both"], default="separable",
                        help="separable (additive penalties), pairwise (neighbouring-layer "
                        "interactions) or both")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    names = [n.strip() for n in args.searchers.split(";") if n.strip()]
    if len(names) == 1 and ":" not in names[0]:  # the old comma-separated form
        names = [n.strip() for n in names[0].split(",") if n.strip()]
    checkpoints = (20, 40, 60) if args.quick else CHECKPOINTS
    seeds = range(2 if args.quick else NUM_SEEDS)
    latency_trials = 60 if args.quick else LATENCY_TRIALS
    window = 20 if args.quick else LATENCY_WINDOW
    if args.checkpoints:  # e.g. gp, whose suggest takes seconds at 106 dimensions
        checkpoints = tuple(int(c) for c in args.checkpoints.split(","))
        latency_trials = max(checkpoints)
        window = min(LATENCY_WINDOW, latency_trials // 2)
    if args.seeds:
        seeds = range(args.seeds)

    layers = mobilenet_v2_layers()
    table, hardware_used = cost_table(layers, args.hardware)
    variants = list(SURROGATES) if args.surrogate == "both" else [args.surrogate]
    for variant in variants:
        print(f"\n## Surrogate: {variant} (interaction {SURROGATES[variant]})\n", flush=True)
        surrogates = {s: SurrogateObjective(layers, table, BUDGET, seed=s,
                                            interaction=SURROGATES[variant]) for s in seeds}
        bench_variant(names, surrogates, seeds, checkpoints, latency_trials, window, hardware_used)


def bench_variant(names, surrogates, seeds, checkpoints, latency_trials, window, hardware_used) -> None:
    layers = next(iter(surrogates.values())).layers
    optima = {s: sur.optimum()[1] for s, sur in surrogates.items()}
    print(f"# MobileNetV2 ({len(layers)} layers), {hardware_used}, budget {BUDGET}, "
          f"seeds {list(seeds)}, torch threads {torch.get_num_threads()}")
    for s, sur in surrogates.items():
        print(f"seed {s}: optimum val_acc {optima[s]:.5f} (upper bound "
              f"{sur.optimum_upper_bound():.5f}), ref_acc {sur.ref_acc}, 8-bit projected "
              f"{sur.value(sur.table.uniform(8)):.5f}")

    regrets: dict[str, np.ndarray] = {}
    timings: dict[str, tuple[float, ...]] = {}
    first_suggest: dict[str, tuple[float, float, int, int]] = {}
    for name in names:
        rows = []
        for s in seeds:
            trials = max(latency_trials, max(checkpoints)) if s == 0 else max(checkpoints)
            t0 = time.perf_counter()
            run = run_search(name, surrogates[s], trials=trials, seed=s)
            wall = time.perf_counter() - t0
            if s == 0:
                # An exhausted searcher: its own trials (after the first, reported apart).
                last = (slice(latency_trials - window, latency_trials) if run.trials_run >= latency_trials
                        else slice(1, max(run.trials_run, 2)))
                timings[name] = tuple(
                    float(f(x[last])) for x in (run.suggest_ms, run.update_ms, run.suggest_wall_ms,
                                                run.update_wall_ms)
                    for f in (np.mean, np.median))
                first_suggest[name] = (float(run.suggest_ms[0]), float(run.suggest_wall_ms[0]),
                                       run.trials_run, run.oracle_calls)
                print(f"{name}: suggest {timings[name][0]:.2f} ms, update {timings[name][2]:.2f} ms "
                      "(CPU, mean over the timing window)", flush=True)
            rows.append([optima[s] - run.best_so_far[c - 1] for c in checkpoints])
            extra = f" (FINISHED after {run.trials_run})" if run.trials_run < trials else ""
            extra += f", {run.oracle_calls} oracle calls" if run.oracle_calls else ""
            print(f"{name} seed {s}: {trials} trials{extra} in {wall:.1f} s, regret "
                  + ", ".join(f"@{c}={r * PERCENT:.3f}pp" for c, r in zip(checkpoints, rows[-1], strict=True)),
                  flush=True)
        regrets[name] = np.array(rows) * PERCENT

    print(f"\n### Per-trial overhead (ms, trials {latency_trials - window + 1}-{latency_trials}, one thread)\n")
    print("CPU time of the call (wall-clock in parentheses), mean / median; a searcher that "
          "FINISHED earlier: over its trials 2..n. First suggest: CPU (wall) ms of trial 1.\n")
    print("| searcher | suggest | update | first suggest | trials run |")
    print("|---|---:|---:|---:|---:|")
    for name, (sm, smed, um, umed, swm, swmed, uwm, uwmed) in timings.items():
        first_cpu, first_wall, ran, _ = first_suggest[name]
        print(f"| {name} | {sm:.2f} / {smed:.2f} ({swm:.2f} / {swmed:.2f}) "
              f"| {um:.2f} / {umed:.2f} ({uwm:.2f} / {uwmed:.2f}) | {first_cpu:.0f} ({first_wall:.0f}) | {ran} |")
    print(f"\n### Regret on the surrogate (accuracy points, mean ± std over {len(seeds)} seeds)\n")
    print("| searcher | " + " | ".join(f"{c} trials" for c in checkpoints) + " |")
    print("|---|" + "---:|" * len(checkpoints))
    for name, r in regrets.items():
        cells = " | ".join(f"{m:.3f} ± {sd:.3f}" for m, sd in zip(r.mean(0), r.std(0), strict=True))
        print(f"| {name} | {cells} |")


if __name__ == "__main__":
    main()
