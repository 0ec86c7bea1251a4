"""Tuner wiring: validate a config, build everything, run the Ray Tune experiment, summarize.

``prepare`` does all validation with no side effects (no directory, no MLflow run),
so bad input fails before anything is written; ``run`` then executes the search.
"""

from __future__ import annotations

import dataclasses
import os
import secrets
import shlex  # a storage URI's query (&) must survive a copy-paste into a shell
import time
import warnings
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np

from hardware import CostTable, LayerSpec, extract_layers, get_cost_model
from search_spaces import AllowedBits, check_feasible, widest_uniform
from search_spaces import metrics as M
from trainables.data import DATASETS, DatasetFacts, DatasetOptions, check_subset, dataset_facts
from trainables.models import apply_weights, build_model, first_conv_channels, load_weights

from .config import AUTO, SearchConfig, fit_concurrency
from .errors import HaqtuneError
from .storage import Storage, check_storage, is_uri, open_storage

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CACHE_DIR = "_cache"  # reference models, shared by every search under one storage dir
# ``final_finetune``'s model of a ranked trial, beside Tune's checkpoint_00000N of that trial.
FINAL_CHECKPOINT_DIR = "checkpoint_final"
REFERENCE_NODE = "reference_node"  # TrialContext.extra key: where the reference ran (node_info)


@dataclass
class PreparedSearch:
    config: SearchConfig
    layers: list[LayerSpec]  # the priced layers (the cost table's rows), in policy order
    table: CostTable
    input_shape: tuple[int, int, int]  # one sample as trials run it (the data's shape)
    budget_limit: float | None
    model_kwargs: dict  # build_model keywords every process uses (classes, input size, channels)
    allowed: AllowedBits | None = None  # per-layer widths: bit sets, fixed first/last layers
    cost_input_shape: tuple[int, int, int] | None = None  # the priced shape when cost_input_size is set
    facts: DatasetFacts | None = None  # classes, sample shape, per-class pool (no image read)

    @property
    def priced_shape(self) -> tuple[int, int, int]:
        return self.cost_input_shape or self.input_shape


def _dataset_facts(config: SearchConfig) -> DatasetFacts:
    """The dataset's classes and the sample shape trials run, checked against the
    settings (input size, subset) without reading an image or downloading anything."""
    if config.dataset not in DATASETS:
        raise HaqtuneError(f"unknown dataset {config.dataset!r}: choose between {', '.join(DATASETS)}")
    facts = dataset_facts(config.dataset, root=config.data_root, input_size=config.input_size)
    size = facts.input_shape[1]
    if config.input_size is not None and config.input_size != size:
        raise HaqtuneError(
            f"input_size: {config.dataset} images are {size}x{size} and input_size resizes only "
            f"imagefolder data, got {config.input_size}; to price another resolution set cost_input_size"
        )
    check_subset(facts, DatasetOptions.from_dict(config.dataset_options))
    return facts


def _check_channels(config: SearchConfig, model, data_shape: tuple[int, int, int]) -> None:
    channels = first_conv_channels(model)
    if channels is not None and channels != data_shape[0]:
        raise HaqtuneError(
            f"model {config.model!r} takes {channels}-channel images, but dataset {config.dataset!r} has "
            f"{data_shape[0]}-channel images {list(data_shape)}: pick a model and dataset that fit"
        )


def _priced_layers(config: SearchConfig, model, trial_layers: list[LayerSpec],
                   data_shape: tuple[int, int, int]) -> tuple[list[LayerSpec], tuple[int, int, int] | None]:
    """The layers the cost table prices: the trials' own, or at ``cost_input_size``."""
    if config.cost_input_size is None or config.cost_input_size == data_shape[1]:
        return trial_layers, None
    shape = (data_shape[0], config.cost_input_size, config.cost_input_size)
    layers = extract_layers(model, shape)
    if [s.name for s in layers] != [s.name for s in trial_layers]:
        raise HaqtuneError(
            f"cost_input_size: model {config.model!r} runs other layers at {shape[1]}x{shape[2]} "
            f"({len(layers)}) than at the data's {data_shape[1]}x{data_shape[2]} ({len(trial_layers)}): "
            "expected the same layers at both sizes"
        )
    return layers, shape


def prepare(config: SearchConfig) -> PreparedSearch:
    """Validate everything that can be checked before a trial runs; write nothing."""
    try:
        cost_model = get_cost_model(config.hardware, **config.hardware_options)
        facts = _dataset_facts(config)
        data_shape = facts.input_shape
        # Priced = trained: the model is built for, and traced at, the shape the trials run.
        model_kwargs = {"num_classes": facts.num_classes, "input_size": data_shape[1],
                        "in_channels": data_shape[0]}
        built = build_model(config.model, seed=config.seed, **model_kwargs)
        _check_channels(config, built.model, data_shape)
        if tuple(built.input_shape) != data_shape:
            raise HaqtuneError(
                f"model {config.model!r} takes inputs of shape {list(built.input_shape)}, but dataset "
                f"{config.dataset!r} has {list(data_shape)}: pick a model that fits (demo for digits)"
            )
        if config.reference.weights is not None:  # another architecture fails here, before any write
            apply_weights(built.model, load_weights(config.model, config.reference.weights), config.model)
        trial_layers = extract_layers(built.model, data_shape)
        layers, cost_shape = _priced_layers(config, built.model, trial_layers, data_shape)
        table = cost_model.table(layers, config.batch)
        allowed = config.allowed_bits(len(layers))
        limit = check_feasible(table, config.budget, allowed=allowed) if config.budget else None
        check_storage(config.storage_dir)  # scheme, credentials, bucket: read only
    except HaqtuneError:
        raise
    except (ValueError, TypeError, RuntimeError, OSError) as exc:
        raise HaqtuneError(str(exc)) from None
    return PreparedSearch(config, layers, table, data_shape, limit, model_kwargs, allowed, cost_shape, facts)


