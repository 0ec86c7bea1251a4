"""``haqtune export``: a searched policy's fine-tuned checkpoint -> files people deploy.

Finds the trial (``--rank N`` in the search's ``summary.json``, or ``--trial ID``),
loads its Tune checkpoint (``<search_dir>/trial_<id>/checkpoint_*/quantized_model.pt``,
written by ``trainables.trial``), and writes to ``--output`` (default
``<search_dir>/export/<trial_id>``; a search in a bucket, ``s3://.../<search_id>``, is fetched
to a temp copy and its export uploaded there):

- ``model.pt`` (``--format torch|both``): integer weights, scales, clip ranges, policy and
  model identity; ``trainables.load_quantized(path)`` rebuilds it. Its test accuracy
  must equal the summary's exactly (the logits are bit-identical to the checkpoint's).
- ``model.onnx`` (``--format onnx|both``): the QDQ graph, checked with ONNX Runtime
  against the PyTorch module on the test split; below 99.5% top-1 agreement the
  export fails (exit 1) and writes nothing.
- ``policy.md`` / ``policy.json``: per-layer kind, MACs, bits, latency/energy share, size.

The models are then logged to the search's parent MLflow run (pytorch / onnx flavors
with their signature). Bad input (not a search directory, no checkpoint, a rank or
trial that does not exist) is one ``haqtune: error:`` line, exit 2, nothing written.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from .errors import HaqtuneError, user_errors

EXIT_VERIFY = 1  # the exported model does not reproduce the checkpoint
FORMATS = ("torch", "onnx", "both")
EXPORT_DIR = "export"
TORCH_FILE, ONNX_FILE = "model.pt", "model.onnx"
REPORT_JSON, REPORT_MD = "policy.json", "policy.md"
EXAMPLE_SAMPLES = 4  # rows of the MLflow models' input example


@dataclass(frozen=True)
class ExportPlan:
    search_dir: Path
    trial_id: str
    rank: int | None  # position in summary.json's best policies, if the trial is ranked
    summary_row: dict | None  # that row (val_acc, test_acc, costs, policy)
    checkpoint_dir: Path
    output: Path


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise HaqtuneError(f"cannot read {path}: {exc}") from None


def find_checkpoint(search_dir: Path, trial_id: str, row: dict | None = None) -> Path | None:
    """The trial's checkpoint directory: the summary row's ``checkpoint`` when it is here,
    else the trial's latest ``checkpoint_*`` (a search directory copied elsewhere)."""
    from trainables.trial import CHECKPOINT_FILE

    recorded = (row or {}).get("checkpoint")
    if recorded and (Path(recorded) / CHECKPOINT_FILE).is_file():
        return Path(recorded)
    found = sorted((Path(search_dir) / f"trial_{trial_id}").glob(f"checkpoint_*/{CHECKPOINT_FILE}"))
    return found[-1].parent if found else None


def export_plan(search_dir: str | Path, *, rank: int | None, trial_id: str | None,
                output: str | None) -> ExportPlan:
    """Validate the request and locate the checkpoint; writes nothing."""
    from .search import CONFIG_FILE, SUMMARY_FILE

    search_dir = Path(search_dir)  # a local directory (a storage URI goes through export_from_storage)
    if not (search_dir / CONFIG_FILE).is_file():
        raise HaqtuneError(f"{str(search_dir)!r} is not a haqtune search directory: expected "
                           f"{CONFIG_FILE} in it, as under ./haqtune_runs/<search_id>/")
    if rank is not None and trial_id is not None:
        raise HaqtuneError(f"expected --rank or --trial, got both (--rank {rank} --trial {trial_id})")
    summary_path = search_dir / SUMMARY_FILE
    best = _read_json(summary_path).get("best", []) if summary_path.is_file() else []
    row = None
    if trial_id is None:
        rank = 1 if rank is None else rank
        if not summary_path.is_file():
            raise HaqtuneError(f"{str(search_dir)!r} has no {SUMMARY_FILE} (the search has not "
                               "finished): run `haqtune resume` first, or pick a trial with --trial ID")
        if not 1 <= rank <= len(best):
            ranks = f"ranks 1..{len(best)}" if best else "no ranked policies"
            raise HaqtuneError(f"rank {rank} does not exist: {summary_path} has {ranks}")
        row = best[rank - 1]
        trial_id = str(row["trial_id"])
    else:
        ranked = [i for i, r in enumerate(best, 1) if str(r.get("trial_id")) == trial_id]
        rank = ranked[0] if ranked else None
        row = best[rank - 1] if rank else None
    checkpoint = find_checkpoint(search_dir, trial_id, row)
    if checkpoint is None:
        from trainables.trial import CHECKPOINT_FILE

        raise HaqtuneError(
            f"trial {trial_id} has no checkpoint in {search_dir}: expected "
            f"trial_{trial_id}/checkpoint_*/{CHECKPOINT_FILE} (written by searches since "
            "per-trial checkpoints; a trial stopped early or failed has none)")
    out = Path(output) if output else search_dir / EXPORT_DIR / trial_id
    if out.exists() and not out.is_dir():
        raise HaqtuneError(f"--output {str(out)!r}: expected a directory, got a file")
    return ExportPlan(search_dir, trial_id, rank, row, checkpoint, out)


