"""Driver-side Ray Tune callbacks of a search: progress lines, checkpoint pruning, interrupts.

Restoring without private Ray attributes: ``Tuner.restore`` takes no callbacks; it
unpickles the ``RunConfig`` (callbacks included) that the first driver saved in the
experiment directory. So the ``RunConfig`` holds one ``DriverCallbacks``, which
pickles to nothing but its search id and, in whichever driver unpickles it, forwards
every hook to the callbacks that driver registered under that id (``register``)
before ``Tuner.restore``: a resumed search gets its own progress printer, MLflow
tracker and checkpoint keeper, re-read from the search directory, through public API
only.
"""

from __future__ import annotations

import signal
import threading
from pathlib import Path

from ray.tune import Callback

from search_spaces import metrics as M

# Every hook of ``ray.tune.Callback`` that ``DriverCallbacks`` forwards.
_HOOKS = ("on_step_begin", "on_step_end", "on_trial_start", "on_trial_restore", "on_trial_save",
          "on_trial_result", "on_trial_complete", "on_trial_recover", "on_trial_error",
          "on_checkpoint", "on_experiment_end")

_LIVE: dict[str, list[Callback]] = {}


def register(search_id: str, callbacks: list[Callback]) -> None:
    """Make ``callbacks`` the ones every ``DriverCallbacks(search_id)`` in this process calls."""
    _LIVE[search_id] = list(callbacks)


def unregister(search_id: str) -> None:
    _LIVE.pop(search_id, None)


class DriverCallbacks(Callback):
    """Forwards Tune's callback hooks to this driver's callbacks of ``search_id``."""

    def __init__(self, search_id: str) -> None:
        self.search_id = search_id

    def __reduce__(self):
        return (DriverCallbacks, (self.search_id,))

    def _targets(self) -> list[Callback]:
        return _LIVE.get(self.search_id, [])

    def setup(self, **info) -> None:
        for cb in self._targets():
            cb.setup(**info)


def _forwarder(name: str):
    def hook(self, *args, **kwargs):
        for cb in self._targets():
            getattr(cb, name)(*args, **kwargs)

    hook.__name__ = name
    return hook


for _name in _HOOKS:
    setattr(DriverCallbacks, _name, _forwarder(_name))


def error_summary(trial) -> tuple[str, str | None]:
    """(the last line of a failed trial's error, the path of its error file in storage)."""
    local = getattr(trial, "error_file", None)
    text = ""
    if local and Path(local).is_file():
        text = Path(local).read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    last = lines[-1] if lines else "unknown error (no error file)"
    storage = getattr(trial, "path", None)  # on Tune's storage filesystem, without a scheme
    stored = local
    if local and storage:
        stored = f"{storage.rstrip('/')}/{Path(local).name}"
        fs = getattr(getattr(trial, "storage", None), "storage_filesystem", None)
        if fs is not None and fs.type_name != "local":  # e.g. s3://bucket/runs/<id>/trial_x/error.txt
            stored = f"{fs.type_name}://{stored}"
    return last[:300], stored