def new_search_id(searcher: str) -> str:
    return f"{searcher}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _search_params(config: SearchConfig, prepared: PreparedSearch) -> dict:
    return {
        "searcher": config.searcher, "hardware": config.hardware, "budget": str(config.budget),
        "model": config.model, "dataset": config.dataset, "seed": config.seed,
        "num_trials": config.num_trials, "max_concurrent": config.max_concurrent,
        "scheduler": config.scheduler, "num_layers": len(prepared.layers),
        "min_bits": config.min_bits, "max_bits": config.max_bits,
        "bits": prepared.allowed.describe(), "fix_first_last": config.fixes_first_last,
        "finetune_epochs": config.finetune.epochs, "finetune_amp": config.finetune.amp,
        # Every fine-tune setting, as one text: what aqgan's experiment history matches on.
        "finetune": _settings_text(config.finetune),
        "final_finetune": _settings_text(config.final_finetune) if config.final_finetune else None,
        "batch": prepared.table.batch,
        "input_shape": _shape_text(prepared.input_shape), "cost_input_size": config.cost_input_size,
        "priced_shape": _shape_text(prepared.priced_shape), "dataset_options": config.dataset_options or None,
        "reference_weights": config.reference.weights,
        "weight_granularity": config.weight_granularity, "weight_quantizer": config.weight_quantizer,
        "quantize": config.quantize,
    }


class _DropIncompleteTrials:
    """Logging filter: drop Ray Tune's "Trials did not complete" error line."""

    def filter(self, record) -> bool:
        return not str(record.msg).startswith("Trials did not complete")


def _settings_text(settings) -> str:
    """A training section as one param: "epochs=2, lr=0.01, ..." (every field)."""
    return ", ".join(f"{k}={v}" for k, v in dataclasses.asdict(settings).items())


def _shape_text(shape) -> str:
    return "x".join(str(int(d)) for d in shape)


def input_note(prepared: PreparedSearch) -> str:
    """What the trials run and what the cost table prices (they differ only with cost_input_size)."""
    note = f"trials run {_shape_text(prepared.input_shape)} inputs"
    if prepared.cost_input_shape is not None:
        return f"{note}, priced at {_shape_text(prepared.cost_input_shape)} (cost_input_size)"
    return f"{note}, priced at the same shape"


def uniform8_note(prepared: PreparedSearch) -> str:
    """The uniform 8-bit policy's cost (what `haqtune cost ... --bits 8` prints for the priced shape)."""
    latency_ms, energy_mj, size_mb = prepared.table.layer_costs(prepared.table.uniform(8))
    return (f"uniform 8-bit latency_ms={latency_ms.sum():.6g} energy_mj={energy_mj.sum():.6g} "
            f"size_mb={size_mb.sum():.6g}")


