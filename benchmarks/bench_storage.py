"""Cost of a bucket as the search's storage: the same small search with ``--storage-dir`` a
local directory and ``s3://`` on a local S3 API (moto's server on 127.0.0.1, as in
``tests/test_e2e_s3.py``), run alternately, plus how long after a trial's progress line
Tune's experiment state holding it as finished reaches the bucket (the window in which a
SIGKILL makes Tune forget that trial).

Run: ``.venv/bin/python benchmarks/bench_storage.py [--num-trials 20] [--repeats 1]``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from s3server import s3_server  # noqa: E402  (tests/s3server.py: the same local S3 server)

HAQTUNE = str(Path(sys.executable).with_name("haqtune"))
LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) ok")
CONFIG = "searcher: random\nnum_trials: {n}\ntest_top_k: 1\nreference: {{epochs: 4}}\nfinetune: {{epochs: 1}}\n"


def _terminated(s3, prefix: str) -> dict[str, float]:
    """Poll the bucket; trial id -> first time (perf_counter) seen TERMINATED in an uploaded state."""
    states = [k for k in s3.keys(prefix) if k.rsplit("/", 1)[-1].startswith("experiment_state-")]
    if not states:
        return {}
    try:
        trials = [json.loads(t[0]) for t in json.loads(s3.read_text(max(states)))["trial_data"]]
    except json.JSONDecodeError:  # replaced between the read's size lookup and its GET: read again
        return {}
    return {t["trial_id"]: time.perf_counter() for t in trials if t.get("status") == "TERMINATED"}


def run_search(storage: str, n: int, env: dict, s3=None, prefix: str = "") -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        Path(tmp, "search.yaml").write_text(CONFIG.format(n=n))
        start = time.perf_counter()
        printed: dict[str, float] = {}
        saved: dict[str, float] = {}
        stop = threading.Event()

        def poll() -> None:
            while not stop.is_set():
                for tid, t in _terminated(s3, prefix).items():
                    saved.setdefault(tid, t)
                time.sleep(0.02)

        poller = threading.Thread(target=poll, daemon=True) if s3 is not None else None
        if poller:
            poller.start()
        proc = subprocess.Popen([HAQTUNE, "search", "search.yaml", "--storage-dir", storage], cwd=tmp,
                                env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        lines = []
        for line in proc.stdout:
            lines.append(line.rstrip())
            m = LINE.match(line)
            if m:
                printed[m.group(3)] = time.perf_counter()
        rc = proc.wait()
        total = time.perf_counter() - start
        stop.set()
        if poller:
            poller.join()
    if rc != 0:
        raise SystemExit("\n".join(lines[-30:]) + f"\nhaqtune search failed with exit code {rc}")
    stamps = sorted(printed.values())
    lags = sorted(saved[t] - printed[t] for t in printed if t in saved)
    return {"total_s": total, "first_trial_s": stamps[0] - start,
            "per_trial_s": (stamps[-1] - stamps[0]) / max(len(stamps) - 1, 1), "lags": lags}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--num-trials", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    base = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    base["PYTHONUNBUFFERED"] = "1"
    rows = []
    with s3_server() as s3:
        for r in range(args.repeats):
            with tempfile.TemporaryDirectory() as local:
                rows.append(("local", run_search(f"{local}/runs", args.num_trials, base)))
            prefix = f"runs-{r}"
            rows.append(("s3", run_search(s3.uri(prefix), args.num_trials, {**base, **s3.env}, s3, prefix)))
    print("| storage | trials | total s | to first trial s | per trial s (steady) | state upload after "
          "the trial's line, median / max s |\n|---|---:|---:|---:|---:|---|")
    for name, row in rows:
        lags = row["lags"]
        lag = f"{lags[len(lags) // 2]:.2f} / {lags[-1]:.2f} ({len(lags)} trials)" if lags else "-"
        print(f"| {name} | {args.num_trials} | {row['total_s']:.1f} | {row['first_trial_s']:.1f} | "
              f"{row['per_trial_s']:.2f} | {lag} |")


if __name__ == "__main__":
    main()
