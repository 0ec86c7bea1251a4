"""Reports: search plots, ``haqtune compare`` over a real sqlite store, ``haqtune ui``."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.request

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner
from test_tracking import empty_store, free_port, make_tracker, play

from orchestrator.cli import main
from orchestrator.report import compare_searches, pareto_mask, search_artifacts
from search_spaces import metrics as M

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_pareto_mask_min_cost_max_accuracy():
    cost = [1.0, 2.0, 2.0, 3.0, 0.5, 4.0]
    acc = [0.7, 0.9, 0.8, 0.85, 0.6, 0.9]
    # 0.5/0.6, 1/0.7, 2/0.9 are undominated; 2/0.8, 3/0.85 and 4/0.9 (a tie, but costlier) are not.
    assert pareto_mask(cost, acc).tolist() == [True, True, False, False, True, False]
    assert pareto_mask([], []).tolist() == []


def _frame():
    rng = np.random.default_rng(0)
    n = 12
    return pd.DataFrame({
        "trial_id": [f"t{i}" for i in range(n)],
        "status": ["FINISHED"] * 9 + ["KILLED", "KILLED", "FAILED"],
        M.VAL_ACC: [*rng.uniform(0.6, 0.95, n - 1), np.nan],
        M.LATENCY_MS: [*rng.uniform(0.1, 0.25, n - 1), np.nan],
        M.ENERGY_MJ: rng.uniform(0.1, 0.3, n),
        M.SIZE_MB: rng.uniform(0.004, 0.008, n),
        M.POLICY: ["8/8 4/4 2/3"] * n,
    })


def test_search_plots_are_pngs(tmp_path):
    frame = _frame()
    best = frame.iloc[int(frame[M.VAL_ACC].idxmax())].to_dict()
    out = search_artifacts(frame, best, layer_names=["conv0", "dw1", "fc"],
                           layer_kinds=["conv", "depthwise", "linear"], cost_metric=M.LATENCY_MS,
                           reference={M.LATENCY_MS: 0.47}, budget_limit=0.235, ref_acc=0.98, label="s1")
    assert set(out) == {"policy.png", "pareto.png"}
    for name, data in out.items():
        assert data.startswith(PNG_MAGIC) and len(data) > 5_000, name
        (tmp_path / name).write_bytes(data)
    # No finished trial at all: still a (near-empty) Pareto plot, no policy chart.
    empty = frame.assign(**{M.VAL_ACC: np.nan})
    assert set(search_artifacts(empty, None, layer_names=["a", "b", "c"])) == {"pareto.png"}


@pytest.fixture
def two_searches(tmp_path, tmp_path_factory, monkeypatch):
    """A store with two searches (random, tpe) logged through the tracker callbacks."""
    monkeypatch.chdir(tmp_path)
    uri = empty_store(tmp_path_factory, tmp_path / "mlflow.db")
    for search_id, searcher, accs, reduction in (("random-s1", "random", [0.5, 0.9, 0.7, 0.95], 2.1),
                                                 ("tpe-s2", "tpe", [0.8, 0.9, 0.85, 0.895], 2.4)):
        tracker = make_tracker(uri, tmp_path / search_id, search_id=search_id, searcher=searcher)
        tracker.start()
        for i, acc in enumerate(accs):
            play(tracker, f"{searcher}_{i:05d}", [acc], latency_ms=0.2 + 0.01 * i)
            time.sleep(0.005)  # distinct completion times
        tracker.log_summary({"best_val_acc": max(accs), "best_test_acc": max(accs) - 0.01,
                             "best_latency_ms": 0.2, "best_energy_mj": 0.3, "best_size_mb": 0.005,
                             "latency_reduction_x": reduction, "energy_reduction_x": 1.5,
                             "size_reduction_x": 1.7,
                             **({"uniform_in_budget_test_acc": 0.9} if searcher == "tpe" else {})}, {})
        tracker.end()
    return uri


def test_compare_two_searches(two_searches, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(main, ["compare", "--tracking-uri", two_searches, "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "random-s1" in result.output and "tpe-s2" in result.output and "trials@99%" in result.output
    frame = pd.read_csv(out / "compare.csv").set_index("searcher")
    assert list(frame.index) == ["random", "tpe"]  # best val_acc first
    assert frame.loc["random", "trials"] == 4 and frame.loc["tpe", "trials"] == 4
    assert frame.loc["random", "best_val_acc"] == pytest.approx(0.95)
    assert frame.loc["tpe", "latency_reduction_x"] == pytest.approx(2.4)
    # tpe's best test_acc 0.89 vs its uniform baseline's 0.9; random logged none.
    assert frame.loc["tpe", "vs_uniform_pts"] == pytest.approx(-1.0) and pd.isna(frame.loc["random", "vs_uniform_pts"])
    assert "vs_uniform_pts" in result.output and "-1.00" in result.output
    assert frame.loc["random", "budget"] == "latency=0.5" and frame.loc["tpe", "hardware"] == "bismo-edge"
    # 99% of the best: random needs its 4th trial (0.95), tpe its 2nd (0.9 >= 0.99 * 0.9).
    assert frame.loc["random", "trials_to_99pct"] == 4 and frame.loc["tpe", "trials_to_99pct"] == 2
    assert 0 <= frame.loc["tpe", "time_to_99pct_s"] <= frame.loc["tpe", "wall_time_s"]
    png = (out / "compare.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5_000


def test_compare_curves_follow_completion_order():
    def child(acc, end, status="FINISHED"):
        return {"parent_run_id": "p", "status": status, "start_time_ms": 0, "end_time_ms": end,
                "metrics": {M.VAL_ACC: acc}}

    parent = {"run_id": "p", "search_id": "s", "searcher": "x", "params": {}, "metrics": {},
              "start_time_ms": 0, "end_time_ms": 5000}
    kids = [child(0.9, 3000), child(0.5, 1000), child(0.99, 4000, "FAILED"), child(0.7, 2000)]
    frame, curves = compare_searches([parent], kids)
    assert curves["s"]["best_val_acc"].tolist() == [0.5, 0.7, 0.9, 0.9]
    assert frame.loc[0, "trials_to_99pct"] == 3 and frame.loc[0, "time_to_99pct_s"] == 3.0
    assert frame.loc[0, "failed"] == 1 and frame.loc[0, "best_val_acc"] == 0.9


def _one_line_error(result, message):
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("haqtune: error: ") and message in lines[0], result.stderr


def test_compare_and_ui_unknown_experiment_exit_2(two_searches):
    for command in ("compare", "ui"):
        result = CliRunner().invoke(main, [command, "--tracking-uri", two_searches, "--experiment", "nope"])
        _one_line_error(result, "unknown experiment 'nope'")
        assert "haqtune" in result.stderr  # the experiments that do exist


def test_missing_store_is_an_error_and_not_created(tmp_path):
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    for command in ("compare", "ui"):
        _one_line_error(CliRunner().invoke(main, [command, "--tracking-uri", uri]), "no MLflow store")
    assert not (tmp_path / "none.db").exists()
    dead = f"http://127.0.0.1:{free_port()}"  # fails at once: no minutes of HTTP retries
    _one_line_error(CliRunner().invoke(main, ["compare", "--tracking-uri", dead]), "cannot read")


def test_ui_port_in_use(two_searches):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        result = CliRunner().invoke(main, ["ui", "--tracking-uri", two_searches, "--port", str(port)])
    _one_line_error(result, f"port {port}")


@pytest.mark.slow
def test_ui_serves_the_runs_table(two_searches, tmp_path):
    from e2e import HAQTUNE

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    proc = subprocess.Popen([HAQTUNE, "ui", "--port", str(port), "--tracking-uri", two_searches],
                            cwd=tmp_path, env={**env, "PYTHONUNBUFFERED": "1"}, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert f"http://127.0.0.1:{port}/#/experiments/1/runs?workflowType=machine_learning" in line, line
        deadline = time.monotonic() + 120
        api = f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/get-by-name?experiment_name=haqtune"
        while True:
            assert proc.poll() is None, "haqtune ui exited"
            with contextlib.suppress(OSError), urllib.request.urlopen(api, timeout=2) as response:
                assert b'"experiment_id": "1"' in response.read().replace(b'":"', b'": "')
                break
            assert time.monotonic() < deadline, "MLflow UI not up in 120 s"
            time.sleep(0.5)
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C in the terminal
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