def quiet_libraries() -> None:
    """Keep the terminal to haqtune's own progress lines: Ray Tune's legacy reporter at
    verbose=0 prints nothing, and Optuna / MLflow info logs say nothing a user needs."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    # Every finished trial's checkpoint forces an experiment-state save, on purpose
    # (nothing finished is forgotten after a crash): no warning about frequent saves.
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    for name in ("optuna", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # A failed trial's progress line carries its error's last line and error file; Ray
    # Tune's full traceback per attempt and its "Trials did not complete" summary would
    # repeat that at length.
    os.environ.setdefault("TUNE_PRINT_ALL_TRIAL_ERRORS", "0")
    tune_log = logging.getLogger("ray.tune.tune")
    if not any(isinstance(f, _DropIncompleteTrials) for f in tune_log.filters):
        tune_log.addFilter(_DropIncompleteTrials())
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    # No address = a fresh local instance: a plain ray.init() would join (and, if it is
    # gone, wait forever for) whatever cluster /tmp/ray/ray_current_cluster names.
    ray.init(address=address or "local", include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")
    if address is None and Path("/proc").is_dir():
        _start_reaper()


def _start_reaper() -> None:
    """Ray's helper processes of this driver's local instance die with it, even on
    SIGKILL (``orchestrator/_reaper.py``)."""
    import subprocess
    import sys

    subprocess.Popen([sys.executable, str(Path(__file__).with_name("_reaper.py")), str(os.getpid())],
                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                     start_new_session=True, close_fds=True)


def _scheduler(config: SearchConfig):
    if config.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Epochs are Tune iterations; a trial stopped at rung r reports the val_acc it reached.
    return ASHAScheduler(metric=M.VAL_ACC, mode="max", time_attr="training_iteration",
                         max_t=max(config.finetune.epochs, 1), grace_period=1, reduction_factor=2)


class SearchInterrupted(Exception):
    """Ctrl-C / SIGTERM stopped the search; its state is saved and ``resume`` continues it."""

    def __init__(self, search_dir: Storage) -> None:
        super().__init__(f"interrupted; continue with: haqtune resume {shlex.quote(str(search_dir))}")
        self.search_dir = search_dir


@dataclass(frozen=True)
class SearchPlan:
    """Where a search lives and the resolved config it runs with (absolute paths).

    ``search_dir`` is a ``Storage`` location (a local directory or a URI such as
    ``s3://bucket/haqtune_runs/<id>``): every file of the search goes through it."""

    config: SearchConfig
    search_id: str
    search_dir: Storage
    resumed: bool

    @property
    def storage(self) -> Storage:
        return self.search_dir.parent

    @property
    def cache(self) -> Storage:
        """The reference-model cache, shared by every search under one storage location."""
        return self.storage / CACHE_DIR


def run(prepared: PreparedSearch, *, echo=print, search_id: str | None = None,
        resume_dir: Storage | str | None = None) -> dict:
    """Run the search; returns the summary dict (also written to the search directory).

    With ``resume_dir`` (an existing search directory, checked by ``resume_plan``) the
    Ray Tune experiment is restored instead (``Tuner.restore(..., resume_errored=True)``):
    finished trials are kept, unfinished and errored ones run again, the searcher
    continues from its saved state, and the MLflow tracker reattaches to the same
    parent and child runs. Raises ``SearchInterrupted`` after Ctrl-C / SIGTERM.
    """
    quiet_libraries()
    check_cluster(prepared.config)  # before plan_search: a cluster that cannot run it writes nothing
    plan = plan_search(prepared, search_id=search_id, resume_dir=resume_dir)
    started = time.time()
    echo(f"haqtune: {'resuming' if plan.resumed else 'search'} {plan.search_id}: {plan.config.searcher} on "
         f"{plan.config.model}/{plan.config.dataset}, {plan.config.hardware} (batch {prepared.table.batch}), "
         f"budget {plan.config.budget}, {len(prepared.layers)} layers, {plan.config.num_trials} trials; "
         f"{input_note(prepared)}; {uniform8_note(prepared)}")
    _echo_bits(prepared, echo)
    plan = resolve_concurrency(plan, echo)
    from .cluster_resources import gpu_fallback_note

    if (note := gpu_fallback_note(plan.config, echo=echo)) is not None:
        echo(note)  # once per search, not once per trial
    context = build_reference(plan, prepared, echo)
    searcher = None if plan.resumed else build_searcher(plan, prepared, context, echo)
    tracker = build_tracker(plan, prepared)
    tracker.start()
    try:
        results = run_tuner(plan, context, searcher, tracker, echo)
        summary = summarize(results, context, plan, tracker, started, echo, prepared.layers)
    except (SearchInterrupted, KeyboardInterrupt):
        tracker.end("KILLED")
        if (plan.search_dir / "tuner.pkl").exists():
            echo(f"\nhaqtune: interrupted: running trials were stopped and the search state saved; "
                 f"continue with:\n  haqtune resume {shlex.quote(str(plan.search_dir))}")
        else:
            echo("\nhaqtune: interrupted before the first trial started: nothing to resume")
        raise
    except BaseException:
        tracker.end("KILLED")
        raise
    tracker.end("FINISHED")
    return summary


def plan_search(prepared: PreparedSearch, *, search_id: str | None = None,
                resume_dir: Storage | str | None = None) -> SearchPlan:
    """The search directory and the resolved config; a new search writes ``config.yaml``
    with absolute paths and tracking URI, so the directory is self-contained. The
    directory is ``<storage_dir>/<search_id>`` in the configured storage (local or URI)."""
    from .tracking import absolute_tracking_uri, resolve_tracking_uri

    config = prepared.config
    if resume_dir is not None:
        search_dir = open_storage(resume_dir)
        resolved = config.resolved(tracking_uri=absolute_tracking_uri(resolve_tracking_uri(config.tracking_uri)),
                                   storage_dir=str(search_dir.parent))
        if resolved != read_config(search_dir):
            write_config(search_dir, resolved)  # e.g. resume --tracking-uri, or an old config
        return SearchPlan(resolved, search_dir.name, search_dir, resumed=True)
    resolved = config.resolved(tracking_uri=absolute_tracking_uri(resolve_tracking_uri(config.tracking_uri)))
    search_id = search_id or new_search_id(config.searcher)
    search_dir = open_storage(resolved.storage_dir) / search_id
    search_dir.mkdir(exist_ok=False)
    write_config(search_dir, resolved)
    return SearchPlan(resolved, search_id, search_dir, resumed=False)


def check_cluster(config: SearchConfig) -> None:
    """Fail fast (HaqtuneError) on an ``--address`` nobody answers on, or a trial no node
    of the cluster (autoscaler node types included) can hold; then Ray is connected."""
    from .cluster_resources import check_address, check_trial_fits, read_cluster

    check_address(config.address)
    try:
        _init_ray(config.address)
    except (ConnectionError, RuntimeError) as exc:
        if config.address is None:
            raise
        # Something answered the TCP check but it is not a Ray head (Ray gave up after ~20 s).
        last = (str(exc).strip().splitlines() or [type(exc).__name__])[-1]
        raise HaqtuneError(f"--address {config.address}: no Ray cluster answers there ({last}); expected "
                           "the address of a running cluster's head (`ray start --head` prints it)") from None
    check_trial_fits(read_cluster(), cpus_per_trial=config.cpus_per_trial,
                     gpus_per_trial=config.gpus_per_trial)


def read_config(search_dir: Storage) -> SearchConfig:
    """The resolved config a search directory keeps (``config.yaml``)."""
    location = search_dir / CONFIG_FILE
    return SearchConfig.from_yaml_text(location.read_text(), source=f"config file {str(location)!r}")


def write_config(search_dir: Storage, config: SearchConfig) -> None:
    (search_dir / CONFIG_FILE).write_text(config.to_yaml())


def resolve_concurrency(plan: SearchPlan, echo) -> SearchPlan:
    """``max_concurrent: auto`` -> as many trials as the Ray cluster fits (starts Ray); on
    an autoscaling cluster, as many as its configured maximum fits."""
    config = plan.config
    _init_ray(config.address)
    if config.max_concurrent != AUTO:
        return plan
    from .cluster_resources import read_cluster

    view = read_cluster()
    cluster = view.max_resources()
    n = fit_concurrency(cluster, cpus_per_trial=config.cpus_per_trial,
                        gpus_per_trial=config.gpus_per_trial, num_trials=config.num_trials)
    now = view.current_resources()
    scaling = (f" at most with the autoscaler ({view.source}), {now['CPU']:g} CPUs, {now['GPU']:g} GPUs now"
               if view.node_types else "")
    echo(f"haqtune: {n} trials at once (max_concurrent auto: {cluster.get('CPU', 0):g} CPUs, "
         f"{cluster.get('GPU', 0):g} GPUs{scaling}; a trial takes {config.cpus_per_trial:g} CPU + "
         f"{config.gpus_per_trial:g} GPU)")
    return dataclasses.replace(plan, config=config.replace(max_concurrent=n))


def reference_job(config: SearchConfig, prepared: PreparedSearch):
    """What the reference task needs to train (or load) this config's reference model."""
    from .remote import ReferenceJob

    return ReferenceJob(model=config.model, model_kwargs=dict(prepared.model_kwargs), dataset=config.dataset,
                        data_root=config.data_root, input_size=config.input_size,
                        dataset_options=dict(config.dataset_options), settings=config.reference,
                        seed=config.seed, gpus=config.gpus_per_trial, threads=max(1, int(config.cpus_per_trial)))


def trial_context(config: SearchConfig, prepared: PreparedSearch, state: dict, ref_acc: float, **changes):
    """The trials' context: the reference (``state``, ``ref_acc``) and what a trial needs of the config."""
    from trainables import TrialContext

    context = TrialContext(
        model=config.model, dataset=config.dataset, model_kwargs=prepared.model_kwargs,
        input_size=config.input_size, layer_names=tuple(s.name for s in prepared.layers),
        reference_state=state, ref_acc=ref_acc, table=prepared.table, budget=config.budget,
        finetune=config.finetune, seed=config.seed,
        min_bits=config.min_bits, max_bits=config.max_bits, data_root=config.data_root,
        gpus_per_trial=config.gpus_per_trial, allowed=prepared.allowed,
        dataset_options=dict(config.dataset_options), quant=config.quant_options())
    return dataclasses.replace(context, **changes)


def build_reference(plan: SearchPlan, prepared: PreparedSearch, echo):
    """The full-precision reference (from the cache, pretrained, or trained) and the trials'
    context. Trained or evaluated in a Ray task with a trial's resources, never in the
    driver (``orchestrator/remote.py``); ``context.extra[REFERENCE_NODE]`` says where."""
    from .remote import run_reference

    config = plan.config
    # Pretrained weights (reference.weights) are evaluated as they are; otherwise trained once.
    state, ref_acc, node = run_reference(reference_job(config, prepared), reference_cache(plan),
                                         cpus=config.cpus_per_trial, gpus=config.gpus_per_trial, echo=echo)
    echo(f"haqtune: full-precision reference val_acc={ref_acc:.4f}"
         f"{' (pretrained: ' + config.reference.weights + ', not retrained)' if config.reference.weights else ''}")
    return trial_context(config, prepared, state, ref_acc, extra={REFERENCE_NODE: node})


def local_context(config: SearchConfig, prepared: PreparedSearch, storage: str | Path, *, echo=None,
                  **changes):
    """``build_reference`` in this process, without Ray: the trials' context of ``config``
    with the reference model its searches under ``storage`` share (the same cache entry:
    the very weights they fine-tune from; trained and cached there if missing). For
    benchmarks and tests that evaluate policies next to a search
    (``trainables.evaluate_on_test``). ``changes``: TrialContext fields to override (``finetune``)."""
    from .remote import ReferenceCache, local_reference

    config = config.resolved(tracking_uri=config.tracking_uri)  # absolute data root, as a search keeps it
    state, ref_acc = local_reference(reference_job(config, prepared),
                                     ReferenceCache(open_storage(str(storage)) / CACHE_DIR),
                                     echo=echo)
    return trial_context(config, prepared, state, ref_acc, **changes)


def reference_cache(plan: SearchPlan):
    """Where reference models are cached: one per storage directory, shared by its searches."""
    from .remote import ReferenceCache

    return ReferenceCache(plan.cache)


def build_searcher(plan: SearchPlan, prepared: PreparedSearch, context, echo):
    """The searcher of a new search (a restored one comes from the experiment state)."""
    from orchestrator.searchers import SearchProblem, make_searcher

    config = plan.config
    problem = SearchProblem(
        layers=prepared.layers, table=prepared.table, budget=config.budget, min_bits=config.min_bits,
        max_bits=config.max_bits, allowed=prepared.allowed,
        cost_metric=config.budget.metric if config.budget else M.LATENCY_MS,
        seed=config.seed, num_trials=config.num_trials, max_concurrent=config.max_concurrent,
        extra={"ref_acc": context.ref_acc}, accuracy_oracle=_accuracy_oracle(config, context, echo))
    options = dict(config.searcher_options)
    if options.pop(HISTORY_OPTION, False):  # seed the searcher from earlier searches' trials
        options["history"] = experiment_history(config, prepared, echo)
    # A searcher's warnings (e.g. haq: too few trials after its warm-up) as one plain line
    # each, not a Python warning with a source line.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        searcher = make_searcher(config.searcher, problem, **options)
    for warning in caught:
        echo(f"haqtune: warning: {warning.message}")
    return searcher


def build_tracker(plan: SearchPlan, prepared: PreparedSearch):
    from .tracking import MlflowTracker

    return MlflowTracker(
        tracking_uri=plan.config.tracking_uri, experiment=plan.config.experiment,
        search_id=plan.search_id, searcher=plan.config.searcher, search_dir=plan.search_dir,
        params=_search_params(plan.config, prepared), config_path=plan.search_dir / CONFIG_FILE)


def run_tuner(plan: SearchPlan, context, searcher, tracker, echo):
    """The Ray Tune experiment, new or restored; returns its ResultGrid."""
    from ray import tune

    from trainables import quantize_and_finetune

    from . import callbacks as cb

    config = plan.config
    _init_ray(config.address)
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(quantize_and_finetune, context=context), resources)
    interrupts = cb.Interrupts()
    # The tracker before the printer: a trial printed as finished is logged in MLflow.
    # A resumed search counts on from the trials its first driver saw finish.
    cb.register(plan.search_id, [
        interrupts, tracker, cb.CheckpointKeeper(config.test_top_k),
        cb.ProgressPrinter(config.num_trials, echo, tracker.completed, tracker.best_val_acc)])
    if plan.resumed:
        tuner = tune.Tuner.restore(str(plan.search_dir), trainable=trainable, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space={"_num_threads": max(1, int(config.cpus_per_trial))},
            tune_config=tune.TuneConfig(search_alg=searcher, scheduler=_scheduler(config),
                                        num_samples=config.num_trials,
                                        max_concurrent_trials=config.max_concurrent,
                                        # One worker process per slot for the whole search:
                                        # importing torch per trial would cost seconds each.
                                        reuse_actors=True,
                                        trial_dirname_creator=_trial_dirname),
            run_config=tune.RunConfig(
                name=plan.search_id, storage_path=str(plan.storage), verbose=0,
                callbacks=[cb.DriverCallbacks(plan.search_id)],
                failure_config=tune.FailureConfig(max_failures=config.max_failures),
                # One checkpoint per finished trial (its fine-tuned quantized model);
                # CheckpointKeeper keeps the search's best test_top_k. num_to_keep=1 also
                # makes Tune save the experiment state as soon as a trial has reported
                # its final result, so no finished trial is forgotten after a crash.
                checkpoint_config=tune.CheckpointConfig(
                    num_to_keep=1, checkpoint_score_attribute=M.VAL_ACC, checkpoint_score_order="max")),
        )
    interrupts.arm()
    try:
        results = tuner.fit()
    finally:
        interrupts.disarm()
        cb.unregister(plan.search_id)
    if interrupts.signal is not None:
        raise SearchInterrupted(plan.search_dir)
    return results


