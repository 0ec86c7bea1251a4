"""The Ray Tune function trainable: project -> quantize -> brief fine-tune -> report.

``quantize_and_finetune(config, context)`` is what every trial runs. Ray ships the
``TrialContext`` (reference weights, cost table, budget, settings) to workers once
through the object store with ``tune.with_parameters``.

Trial checkpoint (the input of the final test evaluation and of a later export)
-------------------------------------------------------------------------------
A trial that completes its fine-tune attaches a Tune checkpoint to its final report:
a directory holding one file, ``quantized_model.pt`` (``torch.save`` of a dict,
loadable with ``torch.load(..., weights_only=True)``), format ``CHECKPOINT_FORMAT``:

- ``format``: ``"haqtune.quantized/1"``
- ``model``, ``model_kwargs``, ``input_shape``: rebuild the network with
  ``trainables.build_model(model, **model_kwargs)`` (``input_shape`` = one sample, C×H×W)
- ``layer_names``: the quantized layers, in policy order
- ``policy``: ``[[w_bits, a_bits], ...]`` per layer (projected: what was trained)
- ``signed``: per layer, whether its activations are quantized signed
- ``state_dict``: the fine-tuned quantized model's ``state_dict`` on CPU: each quantized
  layer ``<name>`` is a ``QuantLayer`` whose float weight is ``<name>.layer.weight``,
  with buffers ``<name>.w_clip`` (per-output-channel weight clip) and ``<name>.alpha``
  (activation clip); the integer weights are ``quantize_weight(weight, w_bits, w_clip)``
- ``metrics``: the trial's final report (``val_acc``, costs, ``policy`` text, ...)
- ``seed``: the search seed
- ``quant``: the quantizer options (``QuantOptions`` fields: weight granularity,
  linear or k-means weights, weight-only or not); a k-means layer holds a
  ``<name>.codebook`` buffer instead of ``<name>.w_clip``

``load_quantized_checkpoint(directory)`` turns it back into the ``nn.Module`` the
trial evaluated (same outputs), and is what the final test evaluation uses.

Testing hook: fault injection
-----------------------------
``HAQTUNE_TEST_FAULTS`` (unset in normal use) makes chosen trials misbehave, so the
failure handling can be tested end to end with real Ray workers. It is a comma list
of ``KIND@INDEX[:TIMES]``: the ``INDEX``-th trial to start (1, 2, ...) fails with
``KIND`` on its first ``TIMES`` attempts (default: every attempt). Kinds: ``raise`` (a
``RuntimeError``), ``nan`` (the fine-tune diverges: its loss becomes non-finite),
``kill`` (the worker process is SIGKILLed mid-trial). Trial numbers and attempts are
counted with marker files in ``HAQTUNE_TEST_FAULTS_DIR`` (default: ``.haqtune-faults/``
beside the trials' directories, which a resumed search does not share: set it to
count across a resume).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import signal
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from hardware import CostTable
from search_spaces import AllowedBits, Budget, format_policy, policy_from_config, project
from search_spaces import metrics as M

from .data import DataSplits, calibration_batches, load_dataset
from .models import build_model
from .node import node_info, node_label
from .quantize import CALIBRATION_BATCH_SIZE, QuantOptions, quantize_model
from .training import (
    DEFAULT_LOADER_WORKERS,
    TrainSettings,
    evaluate,
    make_grad_scaler,
    make_optimizer,
    pick_device,
    steps_per_epoch,
    train_epoch,
)

HAQ_REWARD_SCALE = 0.1  # HAQ: reward = 0.1 * (acc - ref_acc)
CALIBRATION_SAMPLES = 256
CHECKPOINT_FILE = "quantized_model.pt"
CHECKPOINT_FORMAT = "haqtune.quantized/1"
FAULTS_ENV = "HAQTUNE_TEST_FAULTS"
FAULTS_DIR_ENV = "HAQTUNE_TEST_FAULTS_DIR"
FAULT_KINDS = ("raise", "nan", "kill")


@dataclass(frozen=True)
class TrialContext:
    """Everything a trial needs besides its bits; identical for all trials of a search."""

    model: str
    dataset: str
    model_kwargs: dict  # build_model keywords: num_classes, input_size, in_channels
    input_size: int | None  # the dataset's image size (ImageFolder resizing)
    layer_names: tuple[str, ...]
    reference_state: dict
    ref_acc: float
    table: CostTable
    budget: Budget | None
    finetune: TrainSettings
    seed: int
    min_bits: int = 1
    max_bits: int = 8
    data_root: str = "./data"
    gpus_per_trial: float = 0.0
    extra: dict = field(default_factory=dict)
    allowed: AllowedBits | None = None  # per-layer widths (bit sets, fixed layers); None = [min_bits, max_bits]
    dataset_options: dict = field(default_factory=dict)  # HAQ-style subset (DatasetOptions fields)
    quant: QuantOptions = field(default_factory=QuantOptions)

    def reference_model(self, device: torch.device) -> torch.nn.Module:
        """A fresh full-precision reference model (the weights every trial starts from) on ``device``."""
        model = build_model(self.model, seed=self.seed, **self.model_kwargs).model
        model.load_state_dict(self.reference_state)
        return model.to(device)

    def project(self, policy) -> np.ndarray:
        """The policy the trial evaluates: the search's allowed widths, inside the budget."""
        if self.allowed is not None:
            return project(policy, self.table, self.budget, allowed=self.allowed)
        return project(policy, self.table, self.budget, min_bits=self.min_bits, max_bits=self.max_bits)


