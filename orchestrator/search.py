"""Tuner wiring: validate a config, build everything, run the Ray Tune experiment, summarize.

``prepare`` does all validation with no side effects (no directory, no MLflow run),
so bad input fails before anything is written; ``run`` then executes the search.
"""

from __future__ import annotations

import os
import secrets
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hardware import CostTable, LayerSpec, extract_layers, get_cost_model
from search_spaces import check_feasible, parse_policy
from search_spaces import metrics as M
from trainables.data import DATASETS
from trainables.models import build_model

from .config import SearchConfig, atomic_write_text
from .errors import HaqtuneError

CONFIG_FILE = "config.yaml"
SUMMARY_FILE = "summary.json"
CACHE_DIR = "_cache"  # reference models, shared by every search under one storage dir


@dataclass
class PreparedSearch:
    config: SearchConfig
    layers: list[LayerSpec]
    table: CostTable
    input_shape: tuple[int, int, int]
    budget_limit: float | None
    model_kwargs: dict  # build_model keywords every process uses (classes, input size, channels)


def _dataset_facts(config: SearchConfig) -> tuple[int, tuple[int, int, int] | None]:
    if config.dataset not in DATASETS:
        raise HaqtuneError(f"unknown dataset {config.dataset!r}: choose between {', '.join(DATASETS)}")
    if config.dataset == "digits":
        return 10, (1, 8, 8)
    if config.dataset in ("mnist", "cifar10"):
        return 10, None
    from trainables.data import load_dataset

    return load_dataset(config.dataset, root=config.data_root, input_size=config.input_size).num_classes, None


def prepare(config: SearchConfig) -> PreparedSearch:
    """Validate everything that can be checked before a trial runs; write nothing."""
    try:
        cost_model = get_cost_model(config.hardware, **config.hardware_options)
        num_classes, data_shape = _dataset_facts(config)
        # An in-memory dataset fixes the input shape; a model callable without its own
        # ``input_shape`` is traced at that shape.
        input_size = config.input_size or (data_shape[1] if data_shape else None)
        model_kwargs = {"num_classes": num_classes, "input_size": input_size,
                        "in_channels": data_shape[0] if data_shape else None}
        built = build_model(config.model, seed=config.seed, **model_kwargs)
        if data_shape is not None and tuple(built.input_shape) != data_shape:
            raise HaqtuneError(
                f"model {config.model!r} takes inputs of shape {list(built.input_shape)}, but dataset "
                f"{config.dataset!r} has {list(data_shape)}: pick a model that fits (demo for digits)"
            )
        layers = extract_layers(built.model, built.input_shape)
        table = cost_model.table(layers, config.batch)
        limit = check_feasible(table, config.budget, config.min_bits) if config.budget else None
    except HaqtuneError:
        raise
    except (ValueError, TypeError, RuntimeError) as exc:
        raise HaqtuneError(str(exc)) from None
    return PreparedSearch(config, layers, table, tuple(built.input_shape), limit, model_kwargs)


def new_search_id(searcher: str) -> str:
    return f"{searcher}-{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class ProgressPrinter:
    """Tune callback printing one line per finished trial: done / total and best so far."""

    def __new__(cls, *args, **kwargs):
        from ray.tune import Callback

        # Built lazily so importing this module does not import Ray.
        class _Printer(Callback):
            def __init__(self, total: int, echo, done: int = 0, best: float | None = None) -> None:
                self.total, self.echo, self.done, self.best = total, echo, done, best

            def _line(self, trial, status: str) -> None:
                self.done += 1
                r = trial.last_result or {}
                acc = r.get(M.VAL_ACC)
                if status == "ok" and acc is not None:
                    self.best = acc if self.best is None else max(self.best, acc)
                desc = (f"val_acc={acc:.4f} latency_ms={r.get(M.LATENCY_MS, float('nan')):.4g} "
                        f"energy_mj={r.get(M.ENERGY_MJ, float('nan')):.4g} size_mb={r.get(M.SIZE_MB, float('nan')):.4g}"
                        if acc is not None else "no result")
                best = f"{self.best:.4f}" if self.best is not None else "-"
                self.echo(f"[{self.done}/{self.total}] {trial.trial_id} {status}: {desc} | best val_acc={best}")

            def on_trial_complete(self, iteration, trials, trial, **info):
                stopped = (trial.last_result or {}).get(M.DONE, 1) == 0
                self._line(trial, "stopped early" if stopped else "ok")

            def on_trial_error(self, iteration, trials, trial, **info):
                self._line(trial, "FAILED")

        return _Printer(*args, **kwargs)


