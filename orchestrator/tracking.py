"""MLflow adapter: the only module that imports ``mlflow``.

One experiment per study (classic ML kind), one parent run per search, one nested
child run per trial. Everything is written from the driver by a Ray Tune callback
with ``MlflowClient.log_batch`` (one call per report, not one per value). The
trial -> run mapping is persisted in the search directory, so a resumed search
reattaches to the same runs instead of duplicating them.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from ray.tune import Callback

from search_spaces import config_from_policy, parse_policy
from search_spaces import metrics as M

from .config import atomic_write_text

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3: "custom_model_development" is the classic ML / model-training experiment kind.
EXPERIMENT_KIND = "custom_model_development"
PARENT_RUN_TAG = "mlflow.parentRunId"
TAG_SEARCH_ID = "haqtune.search_id"
TAG_TRIAL_ID = "haqtune.trial_id"
TAG_SEARCHER = "haqtune.searcher"
TAG_ROLE = "haqtune.role"  # "search" (parent) or "trial" (child)
RUN_MAP_FILE = "mlflow_runs.json"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    import os

    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def get_or_create_experiment(client, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is None:
        return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp.experiment_id


def experiment_url(base: str, experiment_id: str) -> str:
    """MLflow 3 opens experiments on the GenAI overview; this URL opens the runs table."""
    return f"{base.rstrip('/')}/#/experiments/{experiment_id}?workflowType=machine_learning"


def _numeric_metrics(result: dict) -> dict[str, float]:
    keys = (M.VAL_ACC, M.ACC_DROP, M.REF_ACC, M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB, M.REWARD, M.TEST_ACC)
    return {k: float(result[k]) for k in keys if isinstance(result.get(k), int | float)}


class MlflowTracker(Callback):
    """Ray Tune callback logging a search to MLflow (see module docstring)."""

    def __init__(self, *, tracking_uri: str, experiment: str, search_id: str, searcher: str,
                 search_dir: Path, params: dict, config_path: Path | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.search_id = search_id
        self.searcher = searcher
        self.search_dir = Path(search_dir)
        self.params = params
        self.config_path = config_path
        self.client = None
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self.completed: list[str] = []  # trial ids, in completion order
        self.best_val_acc: float | None = None
        self._params_logged: set[str] = set()
        self._load_mapping()

    def __getstate__(self):
        # Ray pickles the RunConfig (callbacks included) into tuner.pkl; a client is
        # process-local and is rebuilt by ``start``.
        state = self.__dict__.copy()
        state["client"] = None
        return state

    # ---- persistence ------------------------------------------------------------

    @property
    def mapping_path(self) -> Path:
        return self.search_dir / RUN_MAP_FILE

    def _load_mapping(self) -> None:
        if self.mapping_path.exists():
            state = json.loads(self.mapping_path.read_text())
            self.experiment_id = state.get("experiment_id")
            self.parent_run_id = state.get("parent_run_id")
            self.trial_runs = dict(state.get("trial_runs", {}))
            self.completed = list(state.get("completed", []))
            self.best_val_acc = state.get("best_val_acc")

    def _save_mapping(self) -> None:
        atomic_write_text(self.mapping_path, json.dumps({
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "trial_runs": self.trial_runs,
            "completed": self.completed,
            "best_val_acc": self.best_val_acc,
        }, indent=1))

    # ---- parent run -------------------------------------------------------------

    def start(self) -> None:
        """Create (or reattach to) the experiment and the parent run."""
        from mlflow.entities import Param, RunTag

        self.client = _client(self.tracking_uri)
        if self.parent_run_id is not None:
            self.client.update_run(self.parent_run_id, status="RUNNING")
            return
        self.experiment_id = get_or_create_experiment(self.client, self.experiment)
        run = self.client.create_run(self.experiment_id, run_name=self.search_id, tags={
            TAG_SEARCH_ID: self.search_id, TAG_SEARCHER: self.searcher, TAG_ROLE: "search",
        })
        self.parent_run_id = run.info.run_id
        self.client.log_batch(self.parent_run_id, params=[
            Param(k, str(v)) for k, v in self.params.items()
        ], tags=[RunTag("mlflow.note.content", f"haqtune search {self.search_id} ({self.searcher})")])
        if self.config_path is not None:
            self.client.log_artifact(self.parent_run_id, str(self.config_path))
        self._save_mapping()

    def setup(self, **info) -> None:
        if self.client is None:
            self.start()

    # ---- trial runs -------------------------------------------------------------

    def _child(self, trial) -> str:
        run_id = self.trial_runs.get(trial.trial_id)
        if run_id is None:
            run = self.client.create_run(self.experiment_id, run_name=trial.trial_id, tags={
                PARENT_RUN_TAG: self.parent_run_id, TAG_SEARCH_ID: self.search_id,
                TAG_TRIAL_ID: trial.trial_id, TAG_SEARCHER: self.searcher, TAG_ROLE: "trial",
            })
            run_id = self.trial_runs[trial.trial_id] = run.info.run_id
            self._save_mapping()
        return run_id

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._child(trial)

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        from mlflow.entities import Metric, Param

        run_id = self._child(trial)
        step = int(result.get(M.EPOCH, result.get("training_iteration", 0)))
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, step) for k, v in _numeric_metrics(result).items()]
        params = []
        # Params are the projected (evaluated) bits, logged once per trial.
        if M.POLICY in result and trial.trial_id not in self._params_logged:
            policy = parse_policy(result[M.POLICY])
            params = [Param(k, str(v)) for k, v in config_from_policy(policy).items()]
            self._params_logged.add(trial.trial_id)
        self.client.log_batch(run_id, metrics=metrics, params=params)

    def _finish(self, trial, status: str) -> None:
        from mlflow.entities import Metric

        run_id = self._child(trial)
        result = trial.last_result or {}
        if trial.trial_id not in self.completed:
            self.completed.append(trial.trial_id)
            acc = result.get(M.VAL_ACC)
            if status != "FAILED" and isinstance(acc, int | float):
                self.best_val_acc = acc if self.best_val_acc is None else max(self.best_val_acc, acc)
            if self.best_val_acc is not None:
                self.client.log_batch(self.parent_run_id, metrics=[Metric(
                    "best_val_acc", float(self.best_val_acc), int(time.time() * 1000), len(self.completed))])
        self.client.set_terminated(run_id, status=status)
        self._save_mapping()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        # A trial whose last report is not the final one was stopped early by the scheduler.
        self._finish(trial, "FINISHED" if result.get(M.DONE, 1) else "KILLED")

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._finish(trial, "FAILED")

    # ---- end of search ----------------------------------------------------------

    def log_summary(self, metrics: dict[str, float], artifacts: dict[str, str]) -> None:
        """Final parent metrics and text artifacts (``name -> content``)."""
        import tempfile

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.parent_run_id, metrics=[
            Metric(k, float(v), now, 0) for k, v in metrics.items()
        ])
        with tempfile.TemporaryDirectory() as tmp:
            for name, content in artifacts.items():
                path = Path(tmp) / name
                if isinstance(content, bytes):
                    path.write_bytes(content)
                else:
                    path.write_text(content)
                self.client.log_artifact(self.parent_run_id, str(path))

    def ui_hint(self) -> str:
        """Where a user sees this search: the server's URL, or how to start ``haqtune ui``."""
        if self.tracking_uri.startswith(("http://", "https://")):
            return experiment_url(self.tracking_uri, self.experiment_id)
        return (f"run `haqtune ui --experiment {self.experiment}` and open "
                f"{experiment_url('http://127.0.0.1:5000', self.experiment_id)}")

    def end(self, status: str = "FINISHED") -> None:
        if self.client is not None and self.parent_run_id is not None:
            self.client.set_terminated(self.parent_run_id, status=status)