def _echo_bits(prepared: PreparedSearch, echo) -> None:
    """Say which widths the search may use, and whether the hardware tells more of them apart."""
    from hardware import cost_model_natural_bits

    from .cost_cli import natural_bits_note

    config, allowed = prepared.config, prepared.allowed
    echo(f"haqtune: bits {allowed.describe()}"
         f"{' (first and last layers fixed: fix_first_last)' if config.fixes_first_last else ''}")
    natural = cost_model_natural_bits(config.hardware)
    searched = allowed.mask[~allowed.fixed] if not allowed.fixed.all() else allowed.mask
    if natural is not None and searched[..., np.asarray(natural) - 1].sum() < searched.sum():
        echo(f"haqtune: note: {config.hardware} {natural_bits_note(natural)}")


# ``searcher_options`` flag: pass the finished trials of earlier searches of the same network,
# data, fine-tune and bit range (any searcher, any hardware) as the searcher's ``history``.
HISTORY_OPTION = "history_from_experiment"
# What a policy's accuracy depends on (not the hardware, not the searcher): earlier
# searches that agree on all of it can seed a new one.
HISTORY_MATCH = ("model", "dataset", "dataset_options", "input_shape", "reference_weights", "num_layers",
                 "min_bits", "max_bits", "finetune", "seed",
                 "weight_granularity", "weight_quantizer", "quantize")