def _search_params(config: SearchConfig, prepared: PreparedSearch) -> dict:
    return {
        "searcher": config.searcher, "hardware": config.hardware, "budget": str(config.budget),
        "model": config.model, "dataset": config.dataset, "seed": config.seed,
        "num_trials": config.num_trials, "max_concurrent": config.max_concurrent,
        "scheduler": config.scheduler, "num_layers": len(prepared.layers),
        "min_bits": config.min_bits, "max_bits": config.max_bits,
        "finetune_epochs": config.finetune.epochs, "batch": prepared.table.batch,
    }


def quiet_libraries() -> None:
    """Keep the terminal to haqtune's own progress lines: Ray Tune's legacy reporter at
    verbose=0 prints nothing, and Optuna / MLflow info logs say nothing a user needs."""
    import logging

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    for name in ("optuna", "mlflow", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        import optuna

        optuna.logging.set_verbosity(optuna.logging.WARNING)
    except ImportError:  # pragma: no cover
        pass


def _init_ray(address: str | None) -> None:
    import ray

    if ray.is_initialized():
        return
    ray.init(address=address, include_dashboard=False, log_to_driver=False,
             configure_logging=True, logging_level="ERROR")


def _scheduler(config: SearchConfig):
    if config.scheduler == "fifo":
        return None
    from ray.tune.schedulers import ASHAScheduler

    # Epochs are Tune iterations; a trial stopped at rung r reports the val_acc it reached.
    return ASHAScheduler(metric=M.VAL_ACC, mode="max", time_attr="training_iteration",
                         max_t=max(config.finetune.epochs, 1), grace_period=1, reduction_factor=2)


def run(prepared: PreparedSearch, *, echo=print, search_id: str | None = None,
        resume_dir: Path | None = None) -> dict:
    """Run the search; returns the summary dict (also written to the search directory).

    With ``resume_dir`` (an existing search directory) the Ray Tune experiment is
    restored instead (``Tuner.restore(..., resume_errored=True)``): finished trials are
    kept, unfinished and errored ones run again, the searcher continues from its saved
    state, and the MLflow tracker reattaches to the same parent and child runs.
    """
    quiet_libraries()
    from ray import tune

    from orchestrator.searchers import SearchProblem, make_searcher
    from trainables import TrialContext, quantize_and_finetune
    from trainables.data import load_dataset
    from trainables.training import pick_device, reference_key, train_reference

    from .tracking import MlflowTracker, resolve_tracking_uri

    config = prepared.config
    if resume_dir is not None:
        search_dir = Path(resume_dir).resolve()
        storage, search_id = search_dir.parent, search_dir.name
    else:
        storage = Path(config.storage_dir).resolve()
        search_id = search_id or new_search_id(config.searcher)
        search_dir = storage / search_id
        search_dir.mkdir(parents=True, exist_ok=False)
        config.write_yaml(search_dir / CONFIG_FILE)
    started = time.time()

    echo(f"haqtune: {'resuming' if resume_dir else 'search'} {search_id}: {config.searcher} on {config.model}/{config.dataset}, "
         f"{config.hardware} (batch {prepared.table.batch}), budget {config.budget}, "
         f"{len(prepared.layers)} layers, {config.num_trials} trials")
    data = load_dataset(config.dataset, root=config.data_root, input_size=config.input_size)
    state, ref_acc, _ = train_reference(
        lambda: build_model(config.model, seed=config.seed, **prepared.model_kwargs).model,
        data, config.reference, seed=config.seed, cache_dir=storage / CACHE_DIR,
        key=reference_key(model=config.model, dataset=config.dataset, **prepared.model_kwargs),
        device=pick_device(config.gpus_per_trial))
    echo(f"haqtune: full-precision reference val_acc={ref_acc:.4f}")

    context = TrialContext(
        model=config.model, dataset=config.dataset, model_kwargs=prepared.model_kwargs,
        input_size=config.input_size, layer_names=tuple(s.name for s in prepared.layers),
        reference_state=state, ref_acc=ref_acc, table=prepared.table, budget=config.budget,
        finetune=config.finetune, seed=config.seed,
        min_bits=config.min_bits, max_bits=config.max_bits, data_root=os.path.abspath(config.data_root),
        gpus_per_trial=config.gpus_per_trial, quant=config.quant_options())
    problem = SearchProblem(
        layers=prepared.layers, table=prepared.table, budget=config.budget, min_bits=config.min_bits,
        max_bits=config.max_bits, cost_metric=config.budget.metric if config.budget else M.LATENCY_MS,
        seed=config.seed, num_trials=config.num_trials, max_concurrent=config.max_concurrent,
        extra={"ref_acc": ref_acc}, accuracy_oracle=_accuracy_oracle(config, context))
    searcher = make_searcher(config.searcher, problem, **config.searcher_options)

    tracker = MlflowTracker(
        tracking_uri=resolve_tracking_uri(config.tracking_uri), experiment=config.experiment,
        search_id=search_id, searcher=config.searcher, search_dir=search_dir,
        params=_search_params(config, prepared), config_path=search_dir / CONFIG_FILE)
    tracker.start()

    _init_ray(config.address)
    resources = {"cpu": config.cpus_per_trial, "gpu": config.gpus_per_trial}
    trainable = tune.with_resources(tune.with_parameters(quantize_and_finetune, context=context), resources)
    # A resumed search counts on from the trials its first driver saw finish.
    callbacks = [ProgressPrinter(config.num_trials, echo, len(tracker.completed), tracker.best_val_acc),
                 tracker]
    if resume_dir is not None:
        tuner = tune.Tuner.restore(str(search_dir), trainable=trainable, resume_errored=True)
        # The pickled RunConfig carries the first driver's callbacks; this driver's own
        # (with its echo and a tracker re-read from mlflow_runs.json) replace them. Tune
        # has no public way to pass callbacks to a restored Tuner.
        tuner._local_tuner._run_config.callbacks = callbacks
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
                name=search_id, storage_path=str(storage), verbose=0, callbacks=callbacks,
                failure_config=tune.FailureConfig(max_failures=config.max_failures)),
        )
    try:
        results = tuner.fit()
    except BaseException:
        tracker.end("KILLED")
        raise
    summary = summarize(results, context, config, tracker, search_id, started, echo, prepared.layers)
    tracker.end("FINISHED")
    return summary


