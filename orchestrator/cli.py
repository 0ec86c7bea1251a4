"""``haqtune`` command line (click). The CLI contract is in DESIGN.md."""

from __future__ import annotations

import click

from .errors import HaqtuneError, fail, user_errors

EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report Ctrl-C


def _run_search(prepared, **kwargs) -> None:
    """Run (or resume) a search; Ctrl-C or SIGTERM stop it cleanly with exit code 130."""
    import signal
    import sys

    from .search import SearchInterrupted, run

    # SIGTERM (a scheduler, `kill`) behaves as Ctrl-C: before the trials start it raises
    # KeyboardInterrupt; while they run, the search's own handler stops them gracefully.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        run(prepared, echo=click.echo, **kwargs)
    except HaqtuneError as exc:  # the cluster cannot run it (address, resources): nothing written
        fail(str(exc))
    except SearchInterrupted:  # the search printed how to resume
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        click.echo("\nhaqtune: interrupted", err=True)
        sys.exit(EXIT_INTERRUPTED)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """haqtune: hardware-aware mixed-precision quantization search on Ray Tune."""




@main.command()
@click.argument("config_file", required=False)
@click.option("--searcher", help="Searcher name (see `haqtune searchers`).")
@click.option("--num-trials", type=int, help="Number of trials (policies evaluated).")
@click.option("--hardware", help="Cost model (see `haqtune hardware`).")
@click.option("--budget", help="latency=0.5 | latency_ms=12 | energy=0.5 | energy_mj=3 | size=0.5 | size_mb=1.0 | none")
@click.option("--experiment", help="MLflow experiment name.")
@click.option("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db).")
@click.option("--storage-dir", envvar="HAQTUNE_STORAGE_DIR", show_envvar=True,
              help="Where search state goes: a local directory (default ./haqtune_runs) or a URI Ray "
              "Tune's storage_path takes (s3://bucket/path, gs://bucket/path, file:///path); a cluster "
              "sets it once in $HAQTUNE_STORAGE_DIR (see ray_cluster.yaml).")
@click.option("--address", help="Ray cluster address (e.g. auto); default starts a local Ray.")
@click.option("--max-concurrent", help="Trials in flight at once: N, or auto (default: as many as the "
              "Ray cluster's CPUs/GPUs fit, at most num_trials).")
@click.option("--cpus-per-trial", type=float, help="CPUs one trial asks Ray for (default 1).")
@click.option("--gpus-per-trial", type=float, help="GPUs one trial asks Ray for (default 0; without "
              "CUDA a trial falls back to the CPU).")
@click.option("--scheduler", help="fifo | asha (early stopping on val_acc per epoch).")
@click.option("--seed", type=int, help="Seed of the whole search.")
@click.option("--model", help="demo | torchvision name | module:callable.")
@click.option("--dataset", help="digits | mnist | cifar10 | imagefolder.")
@click.option("--min-bits", type=int)
@click.option("--max-bits", type=int)
@click.option("--weights", help="Pretrained reference: a torchvision weights name (local torch cache) "
              "or a checkpoint file; evaluated, not retrained (reference.weights).")
@click.option("--final-epochs", metavar="N|none", help="HAQ's final fine-tune: the best policies, uniform "
              "8-bit and the widest uniform policy inside the budget train this many epochs (the "
              "config's final_finetune settings otherwise, 30 distilled epochs by default) before the "
              "test split; none: test the trials' own checkpoints.")
@click.option("--dry-run", is_flag=True, help="Print the plan (layers, MACs, 8-bit cost, budget, trials, "
              "resources) and exit; runs and writes nothing.")
def search(config_file, dry_run, weights, final_epochs, **flags) -> None:
    """Run a search (CONFIG_FILE: YAML in configs/; none = the embedded demo)."""
    import dataclasses

    from .config import SearchConfig

    try:
        config = SearchConfig.from_yaml(config_file) if config_file else SearchConfig.demo()
        config = config.replace(**flags)
        if weights is not None:
            config = config.replace(reference=dataclasses.replace(config.reference, weights=weights))
        if final_epochs is not None and final_epochs.strip().lower() == "none":
            config = dataclasses.replace(config, final_finetune=None)  # replace() skips None (unset flags)
        elif final_epochs is not None:
            if not final_epochs.strip().isdigit():
                raise HaqtuneError(f"--final-epochs: expected an integer >= 0 or none, got {final_epochs!r}")
            base = config.final_finetune or config.finetune
            config = config.replace(final_finetune={**dataclasses.asdict(base), "epochs": int(final_epochs)})
        from .search import prepare

        prepared = prepare(config)
    except (HaqtuneError, ValueError) as exc:
        fail(str(exc))
    if dry_run:
        from .plan import format_plan

        click.echo(format_plan(prepared))
        return
    _run_search(prepared)


@main.command()
@click.argument("search_dir")
@click.option("--tracking-uri", help="MLflow store that now holds the search's runs (if it moved); "
                                     "default: the one in SEARCH_DIR/config.yaml.")
def resume(search_dir, tracking_uri) -> None:
    """Continue an interrupted search (SEARCH_DIR: ./haqtune_runs/<search_id>, or a storage
    URI such as s3://bucket/haqtune_runs/<search_id>), from any working directory or machine;
    everything is written into SEARCH_DIR and its MLflow runs."""
    from .search import resume_plan

    try:
        prepared, path = resume_plan(search_dir, tracking_uri=tracking_uri)
    except (HaqtuneError, ValueError) as exc:
        fail(str(exc))
    _run_search(prepared, resume_dir=path)


@main.command()
@user_errors
def searchers() -> None:
    """List the searchers."""
    from orchestrator.searchers import list_searchers

    infos = list_searchers()
    width = max(len(n) for n in infos)
    for name, info in infos.items():
        click.echo(f"{name:<{width}}  {info.objective:<6}  {info.description}")


def _attach_commands() -> None:
    # Commands living in their own modules (kept apart so `haqtune cost` does not import
    # Ray or MLflow); attached here so `haqtune --help` lists them. A missing module is a
    # broken install and must fail loudly, not hide a command.
    import importlib

    for module, names in (("cost_cli", ("hardware", "cost")), ("report_cli", ("compare", "ui")),
                          ("export_cli", ("export",)), ("generate_cli", ("generate",))):
        mod = importlib.import_module(f"{__package__}.{module}")
        for name in names:
            main.add_command(getattr(mod, name))


_attach_commands()