def experiment_history(config: SearchConfig, prepared: PreparedSearch, echo) -> list[tuple[str, float]]:
    from .tracking import load_trial_history, resolve_tracking_uri

    params = _search_params(config, prepared)
    history = load_trial_history(resolve_tracking_uri(config.tracking_uri), config.experiment,
                                 {k: params[k] for k in HISTORY_MATCH})
    echo(f"haqtune: {len(history)} finished trials of earlier searches in experiment "
         f"{config.experiment!r} seed the searcher")
    return history


# Searchers that measure per-layer sensitivity through ``SearchProblem.accuracy_oracle``.
# Only they get one: the oracle holds the reference weights, and the searcher (with
# its problem) is pickled into the Tune experiment state.
ORACLE_SEARCHERS = ("sensitivity-dp",)


def _accuracy_oracle(config: SearchConfig, context, echo=None):
    if config.searcher not in ORACLE_SEARCHERS:
        return None
    from trainables.sensitivity import make_sensitivity_oracle

    from .remote import RemoteSensitivityRunner

    # Lazy: evaluates on its first call, in Ray actors with a trial's resources, as many
    # at once as trials would run (no trial runs while the searcher measures).
    runner = RemoteSensitivityRunner(cpus=config.cpus_per_trial, gpus=config.gpus_per_trial,
                                     workers=int(config.max_concurrent), echo=echo)
    return make_sensitivity_oracle(context, runner=runner)


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def resume_plan(search_dir: str | Path, *, tracking_uri: str | None = None) -> tuple[PreparedSearch, Storage]:
    """Validate a search directory (a local path or a storage URI such as
    ``s3://bucket/haqtune_runs/<id>``) and re-prepare its resolved config (writes nothing).

    ``tracking_uri`` redirects the search to a moved MLflow store. The store the search
    will write to must hold its experiment and runs (else HaqtuneError): resuming
    against another store would drop every write to the search's runs.
    """
    from .tracking import (
        RUN_MAP_FILE,
        absolute_tracking_uri,
        check_search_runs,
        resolve_tracking_uri,
    )

    search_dir = check_storage(search_dir if is_uri(search_dir) else Path(search_dir).resolve(),
                               what="SEARCH_DIR")
    if not (search_dir / CONFIG_FILE).is_file() or not (search_dir / "tuner.pkl").is_file():
        raise HaqtuneError(
            f"{str(search_dir)!r} is not a haqtune search directory: expected {CONFIG_FILE} and "
            "a Ray Tune experiment (tuner.pkl) in it, as under ./haqtune_runs/<search_id>/"
        )
    if (search_dir / SUMMARY_FILE).is_file():
        raise HaqtuneError(f"search {search_dir.name} already finished (its {SUMMARY_FILE} exists): "
                           "nothing to resume")
    # The storage as this machine reaches it (the search may have been started elsewhere).
    config = read_config(search_dir).replace(storage_dir=str(search_dir.parent))
    if tracking_uri is not None:
        config = config.replace(tracking_uri=tracking_uri)
    uri = absolute_tracking_uri(resolve_tracking_uri(config.tracking_uri))
    check_search_runs(uri, search_dir / RUN_MAP_FILE, search_id=search_dir.name)
    return prepare(config.replace(tracking_uri=uri)), search_dir


def results_frame(results):
    """One row per trial: id, status, metrics, projected policy (completion order is Tune's)."""
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id"), "status": "FAILED" if r.error else
               ("FINISHED" if m.get(M.DONE, 0) else "KILLED")}
        for key in (M.VAL_ACC, M.ACC_DROP, M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB, M.REWARD, M.POLICY):
            row[key] = None if r.error else m.get(key)
        rows.append(row)
    return pd.DataFrame(rows, columns=["trial_id", "status", M.VAL_ACC, M.ACC_DROP, M.LATENCY_MS,
                                       M.ENERGY_MJ, M.SIZE_MB, M.REWARD, M.POLICY])