# Searchers that measure per-layer sensitivity through ``SearchProblem.accuracy_oracle``.
# Only they get one: the oracle holds the reference weights, and the searcher (with
# its problem) is pickled into the Tune experiment state.
ORACLE_SEARCHERS = ("sensitivity-dp",)


def _accuracy_oracle(config: SearchConfig, context):
    if config.searcher not in ORACLE_SEARCHERS:
        return None
    from trainables.sensitivity import make_sensitivity_oracle

    return make_sensitivity_oracle(context)  # lazy: loads data and model on its first call


def _trial_dirname(trial) -> str:
    return f"trial_{trial.trial_id}"


def resume_plan(search_dir: str | Path) -> tuple[PreparedSearch, Path]:
    """Validate a search directory and re-prepare its resolved config (writes nothing)."""
    search_dir = Path(search_dir)
    if not (search_dir / CONFIG_FILE).is_file() or not (search_dir / "tuner.pkl").is_file():
        raise HaqtuneError(
            f"{str(search_dir)!r} is not a haqtune search directory: expected {CONFIG_FILE} and "
            "a Ray Tune experiment (tuner.pkl) in it, as under ./haqtune_runs/<search_id>/"
        )
    return prepare(SearchConfig.from_yaml(search_dir / CONFIG_FILE)), search_dir


def results_frame(results):
    """One row per trial: id, status, metrics, projected policy."""
    import pandas as pd

    rows = []
    for r in results:
        m = r.metrics or {}
        row = {"trial_id": m.get("trial_id"), "status": "FAILED" if r.error else
               ("FINISHED" if m.get(M.DONE, 1) else "KILLED")}
        for key in (M.VAL_ACC, M.ACC_DROP, M.LATENCY_MS, M.ENERGY_MJ, M.SIZE_MB, M.REWARD, M.POLICY):
            row[key] = m.get(key)
        rows.append(row)
    return pd.DataFrame(rows)


