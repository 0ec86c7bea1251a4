"""MLflow adapter: the only module that imports ``mlflow``.

One experiment per study (classic ML kind), one parent run per search, one nested
child run per trial. Everything is written from the driver by a Ray Tune callback
with ``MlflowClient.log_batch`` (one call per report, not one per value). The
trial -> run mapping is persisted in the search directory (local or a storage URI,
``orchestrator/storage.py``), so a resumed search reattaches to the same runs instead
of duplicating them.

An unreachable tracking server never stops a search: every write is an operation
in an ordered queue; each is sent with bounded exponential back-off, and while the
server is down the queue keeps growing in memory (and in the mapping file at each
trial's end) and is flushed, in order, at the next successful attempt or at the
end of the search. Runs are created lazily by the first operation that needs them,
with the times recorded when the trial really started and ended.

Reading side (``haqtune compare`` / ``haqtune ui``): ``load_searches`` and
``find_experiment`` turn a store into plain dicts, so ``report.py`` needs no mlflow.
"""

from __future__ import annotations

import contextlib
import getpass
import json
import logging
import os
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

from ray.tune import Callback

from search_spaces import config_from_policy, parse_policy
from search_spaces import metrics as M

from .errors import HaqtuneError
from .storage import Storage, is_uri, open_storage

EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
# MLflow 3: "custom_model_development" is the classic ML / model-training experiment kind.
EXPERIMENT_KIND = "custom_model_development"
PARENT_RUN_TAG = "mlflow.parentRunId"
RUN_NAME_TAG = "mlflow.runName"
TAG_SEARCH_ID = "haqtune.search_id"
TAG_TRIAL_ID = "haqtune.trial_id"
TAG_SEARCHER = "haqtune.searcher"
TAG_ERROR = "haqtune.error"  # a failed trial's exception, last line
TAG_NODE = "haqtune.node"  # a trial's node: "hostname (ip)"
TAG_NODE_ID = "haqtune.node_id"  # and its Ray node id
TAG_ROLE = "haqtune.role"  # "search" (parent) or "trial" (child)
ROLE_SEARCH, ROLE_TRIAL = "search", "trial"
RUN_MAP_FILE = "mlflow_runs.json"
DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
DEFAULT_UI_BASE = "http://127.0.0.1:5000"
BEST_SO_FAR = "best_val_acc"  # parent metric; step = trials completed
PARENT = "parent"  # run key of the parent in queued operations (children: their trial id)
# Overrides the tracker's per-call retry budget (seconds), e.g. for tests or flaky networks.
RETRY_ENV = "HAQTUNE_MLFLOW_RETRY_S"
READ_TIMEOUT_S = 30  # one request of `haqtune compare` / `haqtune ui`

# Final-report metrics copied into a trial's run (accuracies are fractions in [0, 1]).
_TRIAL_METRICS = (M.VAL_ACC, M.ACC_DROP, M.REF_ACC, M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB,
                  M.REWARD, M.TEST_ACC)
# Client errors: resending the same request cannot succeed, so the write is dropped.
_PERMANENT_ERRORS = frozenset({
    "BAD_REQUEST", "INVALID_PARAMETER_VALUE", "RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST", "NOT_FOUND", "MALFORMED_REQUEST", "INVALID_STATE",
    "INVALID_STATE_TRANSITION", "ENDPOINT_NOT_FOUND", "PERMISSION_DENIED", "UNAUTHENTICATED",
})

log = logging.getLogger("haqtune.tracking")


def resolve_tracking_uri(uri: str | None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db`` in the working directory."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def absolute_tracking_uri(uri: str, cwd: str | os.PathLike | None = None) -> str:
    """``uri`` with a relative local store made absolute (against ``cwd``, default the
    working directory): ``sqlite:///mlflow.db`` -> ``sqlite:////abs/mlflow.db``, a plain
    path -> an absolute path. Server and remote URIs are returned unchanged. A search
    keeps this form, so it finds its store again from any directory."""
    base = Path(cwd) if cwd is not None else Path.cwd()
    if uri.startswith("sqlite:///"):
        path = uri[len("sqlite:///"):]
        if path.startswith("/") or path.startswith(":memory:") or not path:
            return uri
        return f"sqlite:///{(base / path).resolve()}"
    if uri.startswith("file://"):
        return uri
    if uri.startswith("file:"):
        return (base / uri[len("file:"):]).resolve().as_uri()
    if "://" in uri or uri.startswith("databricks"):
        return uri
    return str((base / uri).resolve())


def check_search_runs(uri: str, mapping_path: Path | Storage, *, search_id: str) -> None:
    """Refuse (HaqtuneError) a store that does not hold the runs a search logged.

    A search resumed against another store (another working directory, another
    ``MLFLOW_TRACKING_URI``) would have every write to its runs rejected as "run does
    not exist" and dropped. An unreachable server is not refused: writes are queued
    until it answers, as during any search.
    """
    from mlflow.entities import ViewType

    mapping_path = open_storage(mapping_path)
    if not mapping_path.exists():
        return
    state = json.loads(mapping_path.read_text())
    expected = {state.get("parent_run_id"), *dict(state.get("trial_runs", {})).values()} - {None}
    if not expected:
        return  # nothing was logged yet (e.g. the store was unreachable): nothing to find
    hint = ("pass `haqtune resume --tracking-uri URI` with the store the search was logged to "
            "(it is in the search's config.yaml)")
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).exists():
        raise HaqtuneError(f"no MLflow store at {uri}, which should hold search {search_id}'s runs: {hint}")
    client = _client(uri)
    try:
        with _one_http_attempt(uri, READ_TIMEOUT_S):
            runs = client.search_runs([state["experiment_id"]],
                                      filter_string=f"tags.`{TAG_SEARCH_ID}` = '{search_id}'",
                                      run_view_type=ViewType.ALL, max_results=50_000)
    except Exception as exc:
        if _is_permanent(exc):
            runs = []
        else:
            log.warning("haqtune: warning: cannot check the MLflow store at %s (%s); its writes are "
                        "queued until it answers", uri, _short(exc))
            return
    found = {r.info.run_id for r in runs}
    missing = expected - found
    if missing:
        raise HaqtuneError(
            f"the MLflow store at {uri} does not hold search {search_id}'s runs ({len(missing)} of "
            f"{len(expected)} missing, experiment id {state['experiment_id']}): {hint}")