class ProgressPrinter(Callback):
    """One line per finished trial: done / total, metrics, best so far; failures with
    their error's last line and error file; one line per retry."""

    def __init__(self, total: int, echo, done=(), best: float | None = None) -> None:
        # Counted by trial id: a resumed trial that had already been counted (its final
        # report raced the crash) is not counted twice.
        self.total, self.echo, self.done_ids, self.best = total, echo, set(done), best

    @property
    def done(self) -> int:
        return len(self.done_ids)

    def _line(self, trial, status: str, desc: str | None = None) -> None:
        self.done_ids.add(trial.trial_id)
        r = trial.last_result or {}
        acc = r.get(M.VAL_ACC)
        if status == "ok" and acc is not None:
            self.best = acc if self.best is None else max(self.best, acc)
        if desc is None:
            desc = (f"val_acc={acc:.4f} latency_ms={r.get(M.LATENCY_MS, float('nan')):.4g} "
                    f"energy_mj={r.get(M.ENERGY_MJ, float('nan')):.4g} "
                    f"size_mb={r.get(M.SIZE_MB, float('nan')):.4g}" if acc is not None else "no result")
        best = f"{self.best:.4f}" if self.best is not None else "-"
        self.echo(f"[{self.done}/{self.total}] {trial.trial_id} {status}: {desc} | best val_acc={best}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        stopped = (trial.last_result or {}).get(M.DONE, 1) == 0
        self._line(trial, "stopped early" if stopped else "ok")

    def on_trial_error(self, iteration, trials, trial, **info):
        last, path = error_summary(trial)
        self._line(trial, "FAILED", f"{last} (error file: {path})")

    def on_trial_recover(self, iteration, trials, trial, **info):
        last, _ = error_summary(trial)
        self.echo(f"    {trial.trial_id} failed ({last}); retrying "
                  f"({trial.num_failures}/{trial.max_failures} failures so far)")


def ranked_trials(rows: list[dict], top_k: int) -> list[dict]:
    """The best ``top_k`` trials that completed their fine-tune, by ``val_acc`` (first
    come first among equals), one per distinct policy. ``rows``: dicts with trial_id,
    status, val_acc, policy, in completion order; only status FINISHED is ranked."""
    if top_k <= 0:
        return []
    done = [r for r in rows if r.get("status") == "FINISHED" and r.get(M.VAL_ACC) is not None]
    done.sort(key=lambda r: -r[M.VAL_ACC])  # stable: earlier trials win ties
    best, seen = [], set()
    for row in done:
        if row[M.POLICY] in seen:
            continue
        seen.add(row[M.POLICY])
        best.append(row)
        if len(best) == top_k:
            break
    return best


def trial_status(trial, *, completing: bool = False) -> str:
    """FINISHED (completed its fine-tune), KILLED (stopped early by the scheduler),
    FAILED (errored), or Tune's own status while it is not over. ``completing``: the
    trial of an ``on_trial_complete`` call (Tune sets its status after the callbacks)."""
    if trial.status == "ERROR":
        return "FAILED"
    if trial.status == "TERMINATED" or completing:
        return "FINISHED" if (trial.last_result or {}).get(M.DONE, 0) else "KILLED"
    return trial.status


class CheckpointKeeper(Callback):
    """Keeps the checkpoints of the best ``top_k`` finished trials, deletes the others.

    Each finished trial reports one checkpoint (its fine-tuned quantized model); Tune's
    ``CheckpointConfig`` keeps checkpoints per trial, this keeps them per search. A
    trial that drops out of the top k never returns to it (its val_acc is final); the
    ranking is recomputed from Tune's trials.

    A checkpoint is deleted only once Tune's saved experiment state has its trial
    finished: a trial the state still has running is restored from its checkpoint
    after a crash (it then reports its final result again instead of training again).
    Tune saves the state at the end of every step in which a trial checkpointed
    (``CheckpointConfig(num_to_keep=1)``), and at the end of the experiment; so a trial
    that completed at step c is safe once some trial checkpointed at a step >= c.
    Trials finished in an earlier driver's session come from the saved state: safe.
    """

    def __init__(self, top_k: int) -> None:
        self.top_k = top_k
        self._completed_at: dict[str, int] = {}
        self._saved_through = -1
        self._dirty = False  # a save happened since the last pruning
        self._gone: set[str] = set()  # trial ids whose checkpoint is deleted (or never was)

    def on_checkpoint(self, iteration, trials, trial, checkpoint, **info):
        self._saved_through = max(self._saved_through, iteration)
        self._dirty = True

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._completed_at[trial.trial_id] = iteration
        self._prune(trials, completing=trial)

    def on_step_begin(self, iteration, trials, **info):
        if self._dirty:
            self._prune(trials)

    def on_experiment_end(self, trials, **info):
        self._saved_through = float("inf")  # Tune saved the final state just before
        self._prune(trials)

    def _prune(self, trials, completing=None) -> None:
        self._dirty = False
        rows = [{"trial_id": t.trial_id, "status": trial_status(t, completing=t is completing),
                 M.VAL_ACC: (t.last_result or {}).get(M.VAL_ACC),
                 M.POLICY: (t.last_result or {}).get(M.POLICY), "trial": t} for t in trials]
        keep = {r["trial_id"] for r in ranked_trials(rows, self.top_k)}
        for row in rows:
            tid = row["trial_id"]
            if tid in keep or tid in self._gone or row["status"] != "FINISHED":
                continue
            if self._completed_at.get(tid, -1) > self._saved_through:
                continue  # not in a saved state yet: pruned after the next save
            checkpoint = row["trial"].checkpoint
            if checkpoint is not None and checkpoint_exists(checkpoint):
                delete_checkpoint(checkpoint)
            self._gone.add(tid)


def delete_checkpoint(checkpoint) -> None:
    import pyarrow.fs

    info = checkpoint.filesystem.get_file_info(checkpoint.path)
    if info.type == pyarrow.fs.FileType.Directory:
        checkpoint.filesystem.delete_dir(checkpoint.path)


def checkpoint_exists(checkpoint) -> bool:
    import pyarrow.fs

    return checkpoint.filesystem.get_file_info(checkpoint.path).type == pyarrow.fs.FileType.Directory


class Interrupts(Callback):
    """Ctrl-C (SIGINT) and SIGTERM stop the search cleanly and are remembered.

    Ray Tune's own SIGINT handler (installed when the experiment starts) stops the
    loop gracefully: running trials are stopped and the experiment state is saved, so
    ``haqtune resume`` continues it. This callback's ``setup`` (run when the experiment
    starts, in the driver's main thread) wraps whatever SIGINT handler is installed at
    that moment, so the driver learns that the search was interrupted, and routes
    SIGTERM to the same handler. ``signal`` is the first signal received, or None.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict[int, object] = {}

    def setup(self, **info) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        inner = signal.getsignal(signal.SIGINT)

        def handler(signum, frame):
            if self.signal is None:
                self.signal = signum
            if callable(inner):
                inner(signal.SIGINT, frame)
            else:
                raise KeyboardInterrupt

        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, handler)

    def arm(self) -> None:
        """Remember the driver's handlers (call before ``Tuner.fit``)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}

    def disarm(self) -> None:
        """Put back the handlers ``arm`` saw (Ray Tune's would otherwise stay installed)."""
        if threading.current_thread() is threading.main_thread():
            for sig, previous in self._previous.items():
                signal.signal(sig, previous)
        self._previous = {}