def _cached_dataset(name: str, root: str, input_size: int | None, options: dict | None = None) -> DataSplits:
    # Reused actors and the driver load each dataset once per process.
    return _load_once(name, root, input_size, tuple(sorted((options or {}).items())))


@functools.lru_cache(maxsize=2)
def _load_once(name: str, root: str, input_size: int | None, options: tuple) -> DataSplits:
    return load_dataset(name, root=root, input_size=input_size, options=dict(options))


def policy_seed(seed: int, policy: np.ndarray) -> int:
    """Fine-tune seed of a policy: the same policy always trains the same way."""
    return zlib.crc32(np.ascontiguousarray(policy, dtype=np.int64).tobytes(), seed) & 0x7FFFFFFF


def policy_costs(table: CostTable, policy: np.ndarray) -> dict[str, float]:
    """Exact (float64) latency/energy/size of one policy."""
    latency, energy, size = table.layer_costs(policy)
    return {M.LATENCY_MS: float(latency.sum()), M.ENERGY_MJ: float(energy.sum()),
            M.SIZE_MB: float(size.sum())}


def finetune_policy(context: TrialContext, policy: np.ndarray, *, on_epoch=None,
                    num_workers: int = DEFAULT_LOADER_WORKERS):
    """Quantize the reference model to ``policy`` and fine-tune it briefly.

    Calls ``on_epoch(epoch, val_acc)`` after every epoch (and once before training
    when ``epochs == 0``). ``num_workers``: DataLoader processes for image datasets (a
    trial's CPUs; in-memory tensor data needs none). Returns ``(model, data, device, val_acc)``.
    """
    device = pick_device(context.gpus_per_trial)
    data = _cached_dataset(context.dataset, context.data_root, context.input_size, context.dataset_options)
    model = context.reference_model(device)
    seed = policy_seed(context.seed, policy)
    generator = torch.Generator().manual_seed(seed)
    calib_idx = torch.randperm(len(data.train), generator=generator)[:CALIBRATION_SAMPLES]
    # Streamed a batch at a time: calibration memory does not grow with the sample count.
    calib = calibration_batches(data.train, calib_idx, CALIBRATION_BATCH_SIZE, device=device)
    qmodel = quantize_model(model, context.layer_names, policy, calib, context.quant)
    settings = context.finetune
    teacher = None
    if settings.distill_weight > 0:  # the full-precision reference, frozen
        teacher = context.reference_model(device).eval().requires_grad_(False)
    val_acc = evaluate(qmodel, data.val, device=device, num_workers=num_workers)
    if settings.epochs == 0 and on_epoch is not None:
        on_epoch(0, val_acc)
    if settings.epochs:
        optimizer, scheduler = make_optimizer(qmodel, settings, settings.epochs * steps_per_epoch(data, settings))
        scaler = make_grad_scaler(settings.amp, device)
        for epoch in range(1, settings.epochs + 1):
            train_epoch(qmodel, data, optimizer, settings, generator=generator, device=device,
                        scheduler=scheduler, scaler=scaler, num_workers=num_workers, teacher=teacher)
            val_acc = evaluate(qmodel, data.val, device=device, num_workers=num_workers)
            if on_epoch is not None:
                on_epoch(epoch, val_acc)
    return qmodel, data, device, val_acc


def trial_metrics(context: TrialContext, policy: np.ndarray, val_acc: float) -> dict:
    """The metrics every report carries (so an early-stopped trial's last report is complete)."""
    return {
        M.VAL_ACC: val_acc,
        M.REF_ACC: context.ref_acc,
        M.ACC_DROP: context.ref_acc - val_acc,
        M.REWARD: HAQ_REWARD_SCALE * (val_acc - context.ref_acc),
        **policy_costs(context.table, policy),
        M.POLICY: format_policy(policy),
    }


