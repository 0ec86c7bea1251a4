"""Resume and faults, end to end: the real CLI in subprocesses, real Ray, real MLflow.

- A driver SIGKILLed (with its whole process group, as a crash would) after k of N
  trials, resumed from another working directory: N trials in total, the k trials
  finished before the kill keep their ids, policies and val_acc in Tune and MLflow and
  are not trained again, no duplicate child run, every run terminal, and the searcher
  continued its state.
- Ctrl-C mid-search (exit 130, parent run KILLED, no test evaluation), then resume, in
  a search whose trials misbehave through the documented testing hook
  ``HAQTUNE_TEST_FAULTS``: one raises, one diverges (NaN loss), one has its worker
  process killed once; they end FAILED, FAILED and FINISHED and the search goes on.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from e2e import HAQTUNE, run_cli, runs_of

pytestmark = pytest.mark.slow

# A shorter reference training than the demo's (the tests are about resume, not accuracy).
# The trials' own checkpoints are what a resumed search must keep: no final fine-tune.
QUICK_REFERENCE = "reference: {epochs: 6}\nfinal_finetune: null\ncompare_uniform: false\n"
LINE = re.compile(r"^\[(\d+)/(\d+)\] (\S+) (ok|FAILED|stopped early): (.*)$")


def _start(args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environ.update({"PYTHONUNBUFFERED": "1", **(env or {})})
    # Its own process group: the test signals the driver and every Ray process it started.
    return subprocess.Popen([HAQTUNE, *map(str, args)], cwd=cwd, env=environ, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            stdin=subprocess.DEVNULL)


def _read_until(proc: subprocess.Popen, done, timeout_s: float = 400) -> list[str]:
    lines, deadline = [], time.time() + timeout_s
    for line in proc.stdout:
        lines.append(line.rstrip("\n"))
        if done(lines) or time.time() > deadline:
            break
    return lines


def _progress(lines) -> dict[str, tuple[str, str]]:
    """trial id -> (status word, description) of the progress lines."""
    out = {}
    for line in lines:
        m = LINE.match(line)
        if m:
            out[m.group(3)] = (m.group(4), m.group(5))
    return out


def _search_dir(root: Path) -> Path:
    dirs = [p for p in (root / "haqtune_runs").iterdir() if not p.name.startswith("_")]
    assert len(dirs) == 1, dirs
    return dirs[0]


def _children_by_trial(uri: str) -> dict:
    parents, children = runs_of(uri)
    by_trial = {}
    for c in children:
        tid = c.data.tags["haqtune.trial_id"]
        assert tid not in by_trial, f"two MLflow runs for trial {tid}"
        by_trial[tid] = c
    return parents, by_trial


def _newest(search_dir: Path, pattern: str) -> Path:
    # By the driver session's timestamp in the name: a resumed driver re-uploads the
    # first session's files too, so modification times do not tell them apart.
    return max(search_dir.glob(pattern), key=lambda p: p.name)


def _searcher_counters(search_dir: Path, searcher: str) -> dict:
    path = _newest(search_dir, "searcher-state-*.pkl")
    if searcher == "haq":
        state = torch.load(path, map_location="cpu", weights_only=True)
        return {"episodes_suggested": state["episodes_suggested"],
                "episodes_completed": state["episodes_completed"], "replay": len(state["replay"]["states"])}
    import pickle

    study = pickle.loads(path.read_bytes())["_ot_study"]
    return {"study_trials": len(study.trials),
            "study_complete": sum(t.state.name == "COMPLETE" for t in study.trials)}


def _val_acc_steps(uri: str, run_id: str) -> list[int]:
    from mlflow.tracking import MlflowClient

    return sorted(m.step for m in MlflowClient(uri).get_metric_history(run_id, "val_acc"))


# haq here; the Optuna path (tpe) is resumed from a bucket in tests/test_e2e_s3.py.
@pytest.mark.parametrize("searcher", ["haq"])
def test_killed_driver_resumes_without_loss_or_duplicates(tmp_path, searcher):
    n, k = 5, 2
    first, elsewhere = tmp_path / "first", tmp_path / "elsewhere"
    first.mkdir()
    elsewhere.mkdir()
    (first / "search.yaml").write_text(f"searcher: {searcher}\nnum_trials: {n}\n{QUICK_REFERENCE}")
    proc = _start(["search", "search.yaml"], first)
    try:
        lines = _read_until(proc, lambda ls: sum(bool(LINE.match(x)) for x in ls) >= k)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    before = _progress(lines)
    assert len(before) >= k and all(s == "ok" for s, _ in before.values()), "\n".join(lines[-30:])
    search_dir = _search_dir(first)
    assert not (search_dir / "summary.json").exists()
    config = (search_dir / "config.yaml").read_text()
    uri = f"sqlite:///{first / 'mlflow.db'}"
    assert f"tracking_uri: {uri}" in config  # absolute: found again from any directory
    _, runs_before = _children_by_trial(uri)
    finished_before = {tid: c for tid, c in runs_before.items() if c.info.status == "FINISHED"}
    assert set(before) <= set(finished_before)
    counters_before = _searcher_counters(search_dir, searcher)

    # Resume from another working directory, without the first one's environment.
    resumed = run_cli(["resume", search_dir], elsewhere)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert f"[{n}/{n}]" in resumed.stdout
    assert not (elsewhere / "mlflow.db").exists() and not (elsewhere / "haqtune_runs").exists()

    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["num_trials"] == n
    parents, runs_after = _children_by_trial(uri)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs_after) == n
    assert all(c.info.status == "FINISHED" for c in runs_after.values())
    # Tune's view: results.csv is the restored ResultGrid.
    import pandas as pd

    tune_rows = pd.read_csv(search_dir / "results.csv").set_index("trial_id")
    assert len(tune_rows) == n and set(tune_rows.index) == set(runs_after)
    for tid, run in finished_before.items():
        after = runs_after[tid]
        assert after.info.run_id == run.info.run_id  # the same run, not a re-created one
        assert after.data.metrics["val_acc"] == run.data.metrics["val_acc"]
        assert after.data.params["policy"] == run.data.params["policy"]
        assert tune_rows.loc[tid, "val_acc"] == pytest.approx(run.data.metrics["val_acc"], abs=0)
        assert tune_rows.loc[tid, "policy"] == run.data.params["policy"]
        # Not trained again: its first epoch was reported once (a trial whose final
        # report raced the kill may repeat that report, from its checkpoint).
        assert _val_acc_steps(uri, run.info.run_id).count(1) == 1
    for tid, (_, desc) in before.items():
        assert f"val_acc={tune_rows.loc[tid, 'val_acc']:.4f}" in desc

    counters_after = _searcher_counters(search_dir, searcher)
    if searcher == "haq":
        assert counters_after["episodes_completed"] >= counters_before["episodes_completed"]
        assert counters_after["replay"] >= counters_before["replay"]
        # Every trial is one episode: none suggested twice, none lost.
        assert counters_after["episodes_suggested"] == n and counters_after["episodes_completed"] == n
    else:
        assert counters_after["study_trials"] >= counters_before["study_trials"]
        assert counters_after["study_complete"] == n

    best = summary["best"][0]
    assert best["checkpoint_val_acc"] == best["val_acc"]  # the reported model is the trial's own
    # The search's own files are readable by the commands taking that kind of file.
    cost = run_cli(["cost", "--model", "demo", "--hardware", "bitfusion", "--policy",
                    search_dir / "best_policy.json", "--json"], elsewhere, timeout=120)
    assert cost.returncode == 0, cost.stderr
    assert json.loads(cost.stdout)["latency_ms"] == pytest.approx(best["latency_ms"])


def test_ctrl_c_then_resume_with_failing_trials(tmp_path):
    n = 6
    # Trial 1 raises and trial 2 diverges on every attempt; trial 3's worker is killed once.
    faults = {"HAQTUNE_TEST_FAULTS": "raise@1,nan@2,kill@3:1", "HAQTUNE_TEST_FAULTS_DIR": str(tmp_path / "faults")}
    (tmp_path / "faults.yaml").write_text(f"num_trials: {n}\nmax_failures: 1\nsearcher: random\n{QUICK_REFERENCE}")
    proc = _start(["search", "faults.yaml"], tmp_path, faults)
    lines = _read_until(proc, lambda ls: sum(bool(LINE.match(x)) for x in ls) >= 3)
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in a terminal signals the whole group
    rest, _ = proc.communicate(timeout=180)
    lines += rest.splitlines()
    out = "\n".join(lines)
    assert proc.returncode == 130, out[-3000:]
    search_dir = _search_dir(tmp_path)
    assert f"haqtune resume {search_dir}" in out
    assert not (search_dir / "summary.json").exists()  # no test evaluation
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    parents, runs = _children_by_trial(uri)
    assert parents[0].info.status == "KILLED"
    assert all(c.info.status in ("FINISHED", "FAILED", "KILLED") for c in runs.values())

    resumed = run_cli(["resume", search_dir], tmp_path, env=faults)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    out += "\n" + resumed.stdout
    parents, runs = _children_by_trial(uri)
    assert parents[0].info.status == "FINISHED" and len(runs) == n
    statuses = sorted(c.info.status for c in runs.values())
    assert statuses == ["FAILED", "FAILED"] + ["FINISHED"] * (n - 2), statuses
    # Failures are visible: the exception's last line and the error file, in the terminal
    # and in MLflow.
    progress = _progress(out.splitlines())
    failed = {tid: desc for tid, (status, desc) in progress.items() if status == "FAILED"}
    assert len(failed) == 2, out[-4000:]
    assert any("RuntimeError: injected fault" in d for d in failed.values())
    assert any("DivergedError" in d for d in failed.values())
    for tid, desc in failed.items():
        error_file = Path(re.search(r"\(error file: (.*?)\) \| best", desc).group(1))
        assert error_file.is_file() and search_dir in error_file.parents
        run = runs[tid]
        assert run.data.tags["haqtune.error"] in desc
        from mlflow.tracking import MlflowClient

        artifacts = [a.path for a in MlflowClient(uri).list_artifacts(run.info.run_id)]
        assert "error.txt" in artifacts
    assert "retrying" in out  # the killed worker's trial was retried
    summary = json.loads((search_dir / "summary.json").read_text())
    assert summary["num_trials"] == n and summary["failed_trials"] == 2


def test_resume_bad_directory(tmp_path):
    proc = run_cli(["resume", tmp_path / "nope"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("haqtune: error: ") and "not a haqtune search directory" in proc.stderr