def _verify_failed(message: str) -> None:
    click.echo(f"haqtune: error: {' '.join(message.split())}", err=True)
    sys.exit(EXIT_VERIFY)


def _log_to_mlflow(plan: ExportPlan, config, *, torch_model, onnx_model, example, files, echo) -> None:
    """Both flavors on the parent run; a failure is a warning (the files are written)."""
    import onnx
    import onnxruntime
    import torch

    from .tracking import log_exported_model, resolve_tracking_uri, search_parent_run

    parent = search_parent_run(plan.search_dir)
    if parent is None:
        echo(f"haqtune: warning: no MLflow parent run recorded in {plan.search_dir}; models not logged")
        return
    uri = resolve_tracking_uri(config.tracking_uri)
    # The pickled module refers to haqtune's own classes: ship their packages with it.
    root = Path(__file__).resolve().parent.parent
    code = tuple(str(root / p) for p in ("trainables", "hardware", "search_spaces"))
    try:
        uris = log_exported_model(
            uri, parent, name=plan.trial_id, example=example, torch_model=torch_model,
            onnx_model=onnx_model, files=tuple(files), code_paths=code if torch_model is not None else (),
            pip_requirements={"pytorch": [f"torch=={torch.__version__.split('+')[0]}", "numpy"],
                              "onnx": [f"onnx=={onnx.__version__}",
                                       f"onnxruntime=={onnxruntime.__version__}", "numpy"]})
    except Exception as exc:  # the export itself succeeded; logging it is a second step
        echo(f"haqtune: warning: MLflow logging to {uri} failed ({type(exc).__name__}: "
             f"{' '.join(str(exc).split())[:200]}); the exported files are in {plan.output}")
        return
    echo(f"haqtune: MLflow: parent run {parent} in {uri}: {', '.join(uris)}")


