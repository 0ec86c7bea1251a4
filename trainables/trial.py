"""The Ray Tune function trainable: project -> quantize -> brief fine-tune -> report.

``quantize_and_finetune(config, context)`` is what every trial runs. Ray ships the
``TrialContext`` (reference weights, cost table, budget, settings) to workers once
through the object store with ``tune.with_parameters``.
"""

from __future__ import annotations

import functools
import zlib
from dataclasses import dataclass, field

import numpy as np
import torch

from hardware import CostTable
from search_spaces import Budget, format_policy, policy_from_config, project
from search_spaces import metrics as M

from .data import DataSplits, load_dataset
from .models import build_model
from .quantize import QuantOptions, quantize_model
from .training import (
    TrainSettings,
    evaluate,
    make_optimizer,
    pick_device,
    steps_per_epoch,
    train_epoch,
)

HAQ_REWARD_SCALE = 0.1  # HAQ: reward = 0.1 * (acc - ref_acc)
CALIBRATION_SAMPLES = 256


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
    quant: QuantOptions = field(default_factory=QuantOptions)

    def project(self, policy) -> np.ndarray:
        return project(policy, self.table, self.budget, min_bits=self.min_bits, max_bits=self.max_bits)


@functools.lru_cache(maxsize=2)
def _cached_dataset(name: str, root: str, input_size: int | None) -> DataSplits:
    # Reused actors and the driver load each dataset once per process.
    return load_dataset(name, root=root, input_size=input_size)


def policy_seed(seed: int, policy: np.ndarray) -> int:
    """Fine-tune seed of a policy: the same policy always trains the same way."""
    return zlib.crc32(np.ascontiguousarray(policy, dtype=np.int64).tobytes(), seed) & 0x7FFFFFFF


def policy_costs(table: CostTable, policy: np.ndarray) -> dict[str, float]:
    """Exact (float64) latency/energy/size of one policy."""
    latency, energy, size = table.layer_costs(policy)
    return {M.LATENCY_MS: float(latency.sum()), M.ENERGY_MJ: float(energy.sum()),
            M.SIZE_MB: float(size.sum())}


def finetune_policy(context: TrialContext, policy: np.ndarray, *, on_epoch=None):
    """Quantize the reference model to ``policy`` and fine-tune it briefly.

    Calls ``on_epoch(epoch, val_acc)`` after every epoch (and once before training
    when ``epochs == 0``). Returns ``(model, data, device, val_acc)``.
    """
    device = pick_device(context.gpus_per_trial)
    data = _cached_dataset(context.dataset, context.data_root, context.input_size)
    built = build_model(context.model, seed=context.seed, **context.model_kwargs)
    model = built.model
    model.load_state_dict(context.reference_state)
    model.to(device)
    seed = policy_seed(context.seed, policy)
    generator = torch.Generator().manual_seed(seed)
    calib_idx = torch.randperm(len(data.train), generator=generator)[:CALIBRATION_SAMPLES]
    calib = torch.stack([data.train[int(i)][0] for i in calib_idx]).to(device)
    qmodel = quantize_model(model, context.layer_names, policy, calib, context.quant)
    settings = context.finetune
    val_acc = evaluate(qmodel, data.val, device=device)
    if settings.epochs == 0 and on_epoch is not None:
        on_epoch(0, val_acc)
    if settings.epochs:
        optimizer, scheduler = make_optimizer(qmodel, settings, settings.epochs * steps_per_epoch(data, settings))
        for epoch in range(1, settings.epochs + 1):
            train_epoch(qmodel, data, optimizer, settings, generator=generator, device=device,
                        scheduler=scheduler)
            val_acc = evaluate(qmodel, data.val, device=device)
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
    """Ray Tune function trainable; use with ``tune.with_parameters(..., context=ctx)``."""
    from ray import tune

    torch.set_num_threads(max(1, int(config.get("_num_threads", 1))))
    policy = context.project(policy_from_config(config, len(context.layer_names)))
    last_epoch = max(context.finetune.epochs, 0)

    def report(epoch: int, val_acc: float) -> None:
        tune.report({**trial_metrics(context, policy, val_acc), M.EPOCH: epoch,
                     M.DONE: int(epoch == last_epoch)})

    finetune_policy(context, policy, on_epoch=report)


def evaluate_on_test(context: TrialContext, policy, *, project: bool = True) -> dict:
    """Re-run a policy's fine-tune (same seed, same result) and measure the test split.

    Used by the driver for the final best policies only: the search never sees test.
    ``project=False`` evaluates the policy as given even if it is over the budget (the
    uniform 8-bit policy every reduction is measured against).
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