def quantize_and_finetune(config: dict, context: TrialContext) -> None:
    """Ray Tune function trainable; use with ``tune.with_parameters(..., context=ctx)``.

    Reports ``val_acc`` after every epoch; the final report carries the fine-tuned
    quantized model as a Tune checkpoint (format in the module docstring). A trial
    restored with that checkpoint (its driver died after the final report) reports
    the same final result again instead of training a second time.
    """
    from ray import tune

    threads = max(1, int(config.get("_num_threads", 1)))  # the trial's CPUs (cpus_per_trial)
    torch.set_num_threads(threads)
    policy = context.project(policy_from_config(config, len(context.layer_names)))
    last_epoch = max(context.finetune.epochs, 0)

    restored = tune.get_checkpoint()
    if restored is not None:
        with restored.as_directory() as directory:
            saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
        if saved["policy"] == policy.tolist():
            tune.report(saved["metrics"], checkpoint=restored)
            return

    context = _inject_faults(context)

    # Where the trial runs, in every report (the tracker tags its MLflow run with it).
    node = node_info()
    where = {M.NODE: node_label(node), M.NODE_ID: node["node_id"] or ""}

    def report(epoch: int, val_acc: float) -> None:
        if epoch < last_epoch:  # the last epoch is reported below, with the checkpoint
            tune.report({**trial_metrics(context, policy, val_acc), M.EPOCH: epoch, M.DONE: 0, **where})

    model, _, _, val_acc = finetune_policy(context, policy, on_epoch=report, num_workers=threads)
    metrics = {**trial_metrics(context, policy, val_acc), M.EPOCH: last_epoch, M.DONE: 1, **where}
    with tempfile.TemporaryDirectory(prefix="haqtune-ckpt-") as directory:
        save_quantized_checkpoint(directory, model, context=context, policy=policy, metrics=metrics)
        tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(directory))


def save_quantized_checkpoint(directory, model: torch.nn.Module, *, context: TrialContext,
                              policy: np.ndarray, metrics: dict) -> Path:
    """Write a trial checkpoint (format in the module docstring) into ``directory``."""
    signed = [bool(model.get_submodule(name).signed) for name in context.layer_names]
    built_shape = build_model(context.model, seed=context.seed, **context.model_kwargs).input_shape
    path = Path(directory) / CHECKPOINT_FILE
    torch.save({
        "format": CHECKPOINT_FORMAT, "model": context.model, "model_kwargs": dict(context.model_kwargs),
        "input_shape": list(built_shape), "layer_names": list(context.layer_names),
        "policy": np.asarray(policy).tolist(), "signed": signed,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "metrics": metrics, "seed": context.seed, "quant": dataclasses.asdict(context.quant),
    }, path)
    return path


def load_quantized_checkpoint(directory) -> tuple[torch.nn.Module, dict]:
    """The quantized model a trial checkpoint holds (in eval mode, on CPU) and its saved dict."""
    saved = torch.load(Path(directory) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    if saved.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{directory}: expected a {CHECKPOINT_FORMAT} checkpoint, got format "
                         f"{saved.get('format')!r}")
    built = build_model(saved["model"], seed=saved["seed"], **saved["model_kwargs"])
    # Calibration only has to run: every range it sets is overwritten by the saved buffers.
    calib = torch.randn((2, *built.input_shape), generator=torch.Generator().manual_seed(0))
    qmodel = quantize_model(built.model, saved["layer_names"], saved["policy"], calib,
                            QuantOptions(**saved.get("quant", {})))
    for name, signed in zip(saved["layer_names"], saved["signed"], strict=True):
        qmodel.get_submodule(name).signed = bool(signed)
    qmodel.load_state_dict(saved["state_dict"])
    qmodel.eval()
    return qmodel, saved


def evaluate_checkpoint(directory, *, dataset: str, data_root: str, input_size: int | None,
                        dataset_options: dict | None = None, gpus: float = 0.0,
                        num_threads: int = 1) -> dict:
    """Validation and test accuracy of the model in a trial checkpoint (the final report)."""
    torch.set_num_threads(max(1, int(num_threads)))
    model, saved = load_quantized_checkpoint(directory)
    device = pick_device(gpus)
    model.to(device)
    data = _cached_dataset(dataset, data_root, input_size, dataset_options)
    workers = max(1, int(num_threads))
    return {"checkpoint_val_acc": evaluate(model, data.val, device=device, num_workers=workers),
            M.TEST_ACC: evaluate(model, data.test, device=device, num_workers=workers),
            "metrics": saved["metrics"]}


