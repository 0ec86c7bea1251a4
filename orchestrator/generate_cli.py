"""``haqtune generate``: policies for a new target accuracy (and any hardware budget) from the
generator an ``aqgan`` search stored in MLflow, without a new search; ``--evaluate`` runs
them as real trials through Ray Tune (attached to the CLI group by ``cli.py``).

The generator is the ``aqgan_generator.pt`` artifact of the newest finished ``aqgan``
search in the experiment (``--search-id`` picks another); that search's ``config.yaml``
artifact gives the model, dataset and fine-tune settings, so the network is rebuilt and
priced on ``--hardware`` under ``--budget`` (default: the search's own).
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import click
import numpy as np

from .errors import HaqtuneError, user_errors
from .report_cli import DEFAULT_EXPERIMENT

GENERATE_SEARCHER = "aqgan-generate"  # the parent run's haqtune.searcher tag
TARGET_ACC = "target_acc"  # child-run param
DEFAULT_NUM = 8
POOL_PER_POLICY = 32  # samples drawn per requested policy (at least the searcher's 256)
# Warn when no policy is predicted within half a point of the target (the benchmark's "reached").
SHORTFALL_WARN = 0.005


@click.command("generate")
@click.option("--experiment", default=DEFAULT_EXPERIMENT, show_default=True,
              help="MLflow experiment holding the aqgan search.")
@click.option("--target-acc", type=float, required=True, help="Target val_acc (fraction in (0, 1]).")
@click.option("--num", type=int, default=DEFAULT_NUM, show_default=True, help="Policies to generate.")
@click.option("--hardware", help="Cost model (default: the search's).")
@click.option("--budget", help="latency=0.5 | energy_mj=3 | size_mb=1.0 | none (default: the search's).")
@click.option("--output", help="Write the policies (and measured val_acc with --evaluate) to this JSON file.")
@click.option("--evaluate", is_flag=True, help="Run them as real trials (Ray Tune) and log them to MLflow.")
@click.option("--search-id", help="Use this aqgan search's generator (default: the newest).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the sampling.")
@user_errors
def generate(experiment, target_acc, num, hardware, budget, output, evaluate, search_id, tracking_uri,
             seed) -> None:
    """Generate quantization policies at a target accuracy from a trained aqgan generator."""
    from orchestrator.searchers import SearchProblem
    from orchestrator.searchers.aqgan import GENERATOR_FILE, generate_policies, load_generator
    from search_spaces import metrics as M
    from trainables.trial import policy_costs

    from .config import SearchConfig
    from .search import CONFIG_FILE, prepare
    from .tracking import download_search_artifacts, resolve_tracking_uri

    if not 0 < target_acc <= 1:
        raise HaqtuneError(f"--target-acc: expected a fraction in (0, 1], got {target_acc}")
    if num < 1:
        raise HaqtuneError(f"--num: expected an integer >= 1, got {num}")
    uri = resolve_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory(prefix="haqtune-generate-") as tmp:
        source = download_search_artifacts(uri, experiment, "aqgan", (GENERATOR_FILE, CONFIG_FILE),
                                           Path(tmp), search_id=search_id)
        model, exported = load_generator(source["files"][GENERATOR_FILE])
        config = SearchConfig.from_yaml(source["files"][CONFIG_FILE])
    overrides = {"budget": budget, "experiment": experiment, "tracking_uri": tracking_uri}
    if hardware is not None and hardware != config.hardware:
        overrides.update(hardware=hardware, hardware_options={}, batch=None)  # options were the old model's
    config = config.replace(**overrides)
    prepared = prepare(config)
    if len(prepared.layers) != model.num_layers:
        raise HaqtuneError(f"the generator of search {source['search_id']} covers {model.num_layers} layers, "
                           f"but {config.model!r} now has {len(prepared.layers)}: the model changed")
    low, high = model.scale.low, model.scale.high
    if not low <= target_acc <= high:
        click.echo(f"haqtune: warning: --target-acc {target_acc:g} is outside the val_acc range the "
                   f"generator was trained on [{low:.4f}, {high:.4f}]; it generates at the nearest end",
                   err=True)
    model.torch_rng.manual_seed(seed)  # sampling draws from the generator's own RNG only
    cost_metric = config.budget.metric if config.budget else M.LATENCY_MS
    problem = SearchProblem(layers=prepared.layers, table=prepared.table, budget=config.budget,
                            min_bits=model.min_bits, max_bits=model.max_bits, allowed=prepared.allowed,
                            cost_metric=cost_metric, seed=seed)
    rows = generate_policies(model, problem, target_acc, num, pool=max(256, POOL_PER_POLICY * num),
                             measured=(exported["policies"].numpy(), exported["accs"].numpy()))
    reference = _reference(prepared)
    for row in rows:
        row.update(policy_costs(prepared.table, row["policy"]))
    click.echo(f"haqtune: generator of search {source['search_id']} ({len(exported['accs'])} evaluated "
               f"policies, val_acc {low:.4f}..{high:.4f}); target val_acc={target_acc:g}; "
               f"{config.hardware} (batch {prepared.table.batch}), budget {config.budget}")
    if len(rows) < num:
        click.echo(f"haqtune: warning: only {len(rows)} distinct policies inside the budget", err=True)
    best = max((row["predicted"] for row in rows), default=None)
    if best is not None and best < target_acc - SHORTFALL_WARN:
        # Measured on the surrogate (RESULTS.md, AQGAN cost per design point): where the
        # best prediction falls this short, the policies miss the target too.
        click.echo(f"haqtune: warning: the best policy under this budget is predicted at val_acc {best:.4f}, "
                   f"{(target_acc - best) * 100:.1f} points below the target: the budget is outside what "
                   f"search {source['search_id']} measured; a new search under it is the way to the target",
                   err=True)
    click.echo(format_generated(rows, reference))
    measured = evaluate_policies(prepared, rows, target_acc, source["search_id"], echo=click.echo) \
        if evaluate else None
    if output:
        from .config import atomic_write_text

        atomic_write_text(Path(output), json.dumps({
            "source_search_id": source["search_id"], TARGET_ACC: target_acc, "hardware": config.hardware,
            "budget": str(config.budget), "uniform_8bit": reference,
            "policies": [_plain(row, measured[i] if measured else None) for i, row in enumerate(rows)],
        }, indent=1))
        click.echo(f"haqtune: wrote {output}")


def _plain(row: dict, val_acc: float | None) -> dict:
    from search_spaces import format_policy
    from search_spaces import metrics as M

    out = {M.POLICY: format_policy(row["policy"]), "predicted_val_acc": row["predicted"],
           **{k: row[k] for k in M.COST_METRICS}, "as_generated": row["as_generated"],
           "measured_by_search": row["measured"]}
    if val_acc is not None:
        out[M.VAL_ACC] = val_acc
    return out


def format_generated(rows: list[dict], reference: dict, measured: list | None = None) -> str:
    from search_spaces import format_policy
    from search_spaces import metrics as M

    head = f"{'rank':>4}  {'predicted':>9}  " + (f"{'val_acc':>7}  " if measured else "")
    lines = [head + f"{'latency_ms':>10}  {'energy_mj':>10}  {'size_mb':>8}  {'vs 8-bit (lat/en/size)':>22}  "
             "from       policy w/a per layer"]
    for i, r in enumerate(rows):
        ratio = "/".join(f"{reference[k] / r[k]:.2f}x" if r[k] > 0 else "-" for k in M.COST_METRICS)
        acc = f"{measured[i]:>7.4f}  " if measured else ""
        origin = "measured" if r["measured"] else "generated" if r["as_generated"] else "projected"
        lines.append(f"{i + 1:>4}  {r['predicted']:>9.4f}  {acc}{r[M.LATENCY_MS]:>10.4g}  "
                     f"{r[M.ENERGY_MJ]:>10.4g}  {r[M.SIZE_MB]:>8.4g}  {ratio:>22}  {origin:<9}  "
                     f"{format_policy(r['policy'])}")
    return "\n".join(lines)


def _fixed_searcher(configs: list[dict]):
    """A Tune searcher proposing exactly ``configs``, in order, then FINISHED."""
    from ray.tune.search import Searcher

    class FixedPolicies(Searcher):
        def __init__(self) -> None:
            super().__init__(metric=None, mode=None)
            self.queue = list(configs)

        def suggest(self, trial_id: str):
            return self.queue.pop(0) if self.queue else Searcher.FINISHED

        def on_trial_complete(self, trial_id: str, result=None, error: bool = False) -> None:
            pass

    return FixedPolicies()


def evaluate_policies(prepared, rows: list[dict], target_acc: float, source_search_id: str, *,
                      echo) -> list[float | None]:
    """Fine-tune and measure each policy as a Ray Tune trial, logged to MLflow as child runs
    (param ``target_acc``) of a parent tagged ``haqtune.searcher=aqgan-generate``.
    Returns each row's measured val_acc (None if its trial failed)."""
    import dataclasses

    from search_spaces import config_from_policy, format_policy
    from search_spaces import metrics as M

    from .search import (
        CONFIG_FILE,
        build_reference,
        new_search_id,
        plan_search,
        quiet_libraries,
        resolve_concurrency,
        results_frame,
        run_tuner,
    )
    from .tracking import MlflowTracker

    quiet_libraries()
    # The search pipeline's own steps (plan, reference, tuner), with the policies as a
    # fixed searcher: the same trainable, checkpoints, callbacks and MLflow tracking.
    prepared = dataclasses.replace(prepared, config=prepared.config.replace(num_trials=len(rows)))
    plan = resolve_concurrency(plan_search(prepared, search_id=new_search_id(GENERATE_SEARCHER)), echo)
    config = plan.config
    started = time.time()
    context = build_reference(plan, prepared, echo)
    tracker = MlflowTracker(
        tracking_uri=config.tracking_uri, experiment=config.experiment,
        search_id=plan.search_id, searcher=GENERATE_SEARCHER, search_dir=plan.search_dir,
        params={"searcher": GENERATE_SEARCHER, "source_search_id": source_search_id, TARGET_ACC: target_acc,
                "hardware": config.hardware, "budget": str(config.budget), "model": config.model,
                "dataset": config.dataset, "num_trials": len(rows), "num_layers": len(prepared.layers),
                "seed": config.seed, "min_bits": config.min_bits, "max_bits": config.max_bits,
                "finetune_epochs": config.finetune.epochs, "batch": prepared.table.batch},
        config_path=plan.search_dir / CONFIG_FILE, trial_params={TARGET_ACC: target_acc})
    tracker.start()
    ref_acc = context.ref_acc
    echo(f"haqtune: evaluating {len(rows)} policies as {plan.search_id} (reference val_acc={ref_acc:.4f})")
    configs = [{**config_from_policy(r["policy"]), "_num_threads": max(1, int(config.cpus_per_trial))}
               for r in rows]
    try:
        results = run_tuner(plan, context, _fixed_searcher(configs), tracker, echo)
    except BaseException:
        tracker.end("KILLED")
        raise
    frame = results_frame(results)
    by_policy = {p: a for p, a in zip(frame[M.POLICY], frame[M.VAL_ACC], strict=True) if isinstance(p, str)}
    measured = [by_policy.get(format_policy(r["policy"])) for r in rows]
    measured = [None if a is None or not np.isfinite(a) else float(a) for a in measured]
    done = [(r, a) for r, a in zip(rows, measured, strict=True) if a is not None]
    metrics = {"ref_acc": ref_acc, "wall_time_s": time.time() - started}
    if done:
        errors = [abs(a - target_acc) for _, a in done]
        metrics.update({"mean_abs_target_error": float(np.mean(errors)),
                        "best_val_acc": max(a for _, a in done),
                        "share_at_or_above_target": float(np.mean([a >= target_acc for _, a in done]))})
    frame["target_acc"] = target_acc
    tracker.log_summary(metrics, {"results.csv": frame.to_csv(index=False)})
    tracker.end("FINISHED")
    echo("")
    echo(format_generated(rows, _reference(prepared), measured=[a if a is not None else float("nan")
                                                                 for a in measured]))
    if done:
        echo(f"haqtune: {len(done)}/{len(rows)} evaluated; mean |val_acc - target| = "
             f"{metrics['mean_abs_target_error']:.4f}; {metrics['share_at_or_above_target']:.0%} at or above "
             f"the target; best val_acc={metrics['best_val_acc']:.4f}")
    echo(f"haqtune: MLflow runs: {tracker.ui_hint()}")
    return measured


def _reference(prepared) -> dict:
    from trainables.trial import policy_costs

    return policy_costs(prepared.table, prepared.table.uniform(8))