def _is_http(uri: str) -> bool:
    return uri.startswith(("http://", "https://"))


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _log_artifact(client, run_id: str, path: str) -> None:
    """Log the file at ``path`` (a local path or a storage URI, fetched to a temp
    directory under its own name) as an artifact of ``run_id``."""
    if not is_uri(path):
        client.log_artifact(run_id, path)
        return
    import tempfile

    source = open_storage(path)
    with tempfile.TemporaryDirectory(prefix="haqtune-artifact-") as tmp:
        client.log_artifact(run_id, str(source.download(Path(tmp) / source.name)))


def _now_ms() -> int:
    return int(time.time() * 1000)


# The MLflow UI's runs table shows only Source / Models / Dataset by default. A saved
# view (an experiment tag the UI's "Views" menu reads, as its own "Save view" writes it)
# opens it on the columns that compare searches; the URL below selects it.
RUNS_VIEW_KEY = "haqtune"
RUNS_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW_KEY}"
RUNS_VIEW_NAME = "haqtune searches"
# Parent (search) columns, then child (trial) columns; params only parents have go last.
RUNS_VIEW_COLUMNS = (
    ("tags", TAG_SEARCHER), ("metrics", "best_val_acc"), ("metrics", "best_test_acc"),
    ("metrics", "latency_reduction_x"), ("metrics", "energy_reduction_x"), ("metrics", "size_reduction_x"),
    ("metrics", f"{M.UNIFORM_IN_BUDGET}_{M.TEST_ACC}"),
    ("metrics", M.VAL_ACC), ("metrics", M.LATENCY_MS), ("metrics", M.ENERGY_MJ), ("metrics", M.SIZE_MB),
    ("params", "budget"), ("params", "hardware"),
)


def runs_view_tag_value(now_ms: int | None = None) -> str:
    """The saved-view envelope (``name``, times, ``state`` = the UI's JSON view state)."""
    columns = [f"{kind}.`{key}`" for kind, key in RUNS_VIEW_COLUMNS]
    state = {
        # Search facets: newest first, which keeps trials nested under their search.
        "searchFilter": "", "orderByKey": "attributes.start_time", "orderByAsc": False,
        "startTime": "ALL", "lifecycleFilter": "Active", "datasetsFilter": [],
        "modelVersionFilter": "All Runs",
        "selectedColumns": columns,
        "columnOrder": ["attributes.`Run Name`", "attributes.`Created`", *columns],
        "columnWidths": {"attributes.`Run Name`": 250, columns[0]: 110,
                         **{c: 105 for c in columns[1:3]}, **{c: 135 for c in columns[3:6]}},
    }
    now_ms = _now_ms() if now_ms is None else now_ms
    return json.dumps({"name": RUNS_VIEW_NAME, "createdAt": now_ms, "updatedAt": now_ms,
                       "state": json.dumps(state)})


def _view_state(value: str | None) -> str | None:
    try:
        return json.loads(value)["state"]
    except (TypeError, ValueError, KeyError):
        return None


def get_or_create_experiment(client, name: str) -> str:
    """The experiment's id; created as a classic-ML experiment with haqtune's runs view."""
    view = runs_view_tag_value()
    exp = client.get_experiment_by_name(name)
    if exp is None:
        try:
            return client.create_experiment(name, tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND,
                                                         RUNS_VIEW_TAG: view})
        except Exception:
            # Another search created it at the same moment.
            exp = client.get_experiment_by_name(name)
            if exp is None:
                raise
    if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    if _view_state(exp.tags.get(RUNS_VIEW_TAG)) != _view_state(view):  # new haqtune version
        client.set_experiment_tag(exp.experiment_id, RUNS_VIEW_TAG, view)
    return exp.experiment_id