def summarize(results, context, config: SearchConfig, tracker, search_id: str, started: float, echo,
              layers: list[LayerSpec]) -> dict:
    """Test-evaluate the best policies (the only time test is touched), print, log, write."""
    import json

    from trainables import evaluate_on_test
    from trainables.trial import policy_costs

    frame = results_frame(results)
    ok = frame[frame[M.VAL_ACC].notna()].sort_values(M.VAL_ACC, ascending=False)
    ok = ok.drop_duplicates(subset=[M.POLICY])
    best_rows = []
    for _, row in ok.head(config.test_top_k).iterrows():
        best_rows.append({"trial_id": row["trial_id"], **evaluate_on_test(context, parse_policy(row[M.POLICY]))})
    reference = policy_costs(context.table, context.table.uniform(8))
    if config.test_top_k > 0:
        # The uniform 8-bit policy, fine-tuned and tested like the best ones (not projected:
        # it is what every reduction is measured against), so the accuracy loss vs 8-bit
        # can be read off any search.
        eight = evaluate_on_test(context, context.table.uniform(8), project=False)
        reference = {**reference, M.VAL_ACC: eight[M.VAL_ACC], M.TEST_ACC: eight[M.TEST_ACC]}
    summary = {
        "search_id": search_id, "searcher": config.searcher, "num_trials": int(len(frame)),
        "failed_trials": int((frame["status"] == "FAILED").sum()),
        "wall_time_s": time.time() - started, "ref_acc": context.ref_acc,
        "uniform_8bit": reference, "best": best_rows,
    }
    echo(f"\nhaqtune: {len(frame)} trials ({summary['failed_trials']} failed) in {summary['wall_time_s']:.0f} s; "
         f"reference (full precision) val_acc={context.ref_acc:.4f}; uniform 8-bit: "
         f"latency_ms={reference[M.LATENCY_MS]:.4g} energy_mj={reference[M.ENERGY_MJ]:.4g} size_mb={reference[M.SIZE_MB]:.4g}")
    if M.TEST_ACC in reference:
        echo(f"haqtune: uniform 8-bit fine-tuned: val_acc={reference[M.VAL_ACC]:.4f} "
             f"test_acc={reference[M.TEST_ACC]:.4f}"
             + (f"; best policy's test_acc loss vs 8-bit: "
                f"{(reference[M.TEST_ACC] - best_rows[0][M.TEST_ACC]) * 100:.2f} points" if best_rows else ""))
    if best_rows:
        echo(format_best_table(best_rows, reference))
    from orchestrator.searchers import searcher_info

    if searcher_info(config.searcher).objective == "multi":
        cost_key = config.budget.metric if config.budget else M.LATENCY_MS  # the searcher's cost_metric
        done = frame[(frame["status"] == "FINISHED") & frame[M.VAL_ACC].notna()]
        summary["pareto_front"] = pareto_front(done.to_dict("records"), cost_key=cost_key)
        echo(format_pareto_table(summary["pareto_front"], cost_key))
    atomic_write_text(Path(config.storage_dir).resolve() / search_id / SUMMARY_FILE, json.dumps(summary, indent=1))
    # Parent-run metrics: the MLflow runs table's columns for comparing searches.
    metrics = {"ref_acc": context.ref_acc, "trials_failed": summary["failed_trials"],
               "wall_time_s": summary["wall_time_s"],
               **{f"uniform8_{key}": reference[key] for key in (*M.COST_METRICS, M.TEST_ACC)
                  if key in reference}}
    if best_rows:
        b = best_rows[0]
        metrics.update({"best_val_acc": b[M.VAL_ACC], "best_test_acc": b[M.TEST_ACC],
                        "best_acc_drop": b[M.ACC_DROP], f"best_{M.LATENCY_MS}": b[M.LATENCY_MS],
                        f"best_{M.ENERGY_MJ}": b[M.ENERGY_MJ], f"best_{M.SIZE_MB}": b[M.SIZE_MB]})
        for key in M.COST_METRICS:
            if b[key] > 0:
                metrics[f"{key.split('_')[0]}_reduction_x"] = reference[key] / b[key]
    artifacts = {
        "results.csv": frame.to_csv(index=False),
        "best_policy.json": json.dumps(best_rows[0] if best_rows else {}, indent=1),
    }
    if "pareto_front" in summary:
        artifacts["pareto_front.json"] = json.dumps(summary["pareto_front"], indent=1)
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
    echo(f"haqtune: results in {Path(config.storage_dir).resolve() / search_id}")
    echo(f"haqtune: MLflow runs: {tracker.ui_hint()}")
    return summary


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