def evaluate_best(results, plan: SearchPlan, context, frame, echo) -> list[dict]:
    """Test accuracy of the best ``test_top_k`` finished trials, from their own checkpoints.

    Each evaluation is a Ray task with a trial's resources (so a GPU cluster evaluates on
    a GPU worker, never on the head), loading the fine-tuned quantized model the trial
    reported: the accuracy printed is the one of the model that was chosen.
    """
    import ray

    from trainables.trial import evaluate_checkpoint

    from .callbacks import checkpoint_exists, ranked_trials

    config = plan.config
    checkpoints = {(r.metrics or {}).get("trial_id"): r.checkpoint for r in results}
    rows = [dict(row) for row in frame.to_dict("records")
            if checkpoints.get(row["trial_id"]) is not None and checkpoint_exists(checkpoints[row["trial_id"]])]
    best = ranked_trials(rows, config.test_top_k)
    if config.final_finetune is not None:
        return final_finetune_best(best, plan, context, echo)

    from trainables.node import node_info

    from .remote import ProgressLine, gather

    @ray.remote(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial)
    def evaluate_task(checkpoint):
        with checkpoint.as_directory() as directory:
            return {**evaluate_checkpoint(directory, dataset=config.dataset, data_root=config.data_root,
                                          input_size=config.input_size, dataset_options=config.dataset_options,
                                          gpus=config.gpus_per_trial,
                                          num_threads=max(1, int(config.cpus_per_trial))),
                    "node": node_info()}

    evaluated = gather([evaluate_task.remote(checkpoints[row["trial_id"]]) for row in best],
                       ProgressLine("final evaluation", len(best), "checkpoints", echo) if best else None)
    out = []
    for row, result in zip(best, evaluated, strict=True):
        checkpoint = checkpoints[row["trial_id"]]
        out.append({"trial_id": row["trial_id"], M.VAL_ACC: row[M.VAL_ACC], M.TEST_ACC: result[M.TEST_ACC],
                    **{k: row[k] for k in (M.ACC_DROP, M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB, M.REWARD)},
                    M.POLICY: row[M.POLICY], "checkpoint": str(checkpoint.path),
                    "checkpoint_val_acc": result["checkpoint_val_acc"], "node": result["node"]})
    return out


def last_line(exc: BaseException) -> str:
    """The last line of an exception's message (a remote traceback's own error), or ""."""
    text = str(exc).strip()
    return text.splitlines()[-1] if text else ""


def final_context(plan: SearchPlan, context):
    """The context the summary's evaluations train with: ``final_finetune`` when set."""
    final = plan.config.final_finetune
    return context if final is None else dataclasses.replace(context, finetune=final)


def final_finetune_best(best: list[dict], plan: SearchPlan, context, echo) -> list[dict]:
    """HAQ's final step for the ranked policies: each is fine-tuned ``final_finetune`` from
    the reference (a Ray task with a trial's resources), saved as
    ``trial_<id>/checkpoint_final`` in the search's storage (what ``export`` loads) and tested.

    The rows are then ordered by their validation accuracy after that fine-tune, so the
    first is the one a user would deploy, chosen without the test split: a policy that led
    the search by a lucky short fine-tune (a winner's curse on 360 images) is re-measured.
    """
    import tempfile

    import ray

    from trainables.trial import CHECKPOINT_FILE

    from .remote import ProgressLine, gather

    config = plan.config
    shared = ray.put(final_context(plan, context))
    threads = max(1, int(config.cpus_per_trial))

    @ray.remote(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial)
    def final_task(ctx, policy, target: Storage):
        from trainables.node import node_info
        from trainables.trial import final_finetune

        try:
            with tempfile.TemporaryDirectory() as tmp:
                metrics = final_finetune(ctx, policy, tmp, num_threads=threads)
                (target / CHECKPOINT_FILE).upload(Path(tmp) / CHECKPOINT_FILE)
        except Exception as exc:  # one policy's failure must not lose the finished search
            return {"error": f"{type(exc).__name__}: {last_line(exc)}"[:300]}
        return {**metrics, "node": node_info()}

    from search_spaces import parse_policy

    targets = [plan.search_dir / f"trial_{row['trial_id']}" / FINAL_CHECKPOINT_DIR for row in best]
    refs = [final_task.remote(shared, np.asarray(parse_policy(row[M.POLICY])), target)
            for row, target in zip(best, targets, strict=True)]
    tuned = gather(refs, ProgressLine(f"final fine-tune ({config.final_finetune.epochs} epochs)", len(best),
                                      "policies", echo) if best else None)
    out = []
    for row, result, target in zip(best, tuned, targets, strict=True):
        if "error" in result:
            echo(f"haqtune: warning: the final fine-tune of trial {row['trial_id']} failed "
                 f"({result['error']}); it is left out of the best policies")
            continue
        out.append({"trial_id": row["trial_id"], M.VAL_ACC: result[M.VAL_ACC], M.TEST_ACC: result[M.TEST_ACC],
                    "search_val_acc": row[M.VAL_ACC], M.ACC_DROP: result[M.ACC_DROP],
                    **{k: row[k] for k in (M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB, M.REWARD)},
                    M.POLICY: row[M.POLICY], "checkpoint": str(target),
                    "checkpoint_val_acc": result[M.VAL_ACC], "node": result["node"]})
    out.sort(key=lambda r: -r[M.VAL_ACC])  # stable: the search's order among equals
    return out


def submit_uniform(plan: SearchPlan, context, policies: dict[str, np.ndarray]) -> dict:
    """Uniform policies (8-bit, and the widest one inside the budget) fine-tuned
    (``final_finetune`` when set) and test-evaluated like the best ones, not projected, in
    Ray tasks with a trial's resources (nothing heavy runs in the driver). Returns their
    ObjectRefs by name, so they run alongside the final evaluations; the context (the
    reference's weights) goes to the object store once for all of them."""
    import ray

    from trainables import evaluate_on_test

    config = plan.config

    @ray.remote(num_cpus=config.cpus_per_trial, num_gpus=config.gpus_per_trial)
    def evaluate_task(ctx, policy):
        from trainables.node import node_info

        return {**evaluate_on_test(ctx, policy, project=False), "node": node_info()}

    shared = ray.put(final_context(plan, context)) if policies else None
    return {name: evaluate_task.remote(shared, policy) for name, policy in policies.items()}


def gather_comparison(ref, echo, failed: str) -> dict | None:
    """The result of one ``submit_uniform`` task, or None after the warning ``failed``
    (formatted with the error's ``last`` line): a comparison point's failed fine-tune must
    not lose the finished search."""
    import ray

    if ref is None:
        return None
    try:
        return ray.get(ref)
    except Exception as exc:
        echo("haqtune: warning: " + failed.format(last=last_line(exc) or type(exc).__name__))
        return None


def uniform_in_budget(context) -> tuple[tuple[int, int], np.ndarray] | None:
    """((w, a), policy) of the widest uniform policy of the search's space whose own cost
    is inside its budget (fixed layers at their width; ``search_spaces.widest_uniform``):
    the fixed-bit baseline a mixed policy has to beat. None when no uniform policy fits."""
    allowed = context.allowed or AllowedBits.full(context.table.num_layers, context.min_bits, context.max_bits)
    pair = widest_uniform(context.table, context.budget, allowed)
    return None if pair is None else (pair, allowed.uniform(*pair))