def experiment_url(base: str, experiment_id: str) -> str:
    """The experiment's runs table with haqtune's columns. MLflow 3 opens a bare
    experiment URL on its GenAI overview, and drops the view key when it redirects
    from there, hence the explicit ``/runs`` tab and ``workflowType``."""
    return (f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs?workflowType=machine_learning"
            f"&viewStateShareKey={RUNS_VIEW_KEY}")


def _numeric_metrics(result: dict) -> dict[str, float]:
    return {k: float(result[k]) for k in _TRIAL_METRICS
            if isinstance(result.get(k), int | float) and not isinstance(result.get(k), bool)}


def _error_code(exc: BaseException) -> str | None:
    return getattr(exc, "error_code", None)


def _is_permanent(exc: BaseException) -> bool:
    return _error_code(exc) in _PERMANENT_ERRORS


def _short(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}"


@contextlib.contextmanager
def _one_http_attempt(uri: str, request_timeout_s: float):
    """MLflow's HTTP client retries a refused connection for minutes by itself
    (7 retries, back-off factor 2); the tracker does its own bounded back-off, so
    during its calls one request = one attempt. A user's own settings win."""
    if not _is_http(uri):
        yield
        return
    defaults = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, int(request_timeout_s)))}
    added = [k for k in defaults if k not in os.environ]
    for k in added:
        os.environ[k] = defaults[k]
    try:
        yield
    finally:
        for k in added:
            os.environ.pop(k, None)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the tracker tries before buffering (all times in seconds).

    ``timeout_s`` bounds the back-off of one call while the search runs; once a call
    has failed that long the tracker is *degraded*: it keeps queuing, and tries one
    request at a time, ``reconnect_first_s`` later, doubling up to ``reconnect_max_s``,
    so an unreachable server costs a search seconds, not minutes.
    ``final_timeout_s`` is the back-off budget of the flush at the end of the search.
    """

    timeout_s: float = 10.0
    first_delay_s: float = 0.25
    max_delay_s: float = 4.0
    reconnect_first_s: float = 2.0
    reconnect_max_s: float = 60.0
    final_timeout_s: float = 20.0
    request_timeout_s: float = 10.0

    @classmethod
    def from_env(cls) -> RetryPolicy:
        value = os.environ.get(RETRY_ENV)
        try:
            seconds = float(value) if value else None
        except ValueError:
            seconds = None
        if seconds is None or not seconds >= 0:
            if value:
                log.warning("haqtune: warning: %s=%r is not a number of seconds; using %g",
                            RETRY_ENV, value, cls.timeout_s)
            return cls()
        return cls(timeout_s=seconds, final_timeout_s=2 * seconds,
                   request_timeout_s=max(1.0, min(10.0, seconds)))


class MlflowTracker(Callback):
    """Ray Tune callback logging a search to MLflow (see module docstring).

    Never raises out of a Tune callback: MLflow failures become one warning and a
    queue of pending writes. ``start()`` before ``tuner.fit()``, ``end()`` after.
    """

    def __init__(self, *, tracking_uri: str, experiment: str, search_id: str, searcher: str,
                 search_dir: Path | Storage, params: dict, config_path: Path | Storage | None = None,
                 retry: RetryPolicy | None = None, trial_params: dict | None = None) -> None:
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.search_id = search_id
        self.searcher = searcher
        self.search_dir = open_storage(search_dir)  # a local directory or a storage URI
        self.params = params
        self.config_path = config_path
        # Params every child run gets besides its bits (``haqtune generate``: target_acc).
        self.trial_params = dict(trial_params or {})
        self.retry = retry or RetryPolicy.from_env()
        self.created_ms = _now_ms()
        self._init_runtime()
        self.experiment_id: str | None = None
        self.parent_run_id: str | None = None
        self.trial_runs: dict[str, str] = {}
        self.completed: list[str] = []  # trial ids, in completion order
        self.best_val_acc: float | None = None
        self.pending: deque[dict] = deque()
        self._params_logged: set[str] = set()
        self._load_mapping()

    def _init_runtime(self) -> None:
        self.client = None
        self._degraded = False
        self._warned = False
        self._next_try = 0.0
        self._reconnect_s = self.retry.reconnect_first_s
        self._reattached = False

    # Tune pickles RunConfig (callbacks included) into tuner.pkl for Tuner.restore: keep
    # the client out of it, and reload the mapping, which is the source of truth.
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        for key in ("client", "pending", "trial_runs", "completed", "best_val_acc",
                    "parent_run_id", "experiment_id"):
            state.pop(key, None)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._init_runtime()
        self.experiment_id, self.parent_run_id = None, None
        self.trial_runs, self.completed, self.best_val_acc = {}, [], None
        self.pending = deque()
        self._load_mapping()

    # ---- persistence ------------------------------------------------------------

    @property
    def mapping_path(self) -> Storage:
        return self.search_dir / RUN_MAP_FILE

    def _load_mapping(self) -> None:
        if self.mapping_path.exists():
            state = json.loads(self.mapping_path.read_text())
            self.experiment_id = state.get("experiment_id")
            self.parent_run_id = state.get("parent_run_id")
            self.trial_runs = dict(state.get("trial_runs", {}))
            self.completed = list(state.get("completed", []))
            self.best_val_acc = state.get("best_val_acc")
            self.pending = deque(state.get("pending", []))
            self._params_logged = set(state.get("params_logged", []))
            self.created_ms = state.get("created_ms", self.created_ms)

    def _save_mapping(self) -> None:
        self.mapping_path.write_text(json.dumps({  # atomic
            "experiment_id": self.experiment_id,
            "parent_run_id": self.parent_run_id,
            "trial_runs": self.trial_runs,
            "completed": self.completed,
            "best_val_acc": self.best_val_acc,
            "params_logged": sorted(self._params_logged),
            "created_ms": self.created_ms,
            # Writes the server has not accepted yet; a resumed tracker sends them first.
            "pending": list(self.pending),
        }, indent=1))

    # ---- the one wrapper every MLflow write goes through ---------------------------

    def _retrying(self, fn, budget_s: float):
        """``fn()`` with exponential back-off for at most ``budget_s`` seconds."""
        deadline = time.monotonic() + budget_s
        delay = self.retry.first_delay_s
        while True:
            try:
                with _one_http_attempt(self.tracking_uri, self.retry.request_timeout_s):
                    return fn()
            except Exception as exc:
                if _is_permanent(exc) or time.monotonic() + delay > deadline:
                    raise
                time.sleep(delay)
                delay = min(2 * delay, self.retry.max_delay_s)

    def _submit(self, op: dict) -> None:
        self.pending.append(op)
        self.flush()

    def flush(self, *, timeout_s: float | None = None) -> bool:
        """Send queued writes in order; True when none is left. Never raises.

        ``timeout_s`` (end of search) forces an attempt with that back-off budget even
        while degraded; otherwise a degraded tracker tries one request, and only once
        its reconnect delay has passed.
        """
        if not self.pending:
            return True
        if timeout_s is None and self._degraded and time.monotonic() < self._next_try:
            return False
        while self.pending:
            if timeout_s is not None:
                budget = timeout_s
            else:
                budget = 0.0 if self._degraded else self.retry.timeout_s
            op = self.pending[0]
            try:
                self._retrying(lambda op=op: self._apply(op), budget)
            except Exception as exc:
                if _is_permanent(exc):
                    log.warning("haqtune: warning: MLflow rejected a %s write for run %s, dropped (%s)",
                                op["op"], op["run"], _short(exc))
                    self.pending.popleft()
                    continue
                self._degrade(exc)
                return False
            self.pending.popleft()
            if self._degraded:
                log.warning("haqtune: warning: MLflow at %s reachable again; sending buffered writes",
                            self.tracking_uri)
                self._degraded = False
                self._reconnect_s = self.retry.reconnect_first_s
        return True

    def _degrade(self, exc: BaseException) -> None:
        if not self._warned:
            self._warned = True
            log.warning("haqtune: warning: MLflow at %s unreachable (%s); buffering its writes and retrying, "
                        "the search goes on", self.tracking_uri, _short(exc))
        if self._degraded:
            self._reconnect_s = min(2 * self._reconnect_s, self.retry.reconnect_max_s)
        self._degraded = True
        self._next_try = time.monotonic() + self._reconnect_s

    def _guarded(self, what: str, fn, *args, **kwargs) -> None:
        # A tracking bug must not take a search down with it either.
        try:
            fn(*args, **kwargs)
        except Exception as exc:  # pragma: no cover - defensive
            log.warning("haqtune: warning: MLflow tracking failed in %s (%s); the search goes on", what, _short(exc))

    # ---- operations (plain dicts, so the queue can be persisted) ------------------

    def _apply(self, op: dict) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self.client is None:
            self.client = _client(self.tracking_uri)
        kind = op["op"]
        run_id = self._run_id(op["run"], start_ms=op.get("time") if kind == "create" else None)
        if kind == "create":
            pass  # resolving the run id above created it
        elif kind == "batch":
            self.client.log_batch(run_id, metrics=[Metric(*m) for m in op.get("metrics", [])],
                                  params=[Param(*p) for p in op.get("params", [])],
                                  tags=[RunTag(*t) for t in op.get("tags", [])])
        elif kind == "running":
            self.client.update_run(run_id, status="RUNNING")
        elif kind == "end":
            self.client.set_terminated(run_id, status=op["status"], end_time=op["time"])
        elif kind == "artifact":
            _log_artifact(self.client, run_id, op["path"])
        elif kind == "delete":
            self.client.delete_run(run_id)
        else:  # pragma: no cover
            raise ValueError(f"unknown tracking operation {kind!r}")

    def _run_id(self, key: str, *, start_ms: int | None = None) -> str:
        """The run of ``key`` (PARENT or a trial id), created on first use."""
        if key == PARENT:
            return self._parent()
        parent = self._parent()  # first, so a resumed tracker has adopted existing runs
        run_id = self.trial_runs.get(key)
        if run_id is None:
            run = self.client.create_run(
                self.experiment_id, start_time=start_ms or _now_ms(), run_name=key,
                tags={PARENT_RUN_TAG: parent, RUN_NAME_TAG: key, TAG_SEARCH_ID: self.search_id,
                      TAG_TRIAL_ID: key, TAG_SEARCHER: self.searcher, TAG_ROLE: ROLE_TRIAL,
                      **self._source_tags()})
            run_id = self.trial_runs[key] = run.info.run_id
            self._save_mapping()
        return run_id

    def _source_tags(self) -> dict[str, str]:
        # MlflowClient.create_run sets no context tags; these fill the UI's User/Source columns.
        try:
            user = getpass.getuser()
        except Exception:  # pragma: no cover - no user name in some containers
            user = "haqtune"
        return {"mlflow.user": user, "mlflow.source.name": "haqtune", "mlflow.source.type": "LOCAL"}

    def _parent(self) -> str:
        if self.experiment_id is None:
            self.experiment_id = get_or_create_experiment(self.client, self.experiment)
        if not self._reattached:
            self._reattach()
        if self.parent_run_id is None:
            run = self.client.create_run(
                self.experiment_id, start_time=self.created_ms, run_name=self.search_id,
                tags={RUN_NAME_TAG: self.search_id, TAG_SEARCH_ID: self.search_id,
                      TAG_SEARCHER: self.searcher, TAG_ROLE: ROLE_SEARCH, **self._source_tags(),
                      "mlflow.note.content": f"haqtune search {self.search_id} ({self.searcher})"})
            self.parent_run_id = run.info.run_id
            self._save_mapping()
        return self.parent_run_id

    def _reattach(self) -> None:
        """Adopt runs of this search that the mapping misses (e.g. the driver died between
        creating a run and saving the mapping), so a resume never duplicates them."""
        from mlflow.entities import ViewType

        runs = self.client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_SEARCH_ID}` = '{self.search_id}'",
            run_view_type=ViewType.ACTIVE_ONLY, max_results=50_000)
        changed = False
        for run in runs:
            tags = run.data.tags
            if tags.get(TAG_ROLE) == ROLE_SEARCH and self.parent_run_id is None:
                self.parent_run_id, changed = run.info.run_id, True
            elif TAG_TRIAL_ID in tags and tags[TAG_TRIAL_ID] not in self.trial_runs:
                self.trial_runs[tags[TAG_TRIAL_ID]], changed = run.info.run_id, True
        self._reattached = True
        if changed:
            self._save_mapping()

    # ---- parent run -------------------------------------------------------------

    def start(self) -> None:
        """Create (or reattach to) the experiment and the parent run; never raises."""
        self._guarded("start", self._start)

    def _start(self) -> None:
        if self.parent_run_id is not None or self._params_logged_parent():
            # Reattaching (resume): the run exists, its params are logged.
            self._submit({"op": "running", "run": PARENT})
            return
        self.pending.appendleft({"op": "batch", "run": PARENT, "params": [
            [k, str(v)] for k, v in self.params.items()]})
        if self.config_path is not None:
            self.pending.insert(1, {"op": "artifact", "run": PARENT, "path": str(self.config_path)})
        self._params_logged.add(PARENT)
        self._save_mapping()
        self.flush()

    def _params_logged_parent(self) -> bool:
        return PARENT in self._params_logged

    def setup(self, **info) -> None:
        if PARENT not in self._params_logged and self.parent_run_id is None:
            self.start()

    # ---- trial runs -------------------------------------------------------------

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self._guarded("on_trial_start", self._trial_start, trial)

    def _trial_start(self, trial) -> None:
        tid = trial.trial_id
        if tid in self.completed:  # an errored trial resumed: it will complete again
            self.completed.remove(tid)
        if tid in self.trial_runs:
            self._submit({"op": "running", "run": tid})
        else:
            # Creates the run now, so the UI shows it RUNNING from its real start.
            self._submit({"op": "create", "run": tid, "time": _now_ms()})

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        self._guarded("on_trial_result", self._trial_result, trial, result)

    def _trial_result(self, trial, result: dict) -> None:
        tid = trial.trial_id
        step = int(result.get(M.EPOCH, result.get("training_iteration", 0)))
        now = _now_ms()
        op = {"op": "batch", "run": tid,
              "metrics": [[k, v, now, step] for k, v in _numeric_metrics(result).items()]}
        # Params are the projected (evaluated) bits, logged once per trial.
        if M.POLICY in result and tid not in self._params_logged:
            policy = parse_policy(result[M.POLICY])
            op["params"] = [[k, str(v)] for k, v in config_from_policy(policy).items()]
            op["params"].append([M.POLICY, str(result[M.POLICY])])
            op["params"].extend([k, str(v)] for k, v in self.trial_params.items())
            self._params_logged.add(tid)
        # Every report carries the node (a retried trial may run on another node: last one wins).
        tags = [[tag, str(result[key])] for tag, key in ((TAG_NODE, M.NODE), (TAG_NODE_ID, M.NODE_ID))
                if result.get(key)]
        if tags:
            op["tags"] = tags
        self._submit(op)

    def _finish(self, trial, status: str) -> None:
        tid = trial.trial_id
        result = trial.last_result or {}
        now = _now_ms()
        # The traceback first, so the run is complete when it turns FAILED.
        ops = self._error_ops(trial) if status == "FAILED" else []
        ops.append({"op": "end", "run": tid, "status": status, "time": now})
        if tid not in self.completed:
            self.completed.append(tid)
            acc = result.get(M.VAL_ACC)
            if status != "FAILED" and isinstance(acc, int | float):
                self.best_val_acc = acc if self.best_val_acc is None else max(self.best_val_acc, acc)
            if self.best_val_acc is not None:
                ops.append({"op": "batch", "run": PARENT, "metrics": [
                    [BEST_SO_FAR, float(self.best_val_acc), now, len(self.completed)]]})
        self.pending.extend(ops)
        self.flush()
        self._save_mapping()

    def _error_ops(self, trial) -> list[dict]:
        """A failed trial's traceback, kept in the search directory and logged to its run
        (artifact ``error.txt``, tag ``haqtune.error`` = the exception's last line)."""
        from .callbacks import error_summary

        local = getattr(trial, "error_file", None)
        if not local or not Path(local).is_file():
            return []
        last, _ = error_summary(trial)
        path = self.search_dir / "errors" / trial.trial_id / "error.txt"
        path.write_text(Path(local).read_text(errors="replace"))
        return [{"op": "artifact", "run": trial.trial_id, "path": str(path)},
                {"op": "batch", "run": trial.trial_id, "tags": [[TAG_ERROR, last[:500]]]}]

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        result = trial.last_result or {}
        # A trial whose last report is not the final one was stopped early by the scheduler.
        status = "FINISHED" if result.get(M.DONE, 1) else "KILLED"
        self._guarded("on_trial_complete", self._finish, trial, status)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._guarded("on_trial_error", self._finish, trial, "FAILED")

    def on_experiment_end(self, trials, **info) -> None:
        self._guarded("on_experiment_end", self._drop_forgotten, trials)

    def _drop_forgotten(self, trials) -> None:
        """Delete child runs of trials the restored experiment does not have.

        A driver killed after a trial started but before Tune's next experiment
        checkpoint leaves a run for a trial that the restored experiment never had;
        the searcher suggests a fresh one instead. Without this, MLflow would hold
        one run more than the search has trials.
        """
        known = {t.trial_id for t in trials}
        for tid in [t for t in self.trial_runs if t not in known]:
            self.pending.append({"op": "delete", "run": tid})
            self.flush()
            if not any(op["run"] == tid for op in self.pending):
                del self.trial_runs[tid]
                if tid in self.completed:
                    self.completed.remove(tid)
        self._save_mapping()

    # ---- end of search ----------------------------------------------------------

    def log_summary(self, metrics: dict[str, float], artifacts: dict[str, str | bytes]) -> None:
        """Final parent metrics and artifacts (``name -> content``), also kept in the
        search directory. Metrics go at step = trials completed, beside the best-so-far
        curve's last point."""
        now, step = _now_ms(), len(self.completed)
        # 4 significant digits: readable in the runs table (the artifacts keep full precision).
        ops = [{"op": "batch", "run": PARENT,
                "metrics": [[k, float(f"{float(v):.4g}"), now, step] for k, v in metrics.items()]}]
        for name, content in artifacts.items():
            path = self.search_dir / name
            if isinstance(content, bytes):
                path.write_bytes(content)
            else:
                path.write_text(content)
            ops.append({"op": "artifact", "run": PARENT, "path": str(path)})
        self.pending.extend(ops)
        self._guarded("log_summary", self.flush)

    def ui_hint(self) -> str:
        """Where a user sees this search: the server's URL, or how to start ``haqtune ui``."""
        if self.experiment_id is None:
            return (f"not logged yet: {self.tracking_uri} was unreachable; {len(self.pending)} "
                    f"writes are kept in {self.mapping_path}")
        if _is_http(self.tracking_uri):
            return experiment_url(self.tracking_uri, self.experiment_id)
        return (f"run `haqtune ui --experiment {self.experiment}` and open "
                f"{experiment_url(DEFAULT_UI_BASE, self.experiment_id)}")

    def end(self, status: str = "FINISHED") -> None:
        """Terminate the parent run and flush everything (bounded); never raises.

        An interrupted search (``status`` KILLED or FAILED) also ends the runs of its
        trials in flight as KILLED; a resumed search sets them RUNNING again."""
        if status != "FINISHED":
            now = _now_ms()
            for tid in self.trial_runs:
                if tid not in self.completed:
                    self.pending.append({"op": "end", "run": tid, "status": "KILLED", "time": now})
        self.pending.append({"op": "end", "run": PARENT, "status": status, "time": _now_ms()})
        self._guarded("end", self.flush, timeout_s=self.retry.final_timeout_s)
        if self.pending:
            log.warning("haqtune: warning: %d MLflow writes could not be sent to %s; they are kept in %s",
                        len(self.pending), self.tracking_uri, self.mapping_path)
        with contextlib.suppress(OSError):
            self._save_mapping()


# ---- reading a store (compare / ui) -------------------------------------------------


def _check_store(uri: str) -> None:
    """A missing sqlite file is a user error: opening it would create an empty store."""
    if uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.exists():
            raise HaqtuneError(f"no MLflow store at {uri}: run `haqtune search` first, or pass "
                               "--tracking-uri")


def find_experiment(uri: str, name: str) -> str:
    """The id of experiment ``name`` in the store at ``uri``; HaqtuneError if absent."""
    _check_store(uri)
    client = _client(uri)
    try:
        with _one_http_attempt(uri, READ_TIMEOUT_S):  # an unreachable server fails fast
            exp = client.get_experiment_by_name(name)
            if exp is None:
                names = sorted(e.name for e in client.search_experiments())
                raise HaqtuneError(f"unknown experiment {name!r} in {uri}: choose between "
                                   f"{', '.join(names) or '(none)'}")
    except HaqtuneError:
        raise
    except Exception as exc:
        raise HaqtuneError(f"cannot read the MLflow store at {uri}: {_short(exc)}") from None
    return exp.experiment_id


def _run_record(run) -> dict:
    info, data = run.info, run.data
    return {"run_id": info.run_id, "run_name": info.run_name, "status": info.status,
            "start_time_ms": info.start_time, "end_time_ms": info.end_time,
            "parent_run_id": data.tags.get(PARENT_RUN_TAG),
            "search_id": data.tags.get(TAG_SEARCH_ID), "searcher": data.tags.get(TAG_SEARCHER),
            "trial_id": data.tags.get(TAG_TRIAL_ID), "params": dict(data.params),
            "metrics": dict(data.metrics)}


def load_searches(uri: str, experiment: str) -> tuple[str, list[dict], list[dict]]:
    """(experiment id, parent runs, child runs) of the haqtune searches in ``experiment``,
    as plain dicts (run_id, run_name, status, times in ms, tags, params, metrics)."""
    from mlflow.entities import ViewType

    experiment_id = find_experiment(uri, experiment)
    client = _client(uri)
    runs, token = [], None
    try:
        with _one_http_attempt(uri, READ_TIMEOUT_S):
            while True:
                page = client.search_runs([experiment_id], run_view_type=ViewType.ACTIVE_ONLY,
                                          max_results=5000, page_token=token)
                runs.extend(page)
                token = page.token
                if not token:
                    break
    except Exception as exc:
        raise HaqtuneError(f"cannot read the MLflow store at {uri}: {_short(exc)}") from None
    records = [_run_record(r) for r in runs if r.data.tags.get(TAG_SEARCH_ID)]
    parents = [r for r in records if r["parent_run_id"] is None]
    children = [r for r in records if r["parent_run_id"] is not None]
    return experiment_id, parents, children


# ---- exported models (haqtune export) --------------------------------------------------


def search_parent_run(search_dir: Path) -> str | None:
    """The parent run id recorded in a search directory's mapping file, if any."""
    path = Path(search_dir) / RUN_MAP_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text()).get("parent_run_id")