def run_export(plan: ExportPlan, fmt: str, *, tracking_uri: str | None = None, echo=click.echo) -> dict:
    """Load, convert, verify, write, report, log. Returns what was written and measured."""
    import numpy as np
    import torch

    from search_spaces import format_policy
    from search_spaces import metrics as M
    from trainables import export as E
    from trainables.data import load_dataset
    from trainables.training import evaluate
    from trainables.trial import load_quantized_checkpoint

    from .config import SearchConfig, atomic_write_text
    from .search import CONFIG_FILE, prepare

    config = SearchConfig.from_yaml(plan.search_dir / CONFIG_FILE)
    if tracking_uri:
        config = config.replace(tracking_uri=tracking_uri)
    prepared = prepare(config)
    qmodel, saved = load_quantized_checkpoint(plan.checkpoint_dir)
    policy = np.asarray(saved["policy"], dtype=np.int64)
    ranked = f"rank {plan.rank} " if plan.rank else ""
    echo(f"haqtune: export {ranked}trial {plan.trial_id} of {plan.search_dir.name}: policy "
         f"{format_policy(policy)}")
    data = load_dataset(config.dataset, root=config.data_root, input_size=config.input_size)
    device = torch.device("cpu")
    # The same thread count as the trials: float reductions depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(config.cpus_per_trial)))
    try:
        int_model = E.to_integer_model(qmodel)
        identity = E.ModelIdentity(saved["model"], dict(saved["model_kwargs"]), int(saved["seed"]),
                                   tuple(saved["input_shape"]))
        result: dict = {"trial_id": plan.trial_id, "rank": plan.rank, "policy": format_policy(policy)}
        onnx_model = None
        if fmt in ("onnx", "both"):
            onnx_model = E.to_onnx(int_model, identity.input_shape, metadata={
                "haqtune.search_id": plan.search_dir.name, "haqtune.trial_id": plan.trial_id,
                "haqtune.hardware": config.hardware, "haqtune.model": identity.name})
            check = E.verify_onnx(int_model, onnx_model, data.test)
            result["onnx"] = {"agreement": check.agreement, "max_abs_logit_diff": check.max_abs_logit_diff,
                              "test_acc": check.onnx_acc, "num_samples": check.num_samples}
            echo(f"haqtune: ONNX Runtime vs PyTorch on the test split ({check.num_samples} samples): "
                 f"top-1 agreement {check.agreement:.2%}, max |logit diff| {check.max_abs_logit_diff:.3g}")
            if not check.passed:
                _verify_failed(f"ONNX Runtime agrees with the PyTorch module on only {check.agreement:.2%} "
                               f"of test predictions (expected >= {E.MIN_AGREEMENT:.1%}); nothing written")
        plan.output.mkdir(parents=True, exist_ok=True)
        files = []
        if fmt in ("torch", "both"):
            path = plan.output / TORCH_FILE
            E.save_quantized(qmodel, path, identity=identity, policy=policy, extra={
                "search_id": plan.search_dir.name, "trial_id": plan.trial_id, "hardware": config.hardware,
                "metrics": {k: v for k, v in (plan.summary_row or saved.get("metrics", {})).items()
                            if isinstance(v, int | float | str)}})
            loaded = E.load_quantized(path)
            test_acc = evaluate(loaded, data.test, device=device)
            result["torch"] = {"path": str(path), "test_acc": test_acc}
            expected = (plan.summary_row or {}).get(M.TEST_ACC)
            note = "" if expected is None else f" (summary: {expected:.4f}{', exact' if test_acc == expected else ''})"
            echo(f"haqtune: wrote {path}: test_acc={test_acc:.4f}{note}")
            if expected is not None and test_acc != expected:
                path.unlink()
                _verify_failed(f"the exported PyTorch model's test accuracy {test_acc!r} differs from the "
                               f"summary's {expected!r}; {path} removed")
            files.append(path)
        if onnx_model is not None:
            E.save_onnx(onnx_model, plan.output / ONNX_FILE)
            files.append(plan.output / ONNX_FILE)
            echo(f"haqtune: wrote {plan.output / ONNX_FILE}")
        report = E.policy_report(prepared.layers, prepared.table, policy)
        report.update({"search_id": plan.search_dir.name, "trial_id": plan.trial_id, "rank": plan.rank,
                       "metrics": plan.summary_row or saved.get("metrics", {}), "export": result})
        atomic_write_text(plan.output / REPORT_JSON, json.dumps(report, indent=1))
        notes = [f"search `{plan.search_dir.name}`, trial `{plan.trial_id}`"
                 + (f" (rank {plan.rank})" if plan.rank else "")]
        if "torch" in result:
            notes.append(f"PyTorch `{TORCH_FILE}`: test_acc {result['torch']['test_acc']:.4f}")
        if "onnx" in result:
            o = result["onnx"]
            notes.append(f"ONNX `{ONNX_FILE}` (ONNX Runtime): test_acc {o['test_acc']:.4f}, top-1 agreement "
                         f"with PyTorch {o['agreement']:.2%}, max |logit diff| {o['max_abs_logit_diff']:.3g}")
        atomic_write_text(plan.output / REPORT_MD, E.format_policy_markdown(
            report, title=f"Quantization policy: {plan.trial_id}", notes=notes))
        files += [plan.output / REPORT_JSON, plan.output / REPORT_MD]
        for path in files[-2:]:
            E.make_readable(path)
        echo(f"haqtune: wrote {plan.output / REPORT_MD} and {REPORT_JSON}")
        example = torch.stack([data.test[i][0] for i in range(min(EXAMPLE_SAMPLES, len(data.test)))]).numpy()
        _log_to_mlflow(plan, config, torch_model=int_model if "torch" in result else None,
                       onnx_model=onnx_model, example=example,
                       files=[f for f in files if f.suffix in (".json", ".md")], echo=echo)
    finally:
        torch.set_num_threads(threads)
    return result


