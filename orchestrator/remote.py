"""Nothing heavy on the head: a search's long steps as Ray tasks and actors, with progress.

The driver (often a CPU-only cluster head) plans, searches and logs. Everything that
loads a dataset or runs a network runs with a trial's resources (``cpus_per_trial``
CPUs, ``gpus_per_trial`` GPUs), so Ray places it on a worker that can run a trial:

- the full-precision reference (trained, or pretrained weights evaluated):
  ``run_reference``, a streaming Ray task that yields one message per epoch;
- the sensitivity oracle's evaluations (``sensitivity-dp``): ``RemoteSensitivityRunner``,
  a few Ray actors that load model and data once and evaluate a batch of points;
- the final test evaluations: ``gather`` waits for their tasks with progress.

Each prints ``haqtune: <step>: n/N <unit>, <elapsed> s`` lines from the driver, at most
every ``PROGRESS_INTERVAL_S`` seconds plus the last one, instead of minutes of silence.

The reference cache stays on the driver's side (``ReferenceCache``, the one place
that knows where cache files live): the task learns which entries exist, computes
its key where the data is (the key covers the data's fingerprint), and skips
training when its entry exists; the driver reads and writes the files.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .errors import HaqtuneError

PROGRESS_INTERVAL_S = 10.0  # at most one progress line per step this often (plus the last)


def format_progress(step: str, done: int, total: int, unit: str, elapsed_s: float) -> str:
    """``haqtune: reference training: 3/20 epochs, 12 s``."""
    return f"haqtune: {step}: {done}/{total} {unit}, {elapsed_s:.0f} s"


class ProgressLine:
    """Prints a step's progress through ``echo``: the first update, then at most one
    line per ``interval_s``, and always the last one (``done == total``)."""

    def __init__(self, step: str, total: int, unit: str, echo: Callable[[str], object] | None, *,
                 interval_s: float = PROGRESS_INTERVAL_S, clock: Callable[[], float] = time.monotonic) -> None:
        self.step, self.total, self.unit, self.echo = step, int(total), unit, echo
        self.interval_s, self.clock = interval_s, clock
        self.started = clock()
        self._last_printed: float | None = None

    def update(self, done: int) -> None:
        if self.echo is None:
            return
        now = self.clock()
        due = self._last_printed is None or now - self._last_printed >= self.interval_s
        if due or done >= self.total:
            self._last_printed = now
            self.echo(format_progress(self.step, done, self.total, self.unit, now - self.started))


def _task_error(exc: BaseException, step: str) -> HaqtuneError:
    """A failed remote step as one clear line (its cause's message names the node when
    it is a node's problem, e.g. a missing ImageFolder root)."""
    cause = getattr(exc, "cause", None) or exc
    text = str(cause).strip().splitlines()
    return HaqtuneError(f"{step} failed: {type(cause).__name__}: {text[-1] if text else ''}")


def gather(refs: Sequence, progress: ProgressLine | None = None) -> list:
    """``ray.get(refs)`` in order, updating ``progress`` as each one finishes."""
    import ray

    pending, done = list(refs), 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        done += len(ready)
        if progress is not None:
            progress.update(done)
    return ray.get(list(refs))


# ---- the reference model ------------------------------------------------------------


class ReferenceCache:
    """Reference models cached by content hash in one directory of the search's storage
    (``orchestrator.storage``: a local path or a bucket URI), read and written by the
    driver one entry at a time; entries are written atomically (temp file + rename, or
    one PUT) and read with ``weights_only=True``."""

    def __init__(self, directory) -> None:
        from .storage import open_storage

        self.directory = open_storage(directory)

    def names(self) -> frozenset[str]:
        return frozenset(name for name in self.directory.file_sizes()
                         if name.startswith("reference-") and name.endswith(".pt"))

    def read(self, name: str, payload: dict) -> tuple[dict, float] | None:
        from trainables.training import load_cached_reference

        entry = self.directory / name
        if entry.is_local:
            cached = load_cached_reference(Path(entry.path), payload)
        else:
            with tempfile.TemporaryDirectory(prefix="haqtune-cache-") as tmp:
                if not entry.is_file():
                    return None
                cached = load_cached_reference(entry.download(Path(tmp) / name), payload)
        return None if cached is None else (cached["state_dict"], float(cached["val_acc"]))

    def write(self, name: str, payload: dict, state: dict, val_acc: float) -> None:
        from trainables.training import atomic_torch_save

        entry = self.directory / name
        obj = {"state_dict": state, "val_acc": val_acc, "key": payload}
        if entry.is_local:
            atomic_torch_save(obj, Path(entry.path))
            return
        with tempfile.TemporaryDirectory(prefix="haqtune-cache-") as tmp:
            atomic_torch_save(obj, Path(tmp) / name)
            entry.upload(Path(tmp) / name)


@dataclass(frozen=True)
class ReferenceJob:
    """What the reference task needs (picklable, small: no data, no weights)."""

    model: str
    model_kwargs: dict
    dataset: str
    data_root: str
    input_size: int | None
    dataset_options: dict
    settings: object  # trainables.training.ReferenceSettings
    seed: int
    gpus: float
    threads: int


def reference_task(job: ReferenceJob, cached: frozenset[str]):
    """Ray streaming task: yields ``{"epoch", "epochs"}`` after each training epoch, then
    ``{"result": "cached" | "trained", "name", "payload", "state_dict", "val_acc", "node"}``.

    Loads (and, once per node, prepares) the data where it runs, so the cache key covers
    that node's data fingerprint; when the key's entry is in ``cached`` it does not train.
    """
    import torch

    from trainables.models import apply_weights, build_model, load_weights
    from trainables.node import node_info
    from trainables.training import (
        evaluate,
        pick_device,
        reference_cache_key,
        reference_cache_name,
        reference_payload,
        train_epochs,
    )
    from trainables.trial import _cached_dataset

    torch.set_num_threads(max(1, job.threads))
    # Kept in this worker process: the final evaluation's tasks may run in it later.
    data = _cached_dataset(job.dataset, job.data_root, job.input_size, job.dataset_options)
    key = reference_cache_key(model=job.model, dataset=job.dataset, data=data,
                              dataset_options=job.dataset_options, data_root=job.data_root,
                              model_kwargs=job.model_kwargs)
    weights_name = getattr(job.settings, "weights", None)
    weights = load_weights(job.model, weights_name) if weights_name is not None else None
    payload = reference_payload(key, job.settings, seed=job.seed, weights=weights)
    name = reference_cache_name(payload)
    out = {"name": name, "payload": payload, "node": node_info()}
    if name in cached:
        yield {**out, "result": "cached"}
        return
    device = pick_device(job.gpus)
    model = build_model(job.model, seed=job.seed, **job.model_kwargs).model
    if weights is not None:  # pretrained: evaluated as it is, not retrained
        apply_weights(model, weights, job.model)
        model.to(device)
    else:
        for epoch in train_epochs(model, data, job.settings, seed=job.seed, device=device,
                                  num_workers=max(1, job.threads)):
            yield {"epoch": epoch, "epochs": job.settings.epochs}
    val_acc = evaluate(model, data.val, device=device, num_workers=max(1, job.threads))
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    yield {**out, "result": "trained", "state_dict": state, "val_acc": val_acc}


def run_reference(job: ReferenceJob, cache: ReferenceCache, *, cpus: float, gpus: float,
                  echo) -> tuple[dict, float, dict]:
    """The reference's ``(state_dict, val_acc, node)``: from the cache when its entry
    exists, else trained (or evaluated) by ``reference_task`` on a node with a trial's
    resources, then cached. ``node`` is where the task ran (``trainables.node.node_info``)."""
    import ray

    task = ray.remote(reference_task).options(num_cpus=cpus, num_gpus=gpus, max_retries=0)

    def messages(cached):
        try:
            for ref in task.remote(job, cached):
                yield ray.get(ref)
        except ray.exceptions.RayError as exc:
            raise _task_error(exc, "reference model") from None

    return _cached_reference(job, cache, messages, echo)


def local_reference(job: ReferenceJob, cache: ReferenceCache, *, echo=None) -> tuple[dict, float]:
    """``run_reference`` in this process (no Ray): the same task, cache key and cache entry,
    for benchmarks and tests that evaluate policies beside a search. ``(state_dict, val_acc)``."""
    import torch

    threads = torch.get_num_threads()  # reference_task sets its worker's; this process keeps its own
    try:
        state, val_acc, _node = _cached_reference(job, cache, lambda cached: reference_task(job, cached), echo)
    finally:
        torch.set_num_threads(threads)
    return state, val_acc


def _cached_reference(job: ReferenceJob, cache: ReferenceCache, messages, echo) -> tuple[dict, float, dict]:
    """Runs ``messages(cached)`` (``reference_task``'s stream, wherever it runs) and keeps
    the cache: writes a trained entry, reads a cached one."""
    cached = cache.names()
    for _ in range(2):  # a second run only if a cached entry turned out unreadable
        progress = ProgressLine("reference training", job.settings.epochs, "epochs", echo)
        message = None
        for message in messages(cached):
            if "epoch" in message:
                progress.update(message["epoch"])
        if message["result"] == "trained":
            cache.write(message["name"], message["payload"], message["state_dict"], message["val_acc"])
            return message["state_dict"], float(message["val_acc"]), message["node"]
        entry = cache.read(message["name"], message["payload"])
        if entry is not None:
            return entry[0], entry[1], message["node"]
        cached = cached - {message["name"]}  # another key's entry under this hash, or a broken file
    raise HaqtuneError("reference model: the cache entry could not be read twice")  # pragma: no cover


# ---- the sensitivity oracle ---------------------------------------------------------


class RemoteSensitivityRunner:
    """Evaluates a sensitivity oracle's points in Ray actors with a trial's resources.

    ``runner(context, points, calibration_samples) -> [val_acc, ...]``: up to ``workers``
    actors (``trainables.sensitivity.SensitivityEvaluator``) each load the model and data
    once, take points one at a time (so the work balances) and are killed at the end,
    releasing their resources for the trials. An evaluation is deterministic and does
    not depend on which actor runs it, so the answers do not depend on ``workers``.
    Pickles without its progress printer (it is stored with the searcher's state).
    """

    def __init__(self, *, cpus: float, gpus: float, workers: int, echo=None) -> None:
        self.cpus, self.gpus, self.workers = cpus, gpus, max(1, int(workers))
        self.echo = echo
        self.nodes: list[dict] = []  # where the last batch's actors ran

    def __getstate__(self) -> dict:
        return {**self.__dict__, "echo": None}

    def __call__(self, context, points: list[tuple], calibration_samples: int) -> list[float]:
        import ray
        from ray.util import ActorPool

        from trainables.sensitivity import SensitivityEvaluator

        actor = ray.remote(SensitivityEvaluator).options(num_cpus=self.cpus, num_gpus=self.gpus)
        context_ref = ray.put(context)
        actors = [actor.remote(context_ref, calibration_samples=calibration_samples, gpus=self.gpus)
                  for _ in range(min(self.workers, len(points)))]
        progress = ProgressLine("sensitivity measurement", len(points), "evaluations", self.echo)
        try:
            self.nodes = ray.get([a.node.remote() for a in actors])
            pool = ActorPool(actors)
            results: dict[int, float] = {}
            tasks = pool.map_unordered(lambda a, item: a.evaluate_indexed.remote(*item), list(enumerate(points)))
            for index, acc in tasks:
                results[index] = acc
                progress.update(len(results))
        except ray.exceptions.RayError as exc:
            raise _task_error(exc, "sensitivity measurement") from None
        finally:
            for a in actors:
                ray.kill(a)
        if self.echo is not None:
            self.echo(f"haqtune: sensitivity measurement ran on {describe_nodes(self.nodes)}")
        return [results[i] for i in range(len(points))]


def describe_nodes(nodes: Sequence[dict]) -> str:
    """``host (ip, node 1a2b3c4d)`` per distinct node: the id prefix tells apart nodes
    that share an IP (several raylets on one machine)."""
    seen = dict.fromkeys((n["hostname"], n["ip"], (n.get("node_id") or "")[:8]) for n in nodes)
    return ", ".join(f"{host} ({ip}, node {node})" if node else f"{host} ({ip})" for host, ip, node in seen)