def log_exported_model(uri: str, parent_run_id: str, *, name: str, example, torch_model=None,
                       onnx_model=None, files: tuple[Path, ...] = (), code_paths: tuple[str, ...] = (),
                       pip_requirements: dict[str, list[str]] | None = None) -> list[str]:
    """Log an exported model to a search's parent run as MLflow models; returns their URIs.

    ``torch_model`` becomes a ``pytorch`` flavor model and ``onnx_model`` an ``onnx`` one
    (named ``<name>-pytorch`` / ``<name>-onnx``), both with the signature inferred from
    ``example`` (a numpy batch) and the model's output on it; ``files`` (the report) go
    to the run's artifacts under ``export/<name>/``. The run keeps its status and end time.
    Raises on any MLflow failure (the caller decides what that means).
    """
    import mlflow
    from mlflow.models import infer_signature

    requirements = pip_requirements or {}
    # The pickle format is deliberate (the module ships with its code_paths); its
    # generic "pickle is unsafe" warning is not news to the one who exported it.
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    client = _client(uri)
    with _one_http_attempt(uri, READ_TIMEOUT_S):
        info = client.get_run(parent_run_id).info
        mlflow.set_tracking_uri(uri)
        uris = []
        # Reopening a finished run marks it RUNNING and, at the end, FINISHED (FAILED after
        # an error) now: status and end time are put back either way, so the search's run
        # keeps its own.
        try:
            with mlflow.start_run(run_id=parent_run_id):
                if torch_model is not None:
                    import torch

                    with torch.no_grad():
                        out = torch_model(torch.from_numpy(example)).numpy()
                    logged = mlflow.pytorch.log_model(
                        torch_model, name=f"{name}-pytorch", signature=infer_signature(example, out),
                        input_example=example, code_paths=list(code_paths) or None,
                        # torch.export (pt2) cannot trace the fake-quantize ops; the pickled module can.
                        serialization_format="pickle",
                        pip_requirements=requirements.get("pytorch"))
                    uris.append(logged.model_uri)
                if onnx_model is not None:
                    from trainables.export import ONNX_INPUT, ONNX_OUTPUT, onnx_session

                    out = onnx_session(onnx_model).run([ONNX_OUTPUT], {ONNX_INPUT: example})[0]
                    logged = mlflow.onnx.log_model(
                        onnx_model, name=f"{name}-onnx", signature=infer_signature(example, out),
                        input_example=example, pip_requirements=requirements.get("onnx"),
                        save_as_external_data=False, onnx_execution_providers=["CPUExecutionProvider"])
                    uris.append(logged.model_uri)
                for path in files:
                    mlflow.log_artifact(str(path), artifact_path=f"export/{name}")
        finally:
            if info.end_time:
                client.set_terminated(parent_run_id, status=info.status, end_time=info.end_time)
            else:  # a search still running (or killed without an end): leave it as it was
                client.update_run(parent_run_id, status=info.status)
    return uris


