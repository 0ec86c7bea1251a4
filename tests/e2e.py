"""Helpers for end-to-end tests: run the real ``haqtune`` console script, read the real MLflow store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

HAQTUNE = str(Path(sys.executable).with_name("haqtune"))


def run_cli(args, cwd, *, timeout=600, env=None):
    environ = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    environ.update(env or {})
    return subprocess.run([HAQTUNE, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=environ, stdin=subprocess.DEVNULL)


def runs_of(tracking_uri: str, experiment: str = "haqtune"):
    """(parent runs, child runs) of an experiment."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"experiment {experiment!r} missing"
    runs = client.search_runs([exp.experiment_id], max_results=10_000)
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    return parents, children