def summarize(results, context, plan: SearchPlan, tracker, started: float, echo,
              layers: list[LayerSpec]) -> dict:
    """Test-evaluate the best trials' checkpoints (the only time test is touched),
    print, log, write ``summary.json`` into the search directory."""
    import json

    from trainables.node import node_info
    from trainables.trial import policy_costs

    config, search_id = plan.config, plan.search_id
    frame = results_frame(results)
    evaluate = config.test_top_k > 0
    # The fixed-bit baseline inside the budget, trained and tested like the rest: mixed
    # precision is only worth its search where it beats this.
    compare_uniform = evaluate and context.budget is not None and config.compare_uniform
    baseline = uniform_in_budget(context) if compare_uniform else None
    uniforms = {"uniform_8bit": context.table.uniform(8)} if evaluate else {}
    # A budget that fits 8/8 has the uniform 8-bit row as its baseline.
    if baseline is not None and not np.array_equal(baseline[1], context.table.uniform(8)):
        uniforms["uniform_in_budget"] = baseline[1]
    refs = submit_uniform(plan, context, uniforms)
    best_rows = evaluate_best(results, plan, context, frame, echo)
    reference = policy_costs(context.table, context.table.uniform(8))
    # Where the heavy steps ran (none of them in the driver): see orchestrator/remote.py.
    nodes = {"driver": node_info(), "reference": context.extra.get(REFERENCE_NODE),
             "final_evaluation": [row.pop("node") for row in best_rows]}
    # The uniform 8-bit policy, fine-tuned and tested like the best ones (not projected: it
    # is what every reduction is measured against), so the accuracy loss vs 8-bit can be
    # read off any search.
    eight = gather_comparison(refs.get("uniform_8bit"), echo, "the uniform 8-bit policy's fine-tune "
                              "failed ({last}); its test accuracy is not reported")
    if eight is not None:
        reference = {**reference, M.VAL_ACC: eight[M.VAL_ACC], M.TEST_ACC: eight[M.TEST_ACC]}
        nodes["uniform_8bit"] = eight["node"]
    uniform_budget = None
    if "uniform_in_budget" in refs:
        w_bits, a_bits = baseline[0]
        got = gather_comparison(refs["uniform_in_budget"], echo, f"the fine-tune of uniform {w_bits}/{a_bits} "
                                "(the widest uniform policy inside the budget) failed ({last}); it is not reported")
        if got is not None:
            nodes["uniform_in_budget"] = got["node"]
            uniform_budget = {"w_bits": w_bits, "a_bits": a_bits,
                              **{key: got[key] for key in (M.VAL_ACC, M.TEST_ACC, *M.COST_METRICS, M.POLICY)}}
    summary = {
        "search_id": search_id, "searcher": config.searcher, "num_trials": int(len(frame)),
        "failed_trials": int((frame["status"] == "FAILED").sum()),
        "stopped_early_trials": int((frame["status"] == "KILLED").sum()),
        "wall_time_s": time.time() - started, "ref_acc": context.ref_acc,
        "uniform_8bit": reference, "best": best_rows, "nodes": nodes,
    }
    if compare_uniform:
        # None: no uniform policy of the space fits, 8/8 does, or its fine-tune failed.
        summary[M.UNIFORM_IN_BUDGET] = uniform_budget
    echo(f"\nhaqtune: {len(frame)} trials ({summary['failed_trials']} failed, "
         f"{summary['stopped_early_trials']} stopped early) in {summary['wall_time_s']:.0f} s; "
         f"reference (full precision) val_acc={context.ref_acc:.4f}; uniform 8-bit: "
         f"latency_ms={reference[M.LATENCY_MS]:.4g} energy_mj={reference[M.ENERGY_MJ]:.4g} size_mb={reference[M.SIZE_MB]:.4g}")
    if M.TEST_ACC in reference:
        echo(f"haqtune: uniform 8-bit fine-tuned: val_acc={reference[M.VAL_ACC]:.4f} "
             f"test_acc={reference[M.TEST_ACC]:.4f}"
             + (f"; best policy's test_acc loss vs 8-bit: "
                f"{(reference[M.TEST_ACC] - best_rows[0][M.TEST_ACC]) * 100:.2f} points" if best_rows else ""))
    if uniform_budget is not None:
        echo(format_uniform_in_budget(uniform_budget, reference, config.budget.metric,
                                      best_rows[0] if best_rows else None))
    elif compare_uniform and baseline is None:
        echo(f"haqtune: no uniform policy of the search space fits the budget ({config.budget}): "
             "only a mixed one meets it")
    if best_rows:
        if config.final_finetune is not None:
            echo(f"haqtune: final fine-tune ({config.final_finetune.epochs} epochs) of the best "
                 f"{len(best_rows)} and the uniform policies above; ranked by val_acc after it (the "
                 "search's val_acc: search_val_acc in summary.json)")
        echo(format_best_table(best_rows, reference))
    from orchestrator.searchers import searcher_info

    if searcher_info(config.searcher).objective == "multi":
        cost_key = config.budget.metric if config.budget else M.LATENCY_MS  # the searcher's cost_metric
        done = frame[(frame["status"] == "FINISHED") & frame[M.VAL_ACC].notna()]
        summary["pareto_front"] = pareto_front(done.to_dict("records"), cost_key=cost_key)
        echo(format_pareto_table(summary["pareto_front"], cost_key))
    # Parent-run metrics: the MLflow runs table's columns for comparing searches.
    metrics = {"ref_acc": context.ref_acc, "trials_failed": summary["failed_trials"],
               "wall_time_s": summary["wall_time_s"],
               **{f"uniform8_{key}": reference[key] for key in (*M.COST_METRICS, M.TEST_ACC)
                  if key in reference}}
    if uniform_budget is not None:
        metrics.update({f"{M.UNIFORM_IN_BUDGET}_{key}": uniform_budget[key]
                        for key in ("w_bits", "a_bits", M.VAL_ACC, M.TEST_ACC, *M.COST_METRICS)})
    if best_rows:
        b = best_rows[0]
        if "search_val_acc" in b:
            # After a final fine-tune: its val_acc of the policy deployed; best_val_acc stays
            # the search's best (the best-so-far curve's last point, at the same step).
            metrics["final_val_acc"] = b[M.VAL_ACC]
        metrics.update({"best_val_acc": max(r.get("search_val_acc", r[M.VAL_ACC]) for r in best_rows),
                        "best_test_acc": b[M.TEST_ACC],
                        "best_acc_drop": b[M.ACC_DROP], f"best_{M.LATENCY_MS}": b[M.LATENCY_MS],
                        f"best_{M.ENERGY_MJ}": b[M.ENERGY_MJ], f"best_{M.SIZE_MB}": b[M.SIZE_MB]})
        for key in M.COST_METRICS:
            if b[key] > 0:
                metrics[f"{key.split('_')[0]}_reduction_x"] = reference[key] / b[key]
    artifacts = {
        "results.csv": frame.to_csv(index=False),
        # Readable by `haqtune cost --policy`: its "policy" is the w/a text form.
        "best_policy.json": json.dumps(best_rows[0] if best_rows else {}, indent=1),
    }
    if "pareto_front" in summary:
        artifacts["pareto_front.json"] = json.dumps(summary["pareto_front"], indent=1)
    # Files the searcher left for the record (aqgan: its generator), see SEARCHER_ARTIFACTS_DIR.
    from orchestrator.searchers import SEARCHER_ARTIFACTS_DIR

    searcher_dir = plan.search_dir / SEARCHER_ARTIFACTS_DIR
    artifacts.update({name: (searcher_dir / name).read_bytes() for name in searcher_dir.file_sizes()})
    try:
        from .report import search_artifacts

        artifacts.update(search_artifacts(
            frame, best_rows[0] if best_rows else None, layer_names=[s.name for s in layers],
            layer_kinds=[s.kind for s in layers],
            cost_metric=config.budget.metric if config.budget else M.LATENCY_MS, reference=reference,
            budget_limit=config.budget.limit_for(context.table) if config.budget else None,
            ref_acc=context.ref_acc, label=search_id))
    except Exception as exc:  # plots are a convenience; never lose a finished search to them
        echo(f"haqtune: warning: plots skipped ({type(exc).__name__}: {exc})")
    tracker.log_summary(metrics, artifacts)
    # Last: its presence marks a search as finished (resume refuses it).
    (plan.search_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=1))
    echo(f"haqtune: results in {plan.search_dir}")
    echo(f"haqtune: MLflow runs: {tracker.ui_hint()}")
    return summary