def download_search_artifacts(uri: str, experiment: str, searcher: str, names: tuple[str, ...],
                              dst_dir: Path, *, search_id: str | None = None) -> dict:
    """Download artifacts ``names`` of the newest finished search by ``searcher`` in
    ``experiment`` that has all of them (or of search ``search_id``) into ``dst_dir``.

    Returns that parent run as ``_run_record`` does, plus ``files``: name -> local path.
    HaqtuneError when no such search exists.
    """
    from mlflow.entities import ViewType

    # A progress bar per small file is noise in a CLI's output.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    experiment_id = find_experiment(uri, experiment)
    client = _client(uri)
    where = f"tags.`{TAG_SEARCHER}` = '{searcher}' and tags.`{TAG_ROLE}` = '{ROLE_SEARCH}'"
    if search_id is not None:
        where += f" and tags.`{TAG_SEARCH_ID}` = '{search_id}'"
    try:
        with _one_http_attempt(uri, READ_TIMEOUT_S):
            runs = client.search_runs([experiment_id], filter_string=where,
                                      run_view_type=ViewType.ACTIVE_ONLY,
                                      order_by=["attributes.start_time DESC"], max_results=1000)
            for run in runs:
                present = {a.path for a in client.list_artifacts(run.info.run_id)}
                if run.info.status != "FINISHED" or not set(names) <= present:
                    continue
                dst_dir = Path(dst_dir)
                dst_dir.mkdir(parents=True, exist_ok=True)
                files = {name: Path(client.download_artifacts(run.info.run_id, name, str(dst_dir)))
                         for name in names}
                return {**_run_record(run), "files": files}
    except Exception as exc:
        raise HaqtuneError(f"cannot read the MLflow store at {uri}: {_short(exc)}") from None
    which = f"search {search_id!r}" if search_id else f"finished {searcher!r} search"
    raise HaqtuneError(f"experiment {experiment!r} in {uri} has no {which} with {', '.join(names)}: "
                       f"run `haqtune search --searcher {searcher} --experiment {experiment}` first")


def load_trial_history(uri: str, experiment: str, match: dict) -> list[tuple[str, float]]:
    """(policy, val_acc) of every finished trial of the searches in ``experiment`` whose
    parent-run params equal ``match`` (compared as text), whatever their searcher and
    hardware: what an ``aqgan`` search is seeded from (``history_from_experiment``).
    An experiment (or sqlite store) that does not exist yet has no history: ``[]``."""
    try:
        _, parents, children = load_searches(uri, experiment)
    except HaqtuneError as exc:
        if "unknown experiment" in str(exc) or "no MLflow store" in str(exc):
            return []
        raise
    wanted = {k: str(v) for k, v in match.items()}
    chosen = {p["run_id"] for p in parents
              if all(p["params"].get(k) == v for k, v in wanted.items())}
    return [(c["params"][M.POLICY], float(c["metrics"][M.VAL_ACC])) for c in children
            if c["parent_run_id"] in chosen and c["status"] == "FINISHED"
            and M.POLICY in c["params"] and M.VAL_ACC in c["metrics"]]
