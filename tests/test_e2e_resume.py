"""Resume after a killed driver: exactly the requested trials, none lost or duplicated."""

import json
import os
import signal
import subprocess
import time

import pytest

from e2e import HAQTUNE, run_cli, runs_of

pytestmark = pytest.mark.slow


def test_resume_after_killed_driver(tmp_path):
    n = 6
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.Popen([HAQTUNE, "search", "--num-trials", str(n), "--searcher", "tpe"],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True, stdin=subprocess.DEVNULL)
    seen = []
    deadline = time.time() + 300
    try:
        for line in proc.stdout:
            seen.append(line)
            if line.startswith(f"[2/{n}]") or time.time() > deadline:
                break
    finally:
        # Kill the driver and every Ray process it started, as a crash would.
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    assert any(line.startswith(f"[2/{n}]") for line in seen), "".join(seen)[-3000:]
    search_dirs = [p for p in (tmp_path / "haqtune_runs").iterdir() if not p.name.startswith("_")]
    assert len(search_dirs) == 1
    assert not (search_dirs[0] / "summary.json").exists()

    resumed = run_cli(["resume", search_dirs[0]], tmp_path)
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-3000:]
    assert f"[{n}/{n}]" in resumed.stdout

    summary = json.loads((search_dirs[0] / "summary.json").read_text())
    assert summary["num_trials"] == n
    parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1
    trial_ids = [c.data.tags["haqtune.trial_id"] for c in children]
    assert len(children) == n and len(set(trial_ids)) == n, trial_ids
    assert all(c.info.status == "FINISHED" for c in children)
    assert parents[0].info.status == "FINISHED"


def test_resume_bad_directory(tmp_path):
    proc = run_cli(["resume", tmp_path / "nope"], tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("haqtune: error: ") and "not a haqtune search directory" in proc.stderr
