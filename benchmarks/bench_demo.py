"""The quick-start demo as a user runs it: ``haqtune search --seed S`` in a fresh directory.

Two targets. Wall time (issue #3): the demo (its defaults: 60 haq trials on digits,
BitFusion at half the 8-bit energy, the 30-epoch distilled final fine-tune) in <= 5 minutes
on 2 CPU cores from a cold start (Ray start-up, reference training, the MLflow store, the
final fine-tunes and test evaluation included). Mixed precision vs uniform (issue #14):
per seed, the deployed policy's test accuracy against uniform 8-bit and against the widest
uniform policy inside the budget, both fine-tuned the same way (``summary.json``).

Run: ``.venv/bin/python benchmarks/bench_demo.py [--seeds 0,1,2,3,4]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAQTUNE = str(Path(sys.executable).with_name("haqtune"))
POINTS = 100.0


def run_demo(seed: int, num_trials: int, searcher: str, config: str | None = None,
             ) -> tuple[list[tuple[float, str]], float, dict]:
    """One cold demo search: (timestamped output lines, wall seconds, summary.json)."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stamps: list[tuple[float, str]] = []
        config_arg = [str(Path(config).resolve())] if config else []
        proc = subprocess.Popen([HAQTUNE, "search", *config_arg, "--num-trials", str(num_trials),
                                 "--searcher", searcher, "--seed", str(seed)], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            stamps.append((time.perf_counter() - start, line.rstrip()))
        rc = proc.wait()
        total = time.perf_counter() - start
        if rc != 0:
            print("\n".join(line for _, line in stamps[-30:]))
            raise SystemExit(f"haqtune search (seed {seed}) failed with exit code {rc}")
        (summary_file,) = Path(tmp, "haqtune_runs").glob("*/summary.json")
        summary = json.loads(summary_file.read_text())
    return stamps, total, summary


def mean_sd(values: list[float]) -> str:
    return f"{statistics.mean(values):+.2f} ± {statistics.stdev(values) if len(values) > 1 else 0.0:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-trials", type=int, default=60)
    parser.add_argument("--searcher", default="haq")  # the demo's default searcher
    parser.add_argument("--seeds", default="0", help="comma-separated search seeds, one cold demo each")
    parser.add_argument("--config", help="a search config instead of the embedded demo (variants of it)")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    rows = []
    for seed in seeds:
        stamps, total, summary = run_demo(seed, args.num_trials, args.searcher, args.config)

        def first(pattern: str, stamps=stamps) -> float:
            return next((t for t, line in stamps if re.search(pattern, line)), float("nan"))

        ref_done, first_trial = first(r"reference .*val_acc"), first(r"^\[1/")
        last_trial = first(rf"^\[{args.num_trials}/{args.num_trials}\]")
        print(f"seed {seed}: start-up + reference {ref_done:.1f} s, first trial {first_trial:.1f} s, "
              f"{args.num_trials} trials {last_trial:.1f} s, total {total:.1f} s "
              f"({(last_trial - first_trial) / max(args.num_trials - 1, 1):.2f} s per trial); "
              f"target <= 300 s: {'met' if total <= 300 else 'MISSED'}", flush=True)
        best, eight = summary["best"][0], summary["uniform_8bit"]
        uniform = summary.get("uniform_in_budget")
        metric = next(k for k in ("energy_mj", "latency_ms", "size_mb") if k in eight)
        row = {"seed": seed, "total_s": total, "best_test": best["test_acc"], "eight_test": eight["test_acc"],
               "reduction": eight[metric] / best[metric], "policy": best["policy"], "uniform": uniform}
        rows.append(row)
        text = (f"  best {row['reduction']:.2f}x ({metric}), test {best['test_acc']:.4f}; "
                f"uniform 8-bit test {eight['test_acc']:.4f}")
        if uniform:
            text += (f"; uniform {uniform['w_bits']}/{uniform['a_bits']} (widest inside the budget) "
                     f"{eight[metric] / uniform[metric]:.2f}x, test {uniform['test_acc']:.4f}")
        print(text + f"\n  policy {best['policy']}", flush=True)
    print("\n| seed | total s | reduction | test-acc loss vs 8-bit (points) | vs widest uniform in budget (points) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        gain = (r["best_test"] - r["uniform"]["test_acc"]) * POINTS if r["uniform"] else float("nan")
        print(f"| {r['seed']} | {r['total_s']:.0f} | {r['reduction']:.2f}x | "
              f"{(r['eight_test'] - r['best_test']) * POINTS:+.2f} | {gain:+.2f} |")
    losses = [(r["eight_test"] - r["best_test"]) * POINTS for r in rows]
    gains = [(r["best_test"] - r["uniform"]["test_acc"]) * POINTS for r in rows if r["uniform"]]
    print(f"\nloss vs 8-bit: {mean_sd(losses)} points; vs the widest uniform policy in budget: "
          f"{mean_sd(gains) if gains else '-'} points (positive: the mixed policy is more accurate); "
          f"max total {max(r['total_s'] for r in rows):.0f} s")


if __name__ == "__main__":
    main()
