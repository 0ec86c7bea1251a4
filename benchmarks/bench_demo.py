"""Wall time of the quick-start demo: ``haqtune search --num-trials N`` in a fresh directory.

Target (issue #3): the quick-start demo (60 trials, its default) in <= 5 minutes on 2 CPU cores, from a cold start
(Ray start-up, reference-model training, MLflow store creation and the final
test-split re-evaluation included). Run: ``.venv/bin/python benchmarks/bench_demo.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HAQTUNE = str(Path(sys.executable).with_name("haqtune"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-trials", type=int, default=60)
    parser.add_argument("--searcher", default="haq")  # the demo's default searcher
    args = parser.parse_args()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        stamps: list[tuple[float, str]] = []
        proc = subprocess.Popen([HAQTUNE, "search", "--num-trials", str(args.num_trials),
                                 "--searcher", args.searcher], cwd=tmp, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in proc.stdout:
            stamps.append((time.perf_counter() - start, line.rstrip()))
        rc = proc.wait()
        total = time.perf_counter() - start
    if rc != 0:
        print("\n".join(line for _, line in stamps[-30:]))
        raise SystemExit(f"haqtune search failed with exit code {rc}")

    def first(pattern: str) -> float:
        return next((t for t, line in stamps if re.search(pattern, line)), float("nan"))

    ref_done, first_trial = first(r"reference .*val_acc"), first(r"^\[1/")
    last_trial = first(rf"^\[{args.num_trials}/{args.num_trials}\]")
    print("| phase | seconds |\n|---|---:|")
    print(f"| start-up + reference model | {ref_done:.1f} |")
    print(f"| to first finished trial | {first_trial:.1f} |")
    print(f"| {args.num_trials} trials done | {last_trial:.1f} |")
    print(f"| total (incl. test re-evaluation, artifacts) | {total:.1f} |")
    print(f"\nper trial (steady state): {(last_trial - first_trial) / max(args.num_trials - 1, 1):.2f} s")
    print(f"target <= 300 s: {'met' if total <= 300 else 'MISSED'}")
    print("\nlast lines:\n" + "\n".join(line for _, line in stamps[-8:]))


if __name__ == "__main__":
    main()