def format_uniform_in_budget(row: dict, reference: dict, metric: str, best: dict | None) -> str:
    """The summary's line on the widest uniform policy inside the budget, and the best
    policy's test accuracy against it (positive: mixed precision wins)."""
    reduction = f"{reference[metric] / row[metric]:.2f}x" if row[metric] > 0 else "-"
    line = (f"haqtune: uniform {row['w_bits']}/{row['a_bits']}, the widest uniform policy inside the "
            f"budget ({metric.split('_')[0]} {reduction} lower than 8-bit), fine-tuned: "
            f"val_acc={row[M.VAL_ACC]:.4f} test_acc={row[M.TEST_ACC]:.4f}")
    if best is not None:
        line += f"; best policy's test_acc vs it: {(best[M.TEST_ACC] - row[M.TEST_ACC]) * 100:+.2f} points"
    return line


def format_best_table(rows: list[dict], reference: dict) -> str:
    """The final table: accuracy, costs (and reduction vs 8-bit), bits per layer."""
    lines = [f"{'rank':>4}  {'val_acc':>7}  {'test_acc':>8}  {'latency_ms':>10}  {'energy_mj':>10}  "
             f"{'size_mb':>8}  {'vs 8-bit (lat/en/size)':>22}  policy w/a per layer"]
    for i, r in enumerate(rows, 1):
        ratio = "/".join(f"{reference[k] / r[k]:.2f}x" if r[k] > 0 else "-"
                         for k in (M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB))
        lines.append(f"{i:>4}  {r[M.VAL_ACC]:>7.4f}  {r[M.TEST_ACC]:>8.4f}  {r[M.LATENCY_MS]:>10.4g}  "
                     f"{r[M.ENERGY_MJ]:>10.4g}  {r[M.SIZE_MB]:>8.4g}  {ratio:>22}  {r[M.POLICY]}")
    return "\n".join(lines)


def pareto_front(rows: list[dict], *, acc_key: str = M.VAL_ACC, cost_key: str = M.LATENCY_MS) -> list[dict]:
    """The rows no other row beats on both ``acc_key`` (max) and ``cost_key`` (min).

    Sorted by cost, cheapest first (so accuracy strictly increases along the front);
    of rows with equal accuracy and cost only the first is kept. Rows missing either
    value are ignored. Returns plain dicts with trial id, accuracy, costs and policy.
    """
    import math

    keep = ("trial_id", M.VAL_ACC, M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB, M.POLICY)
    valid = []
    for row in rows:
        acc, cost = row.get(acc_key), row.get(cost_key)
        if acc is None or cost is None or not (math.isfinite(acc) and math.isfinite(cost)):
            continue
        valid.append(row)
    # Cheapest first, most accurate first among equal costs: a row is on the front
    # exactly when it is more accurate than every cheaper-or-equal row before it.
    valid.sort(key=lambda r: (r[cost_key], -r[acc_key]))
    front, best = [], -math.inf
    for row in valid:
        if row[acc_key] > best:
            best = row[acc_key]
            front.append({k: (float(row[k]) if isinstance(row.get(k), float) else row.get(k))
                          for k in dict.fromkeys((*keep, acc_key, cost_key)) if k in row})
    return front


def format_pareto_table(front: list[dict], cost_key: str) -> str:
    """The Pareto front as a table, cheapest first."""
    lines = [f"\nPareto front (val_acc max, {cost_key} min): {len(front)} policies",
             f"{'val_acc':>7}  {'latency_ms':>10}  {'energy_mj':>10}  {'size_mb':>8}  trial_id  policy w/a per layer"]
    for r in front:
        lines.append(f"{r[M.VAL_ACC]:>7.4f}  {r[M.LATENCY_MS]:>10.4g}  {r[M.ENERGY_MJ]:>10.4g}  "
                     f"{r[M.SIZE_MB]:>8.4g}  {r.get('trial_id')}  {r.get(M.POLICY)}")
    return "\n".join(lines)