def _fetch_search(storage, local: Path) -> None:
    """The files of the search at ``storage`` that an export reads, copied to ``local``:
    config, summary, MLflow run map and the trials' checkpoints (only the best
    ``test_top_k`` trials keep one), not Tune's experiment state or logs."""
    import fnmatch

    import pyarrow.fs

    from .search import CONFIG_FILE, SUMMARY_FILE
    from .tracking import RUN_MAP_FILE

    infos = storage.fs.get_file_info(pyarrow.fs.FileSelector(storage.path, recursive=True))
    for info in infos:
        relative = info.path[len(storage.path.rstrip("/")) + 1:]
        if info.type == pyarrow.fs.FileType.File and (
                relative in (CONFIG_FILE, SUMMARY_FILE, RUN_MAP_FILE)
                or fnmatch.fnmatch(relative, "trial_*/checkpoint_*/*")):
            (storage / relative).download(local / relative)


def export_from_storage(location: str, *, rank: int | None, trial_id: str | None, fmt: str,
                        output: str | None, tracking_uri: str | None) -> dict:
    """Export from a search in a bucket (``s3://bucket/haqtune_runs/<id>``): its files are
    fetched to a temp copy, exported there, and the export is uploaded to
    ``<location>/export/<trial_id>`` (or written to ``--output``)."""
    import tempfile

    from .search import CONFIG_FILE
    from .storage import check_storage

    storage = check_storage(location, what="SEARCH_DIR")
    if not (storage / CONFIG_FILE).is_file():
        raise HaqtuneError(f"{location!r} is not a haqtune search directory: expected {CONFIG_FILE} "
                           "in it, as under s3://bucket/haqtune_runs/<search_id>/")
    with tempfile.TemporaryDirectory(prefix="haqtune-export-") as tmp:
        local = Path(tmp) / storage.name  # the search id, as export names the search
        _fetch_search(storage, local)
        plan = export_plan(local, rank=rank, trial_id=trial_id, output=output)
        plan = ExportPlan(plan.search_dir, plan.trial_id, plan.rank, plan.summary_row, plan.checkpoint_dir,
                          Path(output) if output else Path(tmp) / EXPORT_DIR / plan.trial_id)
        result = run_export(plan, fmt, tracking_uri=tracking_uri)
        if output is None:
            target = storage / EXPORT_DIR / plan.trial_id
            for file in sorted(plan.output.iterdir()):
                (target / file.name).upload(file)
            click.echo(f"haqtune: export uploaded to {target}")
    return result


@click.command("export")
@click.argument("search_dir")
@click.option("--rank", type=int, help="Export the N-th best policy of summary.json (default 1).")
@click.option("--trial", "trial_id", help="Export this trial (its Tune trial id) instead.")
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="both", show_default=True)
@click.option("--output", help="Output directory (default SEARCH_DIR/export/<trial_id>).")
@click.option("--tracking-uri", help="MLflow tracking URI (default: the search's).")
@user_errors
def export(search_dir: str, rank: int | None, trial_id: str | None, fmt: str, output: str | None,
           tracking_uri: str | None) -> None:
    """Export a searched policy's fine-tuned model: PyTorch file, ONNX QDQ graph, report, MLflow.
    SEARCH_DIR: a local search directory or a storage URI (s3://bucket/haqtune_runs/<id>)."""
    from .storage import is_uri

    if is_uri(search_dir):  # Path() would turn s3://b/x into s3:/b/x
        export_from_storage(search_dir, rank=rank, trial_id=trial_id, fmt=fmt, output=output,
                            tracking_uri=tracking_uri)
        return
    plan = export_plan(search_dir, rank=rank, trial_id=trial_id, output=output)
    run_export(plan, fmt, tracking_uri=tracking_uri)
