"""MLflow tracking: run schema, one log_batch per report, resume without duplicates,
an unreachable or late tracking server, and a real ``mlflow server`` over HTTP.

The tracker is driven through its Ray Tune callback API with small trial objects (a
``trial_id`` and a ``last_result``, as Tune passes them); every test writes to a real
MLflow store (sqlite, or a real server process), nothing is mocked.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import pickle
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from orchestrator.tracking import (
    EXPERIMENT_KIND,
    RUN_MAP_FILE,
    RUNS_VIEW_KEY,
    RUNS_VIEW_TAG,
    MlflowTracker,
    RetryPolicy,
)
from search_spaces import metrics as M

POLICY = "8/8 4/6 2/3"
PARAMS = {"searcher": "random", "hardware": "bismo-edge", "budget": "latency=0.5", "model": "demo",
          "dataset": "digits", "seed": 0, "num_trials": 3, "max_concurrent": 2}
FAST_RETRY = RetryPolicy(timeout_s=0.3, first_delay_s=0.05, final_timeout_s=0.3,
                         reconnect_first_s=0.05, reconnect_max_s=0.2, request_timeout_s=2)


# ---- helpers shared with test_report.py --------------------------------------------


def empty_store(tmp_path_factory, dest: Path) -> str:
    """A migrated, empty sqlite store at ``dest`` (copied from a per-session template:
    creating MLflow's tables takes seconds, copying the file takes none)."""
    template = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not template.exists():
        from mlflow.tracking import MlflowClient

        building = template.with_suffix(".building")
        MlflowClient(f"sqlite:///{building}").search_experiments()
        os.replace(building, template)
    shutil.copy(template, dest)
    return f"sqlite:///{dest}"


class FakeTrial:
    """What the tracker reads of a Ray Tune ``Trial``."""

    def __init__(self, trial_id: str) -> None:
        self.trial_id = trial_id
        self.last_result: dict = {}


def report(acc: float, epoch: int, *, final: bool, latency_ms: float = 1.0, policy: str = POLICY) -> dict:
    return {M.VAL_ACC: acc, M.REF_ACC: 0.98, M.ACC_DROP: 0.98 - acc, M.LATENCY_MS: latency_ms,
            M.ENERGY_MJ: 2.0 * latency_ms, M.SIZE_MB: 0.01, M.REWARD: 0.1 * (acc - 0.98),
            M.EPOCH: epoch, M.DONE: int(final), M.POLICY: policy, "training_iteration": epoch}


def play(tracker, trial_id: str, accs, *, final: bool = True, error: bool = False, latency_ms: float = 1.0,
         start: bool = True, complete: bool = True) -> FakeTrial:
    """One trial as Tune reports it: start, one result per epoch, complete (or error)."""
    trial = FakeTrial(trial_id)
    if start:
        tracker.on_trial_start(0, [], trial)
    for epoch, acc in enumerate(accs, 1):
        trial.last_result = report(acc, epoch, final=final and epoch == len(accs), latency_ms=latency_ms)
        tracker.on_trial_result(0, [], trial, trial.last_result)
    if error:
        tracker.on_trial_error(0, [], trial)
    elif complete:
        tracker.on_trial_complete(0, [], trial)
    return trial


def make_tracker(uri: str, search_dir: Path, *, search_id: str = "random-s1", searcher: str = "random",
                 experiment: str = "haqtune", retry: RetryPolicy | None = None) -> MlflowTracker:
    search_dir.mkdir(parents=True, exist_ok=True)
    config = search_dir / "config.yaml"
    if not config.exists():
        config.write_text(f"searcher: {searcher}\n")
    return MlflowTracker(tracking_uri=uri, experiment=experiment, search_id=search_id, searcher=searcher,
                         search_dir=search_dir, params={**PARAMS, "searcher": searcher},
                         config_path=config, retry=retry)


def runs(uri: str, experiment: str = "haqtune"):
    """(client, parents, children by trial id)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    found = client.search_runs([exp.experiment_id], max_results=1000)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    nested = [r for r in found if "mlflow.parentRunId" in r.data.tags]
    children = {r.data.tags["haqtune.trial_id"]: r for r in nested}
    assert len(children) == len(nested), "duplicate child runs"
    return client, parents, children


def history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def store(tmp_path, tmp_path_factory, monkeypatch):
    # Artifacts of a sqlite store go to ./mlruns: keep them in the test's directory.
    monkeypatch.chdir(tmp_path)
    return empty_store(tmp_path_factory, tmp_path / "mlflow.db")


# ---- schema ------------------------------------------------------------------------


def test_run_schema_statuses_and_best_so_far(store, tmp_path):
    tracker = make_tracker(store, tmp_path / "search")
    tracker.start()
    play(tracker, "t_00000", [0.70, 0.80])                 # finished
    play(tracker, "t_00001", [0.60], final=False)          # stopped early by the scheduler
    play(tracker, "t_00002", [0.90], error=True)           # crashed: its accuracy does not count
    play(tracker, "t_00003", [0.85])
    tracker.log_summary({"best_val_acc": 0.85, "latency_reduction_x": 2.0}, {"results.csv": "a,b\n1,2\n"})
    tracker.end()
    assert not tracker.pending

    client, parents, children = runs(store)
    experiment = client.get_experiment_by_name("haqtune")
    assert experiment.tags["mlflow.experimentKind"] == EXPERIMENT_KIND
    # The saved runs-table view the printed URL opens: haqtune's columns.
    view = json.loads(experiment.tags[RUNS_VIEW_TAG])
    assert view["name"] and "metrics.`best_val_acc`" in json.loads(view["state"])["selectedColumns"]
    assert f"/#/experiments/{experiment.experiment_id}/runs?workflowType=machine_learning" in tracker.ui_hint()
    assert f"viewStateShareKey={RUNS_VIEW_KEY}" in tracker.ui_hint()
    (parent,) = parents
    assert parent.info.status == "FINISHED" and parent.info.run_name == "random-s1"
    tags = parent.data.tags
    assert tags["haqtune.search_id"] == "random-s1" and tags["haqtune.searcher"] == "random"
    assert tags["mlflow.runName"] == "random-s1" and tags["haqtune.role"] == "search"
    assert {k: str(v) for k, v in PARAMS.items()}.items() <= parent.data.params.items()
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"config.yaml", "results.csv"} <= artifacts
    assert (tmp_path / "search" / "results.csv").read_text() == "a,b\n1,2\n"  # kept beside the state
    # Best-so-far: step = trials completed; the failed trial's 0.90 is ignored.
    assert history(client, parent.info.run_id, "best_val_acc") == [
        (1, 0.80), (2, 0.80), (3, 0.80), (4, 0.85), (4, 0.85)]
    assert parent.data.metrics["latency_reduction_x"] == 2.0

    assert set(children) == {"t_00000", "t_00001", "t_00002", "t_00003"}
    statuses = {tid: run.info.status for tid, run in children.items()}
    assert statuses == {"t_00000": "FINISHED", "t_00001": "KILLED", "t_00002": "FAILED", "t_00003": "FINISHED"}
    child = children["t_00000"]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert child.data.tags["haqtune.trial_id"] == "t_00000" and child.data.tags["haqtune.searcher"] == "random"
    assert child.data.tags["haqtune.search_id"] == "random-s1" and child.info.run_name == "t_00000"
    assert child.data.params == {"w_0": "8", "a_0": "8", "w_1": "4", "a_1": "6", "w_2": "2", "a_2": "3",
                                 "policy": POLICY}
    assert history(client, child.info.run_id, M.VAL_ACC) == [(1, 0.70), (2, 0.80)]
    assert set(M.FINAL_METRICS) <= set(child.data.metrics)
    assert child.data.metrics[M.LATENCY_MS] == 1.0
    assert child.info.start_time <= child.info.end_time


def test_one_log_batch_per_report(store, tmp_path):
    class CountingClient:
        """The real client, counting log_batch calls per run (it still writes to the store)."""

        def __init__(self, client):
            self._client, self.calls = client, {}

        def log_batch(self, run_id, **kwargs):
            self.calls[run_id] = self.calls.get(run_id, 0) + 1
            return self._client.log_batch(run_id, **kwargs)

        def __getattr__(self, name):
            return getattr(self._client, name)

    from mlflow.tracking import MlflowClient

    tracker = make_tracker(store, tmp_path / "search")
    tracker.client = counting = CountingClient(MlflowClient(store))
    tracker.start()
    play(tracker, "t_00000", [0.5, 0.6, 0.7])  # 3 reports -> 3 calls (params ride along the first)
    play(tracker, "t_00001", [0.8])
    tracker.log_summary({"best_val_acc": 0.8, "best_test_acc": 0.79}, {})
    tracker.end()
    _, (parent,), children = runs(store)
    assert counting.calls[children["t_00000"].info.run_id] == 3
    assert counting.calls[children["t_00001"].info.run_id] == 1
    # Parent: params once, best-so-far once per completed trial, the summary once.
    assert counting.calls[parent.info.run_id] == 1 + 2 + 1
    assert len(children["t_00000"].data.params) == 7


# ---- resume ------------------------------------------------------------------------


def test_reattach_never_duplicates_runs(store, tmp_path):
    search_dir = tmp_path / "search"
    first = make_tracker(store, search_dir)
    first.start()
    play(first, "t_00000", [0.7])
    play(first, "t_00001", [0.5], complete=False)  # in flight when the driver dies
    # The driver dies without end(); Tune pickles callbacks into tuner.pkl, so the
    # restored tracker comes back through pickle (fresh trackers read the same file).
    restored = pickle.loads(pickle.dumps(first))
    assert restored.parent_run_id == first.parent_run_id and restored.completed == ["t_00000"]
    # A crash between creating a run and saving the mapping: the run is found by its tags.
    state = json.loads((search_dir / RUN_MAP_FILE).read_text())
    del state["trial_runs"]["t_00001"]
    (search_dir / RUN_MAP_FILE).write_text(json.dumps(state))

    second = make_tracker(store, search_dir)
    second.start()
    play(second, "t_00001", [0.5, 0.6])  # restarted by resume_errored / unfinished
    play(second, "t_00002", [0.9])
    second.end()

    client, parents, children = runs(store)
    assert len(parents) == 1 and parents[0].info.run_id == first.parent_run_id
    assert parents[0].info.status == "FINISHED"
    assert sorted(children) == ["t_00000", "t_00001", "t_00002"]
    assert children["t_00001"].info.run_id == first.trial_runs["t_00001"]
    assert all(run.info.status == "FINISHED" for run in children.values())
    assert history(client, parents[0].info.run_id, "best_val_acc") == [(1, 0.7), (2, 0.7), (3, 0.9)]


def test_runs_of_trials_the_restored_experiment_forgot_are_deleted(store, tmp_path):
    # The driver died after trial t_00001 started but before Tune checkpointed it: the
    # restored experiment never has it (the searcher suggests t_00002 instead).
    search_dir = tmp_path / "search"
    first = make_tracker(store, search_dir)
    first.start()
    play(first, "t_00000", [0.7])
    play(first, "t_00001", [0.5], complete=False)
    second = make_tracker(store, search_dir)
    second.start()
    t2 = play(second, "t_00002", [0.8])
    second.on_experiment_end([FakeTrial("t_00000"), t2])
    second.end()

    client, parents, children = runs(store)  # active runs only
    assert sorted(children) == ["t_00000", "t_00002"]
    deleted = client.get_run(first.trial_runs["t_00001"])
    assert deleted.info.lifecycle_stage == "deleted"
    assert "t_00001" not in json.loads((search_dir / RUN_MAP_FILE).read_text())["trial_runs"]


# ---- unreachable server ------------------------------------------------------------


def test_unreachable_server_buffers_and_a_later_tracker_delivers(store, tmp_path, caplog):
    dead = f"http://127.0.0.1:{free_port()}"
    search_dir = tmp_path / "search"
    tracker = make_tracker(dead, search_dir, retry=FAST_RETRY)
    started = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="haqtune.tracking"):
        tracker.start()
        play(tracker, "t_00000", [0.6, 0.7])
        play(tracker, "t_00001", [0.8], final=False)
        tracker.log_summary({"best_val_acc": 0.8}, {"results.csv": "x\n"})
        tracker.end()  # never raises
    assert time.monotonic() - started < 15  # bounded back-off, not MLflow's minutes of retries
    unreachable = [r for r in caplog.records if "unreachable (" in r.getMessage()]
    assert len(unreachable) == 1  # warned once
    assert tracker.pending and "unreachable" in tracker.ui_hint()
    kept = json.loads((search_dir / RUN_MAP_FILE).read_text())["pending"]
    assert len(kept) == len(tracker.pending)

    # The server is back (here: the store itself): the next tracker sends everything in order.
    time.sleep(0.05)
    delivered_ms = int(time.time() * 1000)
    later = make_tracker(store, search_dir)
    later.start()
    later.end()
    assert not later.pending
    client, (parent,), children = runs(store)
    assert parent.info.status == "FINISHED" and parent.data.params["hardware"] == "bismo-edge"
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "results.csv"}
    assert {t: r.info.status for t, r in children.items()} == {"t_00000": "FINISHED", "t_00001": "KILLED"}
    assert history(client, children["t_00000"].info.run_id, M.VAL_ACC) == [(1, 0.6), (2, 0.7)]
    assert history(client, parent.info.run_id, "best_val_acc")[:2] == [(1, 0.7), (2, 0.8)]
    # Buffered runs keep the times the trials really had, not the time they were sent.
    first, second = children["t_00000"].info, children["t_00001"].info
    assert first.start_time <= first.end_time <= second.start_time <= second.end_time < delivered_ms
    assert parent.info.start_time <= first.start_time


# ---- a real tracking server --------------------------------------------------------


class MlflowServer:
    """A real ``mlflow server`` subprocess on a port chosen up front (started on demand)."""

    def __init__(self, root: Path) -> None:
        self.root, self.port, self.proc = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self, store_uri: str, timeout_s: float = 120) -> None:
        if self.proc is not None:
            return
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store_uri,
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            cwd=self.root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, "mlflow server exited"
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{self.uri}/health", timeout=2).status == 200:
                    return
            time.sleep(0.5)
        raise AssertionError(f"mlflow server not up after {timeout_s} s")

    def stop(self) -> None:
        if self.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)  # the server and its workers
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=20)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    srv = MlflowServer(root)
    srv.store_uri = empty_store(tmp_path_factory, root / "server.db")
    yield srv
    srv.stop()


@pytest.mark.slow
def test_server_started_late_receives_everything(server, tmp_path):
    """The tracker starts while nothing listens on the port, keeps buffering through a
    trial, then the real server comes up and the rest of the search reaches it."""
    tracker = make_tracker(server.uri, tmp_path / "search", search_id="late-s1", experiment="late",
                           retry=FAST_RETRY)
    tracker.start()
    play(tracker, "t_00000", [0.6, 0.7])
    assert tracker.pending and tracker.parent_run_id is None
    server.start(server.store_uri)
    time.sleep(FAST_RETRY.reconnect_max_s)  # past the reconnect delay
    play(tracker, "t_00001", [0.8])
    assert not tracker.pending  # flushed at the first successful call
    tracker.end()
    client, (parent,), children = runs(server.uri, "late")
    assert parent.info.status == "FINISHED" and sorted(children) == ["t_00000", "t_00001"]
    assert history(client, children["t_00000"].info.run_id, M.VAL_ACC) == [(1, 0.6), (2, 0.7)]
    assert history(client, parent.info.run_id, "best_val_acc") == [(1, 0.7), (2, 0.8)]


# Small on purpose (2 shared cores): 3 one-epoch trials, a short reference, one test re-run.
FAST_CONFIG = ("num_trials: 3\nmax_concurrent: 2\ntest_top_k: 1\n"
               "finetune: {epochs: 1, lr: 0.01, batch_size: 64}\n"
               "reference: {epochs: 3, lr: 0.05, batch_size: 64, weight_decay: 0.0001}\nfinal_finetune: null\n")


@pytest.fixture(scope="module")
def storage_dir(tmp_path_factory):
    """Shared by the end-to-end searches here: the reference model is trained once."""
    return tmp_path_factory.mktemp("runs")


def _search_dir(stdout: str) -> Path:
    (line,) = [line for line in stdout.splitlines() if line.startswith("haqtune: results in ")]
    return Path(line.removeprefix("haqtune: results in "))


@pytest.mark.slow
def test_search_logs_to_a_real_server_over_http(server, storage_dir, tmp_path):
    from e2e import run_cli

    server.start(server.store_uri)
    (tmp_path / "fast.yaml").write_text(FAST_CONFIG)
    proc = run_cli(["search", "fast.yaml", "--tracking-uri", server.uri, "--experiment", "http",
                    "--storage-dir", storage_dir], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"{server.uri}/#/experiments/" in proc.stdout and "workflowType=machine_learning" in proc.stdout
    assert "unreachable (" not in proc.stderr
    client, (parent,), children = runs(server.uri, "http")
    assert parent.info.status == "FINISHED" and len(children) == 3
    assert all(c.info.status == "FINISHED" and c.data.params["w_0"] for c in children.values())
    for key in ("best_val_acc", "best_test_acc", "latency_reduction_x", "energy_reduction_x",
                "size_reduction_x", "uniform8_latency_ms"):
        assert key in parent.data.metrics, key
    assert parent.data.metrics["energy_reduction_x"] >= 2.0 - 1e-6  # budget energy=0.5 (the default)
    assert parent.data.metrics["uniform_in_budget_energy_mj"] <= parent.data.metrics["uniform8_energy_mj"] / 2
    artifacts = {a.path: a.file_size for a in client.list_artifacts(parent.info.run_id)}
    for name in ("config.yaml", "results.csv", "best_policy.json", "policy.png", "pareto.png"):
        assert artifacts.get(name), name
    assert not (tmp_path / "mlflow.db").exists()


@pytest.mark.slow
def test_search_with_unreachable_tracking_server_completes(storage_dir, tmp_path):
    from e2e import run_cli

    (tmp_path / "fast.yaml").write_text(FAST_CONFIG)
    dead = f"http://127.0.0.1:{free_port()}"
    proc = run_cli(["search", "fast.yaml", "--num-trials", 2, "--tracking-uri", dead,
                    "--storage-dir", storage_dir], tmp_path, env={"HAQTUNE_MLFLOW_RETRY_S": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "[2/2]" in proc.stdout and "policy w/a per layer" in proc.stdout
    assert sum("unreachable (" in line for line in proc.stderr.splitlines()) == 1, proc.stderr[-2000:]
    search_dir = _search_dir(proc.stdout)
    assert json.loads((search_dir / RUN_MAP_FILE).read_text())["pending"]
    assert (search_dir / "summary.json").exists() and (search_dir / "policy.png").stat().st_size > 0
