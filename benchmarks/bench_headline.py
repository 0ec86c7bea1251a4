"""HAQ's headline on the embedded task: mixed precision vs uniform 8-bit, per accelerator.

    .venv/bin/python benchmarks/bench_headline.py [--num-trials 60] [--seeds 0,1,2]
        [--searchers haq,sensitivity-dp] [--budgets 0.5] [--config configs/demo.yaml]
        [--set KEY=YAML ...] [--out benchmarks/headline]
    .venv/bin/python benchmarks/bench_headline.py --merge DIR,DIR,... --out benchmarks/headline

For each accelerator (``bismo-edge`` and ``bismo-cloud`` under a latency budget,
``bitfusion`` under an energy budget), each searcher, each budget (a fraction of the
uniform 8-bit cost) and each seed, one ``haqtune search`` runs through the CLI (Ray
Tune, MLflow, the final test-split evaluation: exactly what a user runs). Its
summary gives the best policy's test accuracy and cost and the uniform 8-bit
policy's (fine-tuned the same way); the reduction is 8-bit cost / best cost and the
loss is 8-bit test accuracy - best test accuracy, in points (one test image of the
digits split is 0.28 points). Mean and standard deviation over seeds.

The uniform k-bit policies (k = 8..2, fine-tuned like a trial, not projected) are
evaluated in-process with the same cached reference model and seed, for the same
plot: mixed precision has to beat them to matter.

Settings a search takes from its config (``searcher_options``, per-layer bit sets,
fixed layers, quantizer options, ...) come from ``--config`` plus ``--set KEY=YAML``
overrides, e.g. ``--set 'searcher_options={warmup: 20}'``; every search of the grid
uses them, and they are printed and written to ``headline.json``.

Outputs (``--out``): ``headline.json`` (every search's numbers and the exact
commands), ``headline.md`` (the tables), ``headline.png`` (reduction vs test-accuracy
loss, searchers with seed spread and the uniform k-bit curve, per accelerator) and
``policies_edge_vs_cloud.png`` (HAQ's best per-layer W/A bits on the two BISMO
accelerators side by side, as in HAQ's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from search_spaces import metrics as M  # noqa: E402
from search_spaces import parse_policy  # noqa: E402

HAQTUNE = str(Path(sys.executable).with_name("haqtune"))
ROOT = Path(__file__).resolve().parents[1]
# Accelerator -> the budget metric its headline is about (HAQ: latency on BISMO, energy
# on BitFusion).
HARDWARE = {"bismo-edge": "latency", "bismo-cloud": "latency", "bitfusion": "energy"}
COST_KEY = {"latency": M.LATENCY_MS, "energy": M.ENERGY_MJ}
UNIFORM_BITS = (8, 7, 6, 5, 4, 3, 2)
POINTS = 100.0


def parse_set(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise SystemExit(f"--set: expected KEY=YAML, got {item!r}")
        out[key] = yaml.safe_load(value)
    return out


def run_search(base_config: Path, *, searcher: str, hardware: str, budget: str, seed: int,
               num_trials: int, storage: Path, env: dict, log) -> tuple[dict, list[str]]:
    cmd = [HAQTUNE, "search", str(base_config), "--searcher", searcher, "--hardware", hardware,
           "--budget", budget, "--seed", str(seed), "--num-trials", str(num_trials),
           "--storage-dir", str(storage), "--experiment", "headline"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    log.write(f"$ {' '.join(cmd)}\n{proc.stdout}\n{proc.stderr}\n")
    log.flush()
    if proc.returncode != 0:
        raise SystemExit(f"search failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    match = re.search(r"haqtune: results in (\S+)", proc.stdout)
    if not match:
        raise SystemExit(f"no results directory in the output of {' '.join(cmd)}")
    summary = json.loads((Path(match.group(1)) / "summary.json").read_text())
    return summary, cmd


# Set per search on the command line or by the run itself: not part of "the same settings".
PER_SEARCH_KEYS = {"searcher", "hardware", "budget", "seed", "num_trials", "storage_dir", "experiment",
                   "tracking_uri", "data_root"}


def finished_searches(storage: Path, config_data: dict) -> dict:
    """Searches already finished under ``storage`` with the settings of ``config_data``:
    (searcher, hardware, budget, seed, trials) -> (summary, command), read back from their
    resolved ``config.yaml`` and ``summary.json``. A search run with other settings (say
    another ``bits``) is not reused."""
    from orchestrator.config import SearchConfig

    wanted = SearchConfig.from_dict(config_data)
    out = {}
    for summary_path in sorted(storage.glob("*/summary.json")):
        config = yaml.safe_load((summary_path.parent / "config.yaml").read_text())
        ran = SearchConfig.from_dict(config)
        if any(getattr(ran, k) != getattr(wanted, k) for k in set(config_data) - PER_SEARCH_KEYS):
            continue
        summary = json.loads(summary_path.read_text())
        key = (config["searcher"], config["hardware"], str(config["budget"]), int(config["seed"]),
               int(config["num_trials"]))
        cmd = [HAQTUNE, "search", "CONFIG", "--searcher", key[0], "--hardware", key[1], "--budget", key[2],
               "--seed", str(key[3]), "--num-trials", str(key[4])]
        out[key] = (summary, cmd)
    return out


def uniform_curve(config_data: dict, hardware_names, seed: int, storage: Path) -> dict:
    """Test accuracy of uniform k-bit policies (fine-tuned, not projected) and their costs."""
    from orchestrator.config import SearchConfig
    from orchestrator.search import local_context, prepare
    from trainables import evaluate_on_test
    from trainables.trial import policy_costs

    config = SearchConfig.from_dict({**config_data, "seed": seed, "budget": None})
    tables = {}
    for name in hardware_names:
        prepared = prepare(config.replace(hardware=name))
        tables[name] = prepared.table
    # Trained like the searches' final evaluations: HAQ's final fine-tune when set.
    context = local_context(config, prepared, storage, finetune=config.final_finetune or config.finetune)
    ref_acc = context.ref_acc
    out = {"ref_acc": ref_acc, "bits": {}}
    for bits in UNIFORM_BITS:
        policy = prepared.table.uniform(bits)
        result = evaluate_on_test(context, policy, project=False)
        out["bits"][bits] = {
            M.VAL_ACC: result[M.VAL_ACC], M.TEST_ACC: result[M.TEST_ACC],
            "costs": {name: policy_costs(table, policy) for name, table in tables.items()},
        }
    return out


def mean_std(values) -> tuple[float, float]:
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std())


def build_tables(results: dict, uniform: dict, budgets, searchers, seeds) -> str:
    lines = []
    for hardware, metric in HARDWARE.items():
        if hardware not in results:
            continue
        key = COST_KEY[metric]
        lines.append(f"\n#### {hardware} ({metric})\n")
        lines.append(f"| policy | budget | {metric} reduction vs 8-bit | test-acc loss vs 8-bit (points) "
                     "| best val_acc | search val_acc | seeds |")
        lines.append("|---|---:|---:|---:|---:|---:|---:|")
        for budget in budgets:
            for searcher in searchers:
                runs = results[hardware].get(str(budget), {}).get(searcher, [])
                if not runs:
                    continue
                red = mean_std([r["reduction_x"] for r in runs])
                loss = mean_std([r["loss_points"] for r in runs])
                val = mean_std([r["best_val_acc"] for r in runs])
                # The search's own val_acc of that policy (differs with a final fine-tune).
                search = mean_std([r.get("search_val_acc", r["best_val_acc"]) for r in runs])
                lines.append(f"| {searcher} | {budget} | {red[0]:.2f}x ± {red[1]:.2f} | "
                             f"{loss[0]:.2f} ± {loss[1]:.2f} | {val[0]:.4f} ± {val[1]:.4f} | "
                             f"{search[0]:.4f} ± {search[1]:.4f} | {len(runs)} |")
        for bits in UNIFORM_BITS[1:]:
            red = mean_std([uniform[s]["bits"][8]["costs"][hardware][key]
                            / uniform[s]["bits"][bits]["costs"][hardware][key] for s in seeds])
            loss = mean_std([(uniform[s]["bits"][8][M.TEST_ACC] - uniform[s]["bits"][bits][M.TEST_ACC])
                             * POINTS for s in seeds])
            val = mean_std([uniform[s]["bits"][bits][M.VAL_ACC] for s in seeds])
            lines.append(f"| uniform {bits}/{bits} | - | {red[0]:.2f}x ± {red[1]:.2f} | "
                         f"{loss[0]:.2f} ± {loss[1]:.2f} | {val[0]:.4f} ± {val[1]:.4f} | - | {len(seeds)} |")
    return "\n".join(lines)


def plot_headline(results: dict, uniform: dict, seeds, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [h for h in HARDWARE if h in results]
    fig, axes = plt.subplots(1, len(names), figsize=(5 * len(names), 4), squeeze=False)
    markers = {"haq": "o", "sensitivity-dp": "s"}
    for ax, hardware in zip(axes[0], names, strict=True):
        key = COST_KEY[HARDWARE[hardware]]
        xs, ys = [], []
        for bits in UNIFORM_BITS:
            red = [uniform[s]["bits"][8]["costs"][hardware][key] / uniform[s]["bits"][bits]["costs"][hardware][key]
                   for s in seeds]
            loss = [(uniform[s]["bits"][8][M.TEST_ACC] - uniform[s]["bits"][bits][M.TEST_ACC]) * POINTS
                    for s in seeds]
            xs.append(np.mean(red))
            ys.append(np.mean(loss))
            ax.annotate(f"{bits}/{bits}", (xs[-1], ys[-1]), textcoords="offset points", xytext=(4, 4),
                        fontsize=8, color="gray")
        ax.plot(xs, ys, "--", color="gray", marker="x", label="uniform k/k")
        for budget, by_searcher in results[hardware].items():
            for searcher, runs in by_searcher.items():
                red = [r["reduction_x"] for r in runs]
                loss = [r["loss_points"] for r in runs]
                ax.errorbar(np.mean(red), np.mean(loss), xerr=np.std(red), yerr=np.std(loss),
                            marker=markers.get(searcher, "^"), capsize=3, linestyle="none",
                            label=f"{searcher} (budget {budget})")
        ax.axhline(0.5, color="red", linewidth=0.8, linestyle=":")
        # Uniform 2-bit loses tens of points: keep the axis on the region that matters.
        searched = [np.mean([r["loss_points"] for r in runs]) + np.std([r["loss_points"] for r in runs])
                    for by_searcher in results[hardware].values() for runs in by_searcher.values()]
        top = min(15.0, max(3.0, *(y for y in ys if y <= 15.0), *searched) + 1.0)
        ax.set_ylim(-1.0, top)
        for x, y, bits in zip(xs, ys, UNIFORM_BITS, strict=True):
            if y > top:
                ax.annotate(f"{bits}/{bits}: {y:.0f} points (off scale)", (x, top), xytext=(-60, -12),
                            textcoords="offset points", fontsize=7, color="gray")
        ax.set_xlabel(f"{HARDWARE[hardware]} reduction vs uniform 8-bit (x)")
        ax.set_ylabel("test-accuracy loss vs 8-bit (points)")
        ax.set_title(hardware)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Mixed precision vs uniform 8-bit, digits demo (mean ± std, seeds {list(seeds)})",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_policies(policies: dict, layer_kinds: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(policies), figsize=(6 * len(policies), 3.6), squeeze=False, sharey=True)
    for ax, (hardware, policy) in zip(axes[0], policies.items(), strict=True):
        idx = np.arange(len(policy))
        ax.bar(idx - 0.2, policy[:, 0], width=0.4, label="weight bits")
        ax.bar(idx + 0.2, policy[:, 1], width=0.4, label="activation bits")
        ax.set_xticks(idx, [f"{i}\n{'dw' if k == 'depthwise' else k[:2]}" for i, k in enumerate(layer_kinds)],
                        fontsize=7)
        ax.set_ylim(0, 8.5)
        ax.set_title(f"haq best policy on {hardware}")
        ax.set_xlabel("layer (dw = depthwise, co = conv, li = linear)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("bits")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def describe_policies(policies: dict, layer_kinds: list[str]) -> str:
    kinds = np.array(layer_kinds)
    parts = []
    for hardware, policy in policies.items():
        dw = kinds == "depthwise"
        parts.append(
            f"{hardware}: mean w/a bits {policy[:, 0].mean():.2f}/{policy[:, 1].mean():.2f}; depthwise "
            f"{policy[dw, 0].mean():.2f}/{policy[dw, 1].mean():.2f}, other layers "
            f"{policy[~dw, 0].mean():.2f}/{policy[~dw, 1].mean():.2f}")
    return "; ".join(parts)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    parser.add_argument("--set", action="append", default=[], dest="overrides", metavar="KEY=YAML")
    parser.add_argument("--hardware", default=",".join(HARDWARE))
    parser.add_argument("--searchers", default="haq,sensitivity-dp")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--budgets", default="0.5", help="fractions of the uniform 8-bit cost")
    parser.add_argument("--num-trials", type=int, default=60)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "headline"))
    parser.add_argument("--report-only", action="store_true",
                        help="rebuild headline.md and the figures from --out's headline.json")
    parser.add_argument("--merge", metavar="DIR,DIR,...",
                        help="combine the headline.json of runs split over processes (e.g. one per "
                        "seed, same settings) into --out's report and figures; the first holds the "
                        "edge vs cloud policies")
    parser.add_argument("--work", help="work directory (default: a new temp dir); searches and uniform "
                        "curves already finished there are reused, so an interrupted run continues")
    args = parser.parse_args(argv)

    if args.merge:
        merge_runs([Path(d) for d in args.merge.split(",") if d], Path(args.out))
        args.report_only = True
    if args.report_only:
        saved = json.loads((Path(args.out) / "headline.json").read_text())
        uniform = {int(s): {"ref_acc": u["ref_acc"], "bits": {int(b): v for b, v in u["bits"].items()}}
                   for s, u in saved["uniform"].items()}
        policies = {h: np.array(p) for h, p in saved["edge_vs_cloud"].items()}
        write_report(Path(args.out), saved["config"], argparse.Namespace(num_trials=saved["num_trials"]),
                     saved["searchers"], saved["budgets"], saved["seeds_done"], saved["commands"],
                     saved["results"], uniform, policies, time.time() - saved.get("wall_time_s", 0.0))
        return
    hardware_names = [h for h in args.hardware.split(",") if h]
    unknown = sorted(set(hardware_names) - set(HARDWARE))
    if unknown:
        raise SystemExit(f"--hardware: expected some of {', '.join(HARDWARE)}, got {', '.join(unknown)}")
    searchers = [s for s in args.searchers.split(",") if s]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    budgets = [float(b) for b in args.budgets.split(",") if b]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    config_data = yaml.safe_load(Path(args.config).read_text()) or {}
    config_data.update(parse_set(args.overrides))
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="haqtune-headline-"))
    work.mkdir(parents=True, exist_ok=True)
    storage = work / "runs"
    finished = finished_searches(storage, config_data)
    base_config = work / "config.yaml"
    base_config.write_text(yaml.safe_dump(config_data, sort_keys=False))
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}",
           "PYTHONPATH": str(ROOT)}
    print(f"# headline: config {args.config} + {parse_set(args.overrides) or 'no overrides'}; "
          f"searchers {searchers}, seeds {seeds}, budgets {budgets}, {args.num_trials} trials; work dir {work}",
          flush=True)

    started = time.time()
    results: dict = {}
    commands: list[str] = []
    best_policies: dict = {}
    uniform: dict = {}
    done_seeds: list[int] = []
    # Seed by seed, so that a run cut short still leaves whole seeds (every accelerator and
    # searcher); the report is rewritten after each seed.
    with open(out / "searches.log", "w") as log:
        for seed in seeds:
            t0 = time.time()
            cached = work / f"uniform_seed{seed}_{'+'.join(hardware_names)}.json"
            if cached.is_file():
                data = json.loads(cached.read_text())
                uniform[seed] = {"ref_acc": data["ref_acc"], "bits": {int(b): v for b, v in data["bits"].items()}}
            else:
                uniform[seed] = uniform_curve(config_data, hardware_names, seed, storage)
                cached.write_text(json.dumps(uniform[seed]))
            print(f"seed {seed}: uniform k-bit policies done in {time.time() - t0:.0f} s", flush=True)
            for hardware in hardware_names:
                metric = HARDWARE[hardware]
                key = COST_KEY[metric]
                for budget in budgets:
                    for searcher in searchers:
                        t0 = time.time()
                        done = finished.get((searcher, hardware, f"{metric}={budget}", seed, args.num_trials))
                        if done is not None:
                            summary, cmd = done
                        else:
                            summary, cmd = run_search(
                                base_config, searcher=searcher, hardware=hardware,
                                budget=f"{metric}={budget}", seed=seed, num_trials=args.num_trials,
                                storage=storage, env=env, log=log)
                        commands.append(" ".join(cmd[1:]))
                        best, eight = summary["best"][0], summary["uniform_8bit"]
                        row = {
                            "seed": seed, "search_id": summary["search_id"],
                            "reduction_x": eight[key] / best[key],
                            "loss_points": (eight[M.TEST_ACC] - best[M.TEST_ACC]) * POINTS,
                            "best_val_acc": best[M.VAL_ACC], "best_test_acc": best[M.TEST_ACC],
                            "search_val_acc": best.get("search_val_acc", best[M.VAL_ACC]),
                            "uniform8_test_acc": eight[M.TEST_ACC], "policy": best[M.POLICY],
                            "trials": summary["num_trials"], "wall_s": time.time() - t0,
                        }
                        results.setdefault(hardware, {}).setdefault(str(budget), {}).setdefault(
                            searcher, []).append(row)
                        if searcher == "haq" and seed == seeds[0] and budget == budgets[0]:
                            best_policies[hardware] = parse_policy(best[M.POLICY])
                        print(f"{hardware} {metric}={budget} {searcher} seed {seed}: "
                              f"{row['reduction_x']:.2f}x at {row['loss_points']:+.2f} points "
                              f"(val {row['best_val_acc']:.4f}, test {row['best_test_acc']:.4f}, "
                              f"8-bit test {row['uniform8_test_acc']:.4f}) in {row['wall_s']:.0f} s",
                              flush=True)
                        # After every search: a run cut short still leaves its report.
                        write_report(out, config_data, args, searchers, budgets, [*done_seeds, seed],
                                     commands, results, uniform, best_policies, started)
            done_seeds.append(seed)


def merge_runs(dirs: list[Path], out: Path) -> None:
    """One headline.json from runs of the same grid split over processes (by seed,
    accelerator or budget: the budgets are the union of the runs')."""
    runs = [json.loads((d / "headline.json").read_text()) for d in dirs]
    first = runs[0]
    for run, d in zip(runs[1:], dirs[1:], strict=True):
        for key in ("config", "num_trials", "searchers"):
            if run[key] != first[key]:
                raise SystemExit(f"--merge: {d} has {key}={run[key]!r}, expected {first[key]!r} as in {dirs[0]}")
    merged = {**first, "commands": [], "results": {}, "seeds_done": [], "uniform": {}, "wall_time_s": 0.0,
              "budgets": sorted({b for run in runs for b in run["budgets"]})}
    for run in runs:
        merged["commands"] += run["commands"]
        merged["seeds_done"] += [seed for seed in run["seeds_done"] if seed not in merged["seeds_done"]]
        for seed, curve in run["uniform"].items():
            # Runs split by accelerator price the same uniform policies on different hardware:
            # same accuracies (same seed and reference), so only the costs are combined.
            have = merged["uniform"].setdefault(seed, curve)
            for bits, entry in curve["bits"].items():
                have["bits"][bits]["costs"].update(entry["costs"])
        merged["wall_time_s"] = max(merged["wall_time_s"], run["wall_time_s"])
        for hardware, by_budget in run["results"].items():
            for budget, by_searcher in by_budget.items():
                for searcher, rows in by_searcher.items():
                    merged["results"].setdefault(hardware, {}).setdefault(budget, {}).setdefault(
                        searcher, []).extend(rows)
    out.mkdir(parents=True, exist_ok=True)
    (out / "headline.json").write_text(json.dumps(merged, indent=1))
    with open(out / "searches.log", "w") as log:
        for d in dirs:
            log.write((d / "searches.log").read_text())


def write_report(out: Path, config_data: dict, args, searchers, budgets, seeds, commands, results,
                 uniform, best_policies, started: float) -> None:
    from orchestrator.config import SearchConfig
    from orchestrator.search import prepare

    prepared = prepare(SearchConfig.from_dict({**config_data, "budget": None}))
    layer_kinds = [s.kind for s in prepared.layers]
    tables = build_tables(results, uniform, budgets, searchers, seeds)
    plot_headline(results, uniform, seeds, out / "headline.png")
    edge_cloud = {h: best_policies[h] for h in ("bismo-edge", "bismo-cloud") if h in best_policies}
    description = ""
    if len(edge_cloud) == 2:
        plot_policies(edge_cloud, layer_kinds, out / "policies_edge_vs_cloud.png")
        description = describe_policies(edge_cloud, layer_kinds)
    report = (f"Seeds done: {seeds}.\n{tables}\n\nEdge vs cloud (haq, seed {seeds[0]}, budget "
              f"{budgets[0]}): {description}\n\nTotal wall time {time.time() - started:.0f} s.\n")
    print(report)
    (out / "headline.md").write_text(report)
    (out / "headline.json").write_text(json.dumps({
        "config": config_data, "budgets": budgets, "num_trials": args.num_trials,
        "searchers": searchers, "commands": commands, "results": results,
        "seeds_done": seeds,
        "wall_time_s": time.time() - started,
        "uniform": {str(s): {"ref_acc": u["ref_acc"], "bits": {str(b): v for b, v in u["bits"].items()}}
                    for s, u in uniform.items()},
        "edge_vs_cloud": {h: p.tolist() for h, p in edge_cloud.items()},
    }, indent=1))


if __name__ == "__main__":
    main()