def final_finetune(context: TrialContext, policy, directory, *, num_threads: int = 1) -> dict:
    """HAQ's last step: fine-tune ``policy`` (as given, already inside the budget) from the
    reference with ``context.finetune`` (the search's ``final_finetune`` settings), save it as
    a trial checkpoint in ``directory`` (what ``haqtune export`` loads) and measure val and test.

    The seed is the policy's, as in a trial: the same policy always trains the same way.
    """
    policy = np.asarray(policy, dtype=np.int64)
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(num_threads)))
    try:
        model, data, device, val_acc = finetune_policy(context, policy)
        metrics = trial_metrics(context, policy, val_acc)
        save_quantized_checkpoint(directory, model, context=context, policy=policy, metrics=metrics)
        # Tested as saved (reloaded, like `haqtune export` does): the number reported is
        # the one of the file a user deploys.
        saved, _ = load_quantized_checkpoint(directory)
        test_acc = evaluate(saved.to(device), data.test, device=device)
    finally:
        torch.set_num_threads(threads)
    return {**metrics, M.TEST_ACC: test_acc}


def parse_faults(text: str | None) -> dict[int, tuple[str, int | None]]:
    """``HAQTUNE_TEST_FAULTS`` -> ``{trial_index: (kind, times or None)}`` (see module docstring)."""
    faults: dict[int, tuple[str, int | None]] = {}
    for item in filter(None, (t.strip() for t in (text or "").split(","))):
        try:
            kind, _, rest = item.partition("@")
            index, _, times = rest.partition(":")
            parsed = (kind, int(times) if times else None)
            faults[int(index)] = parsed
        except ValueError:
            raise ValueError(f"{FAULTS_ENV}: expected KIND@INDEX[:TIMES] items, got {item!r}") from None
        if kind not in FAULT_KINDS:
            raise ValueError(f"{FAULTS_ENV}: choose a kind between {', '.join(FAULT_KINDS)}, got {kind!r}")
    return faults


def _trial_number(state_dir: Path, trial_id: str) -> int:
    """1, 2, ... in the order trials first start (claimed atomically: trials run in parallel)."""
    own = state_dir / f"id-{trial_id}"
    if own.exists():
        return int(own.read_text())
    number = 1
    while True:
        try:
            fd = os.open(state_dir / f"number-{number}", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            number += 1
            continue
        os.close(fd)
        own.write_text(str(number))
        return number


def _inject_faults(context: TrialContext) -> TrialContext:
    """The testing hook (module docstring); returns ``context`` unchanged when unset."""
    faults = parse_faults(os.environ.get(FAULTS_ENV))
    if not faults:
        return context
    from ray import tune

    trial = tune.get_context()
    state_dir = Path(os.environ.get(FAULTS_DIR_ENV) or Path(trial.get_trial_dir()).parent / ".haqtune-faults")
    state_dir.mkdir(parents=True, exist_ok=True)
    index = _trial_number(state_dir, trial.get_trial_id())
    if index not in faults:
        return context
    kind, times = faults[index]
    attempt = len(list(state_dir.glob(f"attempt-{trial.get_trial_id()}-*"))) + 1
    (state_dir / f"attempt-{trial.get_trial_id()}-{attempt}").touch()
    if times is not None and attempt > times:
        return context
    if kind == "raise":
        raise RuntimeError(f"injected fault ({FAULTS_ENV}) in trial {index}, attempt {attempt}")
    if kind == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    # nan: a learning rate that overflows float32 at the first step (non-finite loss).
    return dataclasses.replace(context, finetune=dataclasses.replace(context.finetune, lr=1.0e38))


def evaluate_on_test(context: TrialContext, policy, *, project: bool = True) -> dict:
    """Re-run a policy's fine-tune (same seed, same result) and measure the test split.

    For callers without a trial checkpoint (a search's final report loads its trials'
    checkpoints instead, ``evaluate_checkpoint``) and for the uniform 8-bit policy every
    reduction is measured against: ``project=False`` evaluates the policy as given even
    if it is over the budget.
    """
    policy = context.project(policy) if project else np.asarray(policy, dtype=np.int64)
    # Same thread count as the trial: float reductions (and so the fine-tune) depend on it.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        model, data, device, val_acc = finetune_policy(context, policy)
    finally:
        torch.set_num_threads(threads)
    return {**trial_metrics(context, policy, val_acc),
            M.TEST_ACC: evaluate(model, data.test, device=device)}
