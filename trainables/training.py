"""Training and evaluation loops, readable top to bottom (nanoGPT-style)."""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataSplits, batches

AMP_MODES = ("off", "bf16", "fp16")
# Worker processes of a non-tensor dataset's DataLoader when the caller does not say
# (the reference training, the sensitivity oracle): what ``data.batches`` always used.
DEFAULT_LOADER_WORKERS = 2


class DivergedError(RuntimeError):
    """The loss became NaN/inf: the trial fails (and is retried or recorded), the search goes on."""


def _check_number(name: str, value, *, integer: bool, minimum: float, strict: bool = False) -> None:
    kind = int if integer else int | float
    ok = not isinstance(value, bool) and isinstance(value, kind)
    if ok:
        ok = value > minimum if strict else value >= minimum
    if not ok:
        what = "an integer" if integer else "a number"
        raise ValueError(f"{name}: expected {what} {'>' if strict else '>='} {minimum:g}, got {value!r}")


@dataclass(frozen=True)
class TrainSettings:
    """One training run: the reference model's training or a trial's brief fine-tune.

    Also the ``reference`` and ``finetune`` sections of a search config.
    """

    epochs: int
    lr: float
    batch_size: int = 64
    weight_decay: float = 0.0
    max_steps_per_epoch: int | None = None  # cap for big datasets: "brief" fine-tunes
    # Mixed precision of the training steps (evaluation stays float32): bf16 autocast on
    # CUDA and CPU; fp16 autocast with a GradScaler on CUDA only (float32 on a CPU fallback).
    amp: str = "off"
    # Knowledge distillation from the full-precision reference, for a quantized model's
    # fine-tune (not HAQ's protocol, which trains on labels only): the loss is
    # (1 - w) * cross-entropy + w * T^2 * KL(teacher || student) at temperature T
    # (Hinton et al. 2015). 0 = labels only.
    distill_weight: float = 0.0
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.amp not in AMP_MODES:
            raise ValueError(f"amp: choose between {', '.join(AMP_MODES)}, got {self.amp!r}")
        _check_number("epochs", self.epochs, integer=True, minimum=0)
        _check_number("lr", self.lr, integer=False, minimum=0, strict=True)
        _check_number("batch_size", self.batch_size, integer=True, minimum=1)
        _check_number("weight_decay", self.weight_decay, integer=False, minimum=0)
        if self.max_steps_per_epoch is not None:
            _check_number("max_steps_per_epoch", self.max_steps_per_epoch, integer=True, minimum=1)
        _check_number("distill_weight", self.distill_weight, integer=False, minimum=0)
        if self.distill_weight > 1:
            raise ValueError(f"distill_weight: expected a number between 0 and 1, got {self.distill_weight!r}")
        _check_number("distill_temperature", self.distill_temperature, integer=False, minimum=0, strict=True)


@dataclass(frozen=True)
class ReferenceSettings(TrainSettings):
    """The ``reference`` section: how the full-precision reference is trained, or
    ``weights`` it starts from (a torchvision weights name or a checkpoint path); with
    weights the reference is evaluated on the validation split, not retrained."""

    weights: str | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.distill_weight:
            raise ValueError("distill_weight: the reference is the teacher a fine-tune distills from; "
                             "set it in finetune or final_finetune, not in reference")
        if self.weights is not None and (not isinstance(self.weights, str) or not self.weights):
            raise ValueError(f"weights: expected a torchvision weights name or a checkpoint path, got {self.weights!r}")


def pick_device(gpus: float = 0) -> torch.device:
    """The GPU Ray assigned to this worker if it was given one and CUDA works, else CPU.

    Ray sets ``CUDA_VISIBLE_DEVICES`` to the worker's assigned GPU ids, so the first
    visible device (``cuda:0``) is the trial's own GPU, whichever the node's index is.
    The CPU fallback is silent here: the driver says it once per search (``gpu_fallback_note``).
    """
    if gpus > 0 and torch.cuda.is_available():
        return torch.device("cuda", 0)
    return torch.device("cpu")


def amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``amp`` on ``device``; None = float32 (off, or fp16 without CUDA:
    CPU float16 autocast is slow and a GradScaler'd fp16 step exists for CUDA)."""
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16" and device.type == "cuda":
        return torch.float16
    return None


def autocast(amp: str, device: torch.device):
    """``torch.autocast`` for a training step of ``amp`` on ``device`` (a no-op when off)."""
    dtype = amp_dtype(amp, device)
    return nullcontext() if dtype is None else torch.autocast(device.type, dtype=dtype)


def make_grad_scaler(amp: str, device: torch.device):
    """A GradScaler for fp16 on CUDA (small gradients underflow in float16), else None."""
    if amp_dtype(amp, device) == torch.float16:
        return torch.amp.GradScaler(device.type)
    return None


def loader_batches(dataset, batch_size: int, *, device: torch.device, shuffle: bool = False,
                   generator: torch.Generator | None = None,
                   num_workers: int = DEFAULT_LOADER_WORKERS):
    """``(x, y)`` batches on ``device``. In-memory ``TensorDataset``s (digits) are sliced
    directly (``data.batches``: a worker process would cost more than the epoch). Other
    datasets (ImageFolder, CIFAR, MNIST) decode images in a ``DataLoader`` with
    ``num_workers`` processes (a trial's CPUs) and pinned memory on CUDA, so decoding
    overlaps the GPU's steps. The order depends only on ``generator`` (the sampler's
    permutation and the workers' base seed come from it), not on ``num_workers``.
    """
    if isinstance(dataset, torch.utils.data.TensorDataset):
        yield from batches(dataset, batch_size, shuffle=shuffle, generator=generator, device=device)
        return
    pin = device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=shuffle,
                                         generator=generator, num_workers=max(0, int(num_workers)),
                                         pin_memory=pin)
    for xb, yb in loader:
        yield xb.to(device, non_blocking=pin), yb.to(device, non_blocking=pin)


@torch.no_grad()
def evaluate(model: nn.Module, dataset, *, device: torch.device, batch_size: int = 512,
             num_workers: int = DEFAULT_LOADER_WORKERS) -> float:
    """Top-1 accuracy in [0, 1] (in float32, whatever the training's ``amp``)."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in loader_batches(dataset, batch_size, device=device, num_workers=num_workers):
        correct += int((model(x).argmax(dim=1) == y).sum())
        total += int(y.numel())
    model.train(was_training)
    return correct / max(total, 1)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler=None) -> None:
    """One backward pass and optimizer step; through ``scaler`` (fp16 autocast) when given."""
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()


def distillation_loss(logits: torch.Tensor, labels: torch.Tensor, teacher_logits: torch.Tensor,
                      *, weight: float, temperature: float) -> torch.Tensor:
    """(1 - weight) * cross-entropy + weight * T^2 * KL(teacher_T || student_T).

    The T^2 keeps the soft term's gradient scale independent of T (Hinton et al. 2015).
    """
    hard = F.cross_entropy(logits, labels)
    soft = F.kl_div(F.log_softmax(logits / temperature, dim=-1),
                    F.log_softmax(teacher_logits / temperature, dim=-1),
                    reduction="batchmean", log_target=True) * temperature ** 2
    return (1.0 - weight) * hard + weight * soft


def train_epoch(model: nn.Module, data: DataSplits, optimizer: torch.optim.Optimizer,
                settings: TrainSettings, *, generator: torch.Generator, device: torch.device,
                scheduler=None, scaler=None, num_workers: int = DEFAULT_LOADER_WORKERS,
                teacher: nn.Module | None = None) -> float:
    """One pass over the training split; returns the mean loss. Raises DivergedError on NaN.

    ``settings.amp`` runs the forward pass under autocast; with fp16 on CUDA pass the
    run's ``make_grad_scaler`` (one per run: its scale carries over between epochs).
    ``teacher`` (in eval mode): distill from it with ``settings.distill_weight`` and
    ``distill_temperature``.
    """
    model.train()
    total, steps = 0.0, 0
    for x, y in loader_batches(data.train, settings.batch_size, shuffle=True, generator=generator,
                               device=device, num_workers=num_workers):
        with autocast(settings.amp, device):
            logits = model(x)
            if teacher is None:
                loss = F.cross_entropy(logits, y)
            else:
                with torch.no_grad():
                    teacher_logits = teacher(x)
                loss = distillation_loss(logits, y, teacher_logits, weight=settings.distill_weight,
                                         temperature=settings.distill_temperature)
        if not torch.isfinite(loss):
            raise DivergedError(f"loss became {loss.item()} at step {steps}")
        optimizer_step(loss, optimizer, scaler)
        if scheduler is not None:
            scheduler.step()
        total += loss.item()
        steps += 1
        if settings.max_steps_per_epoch and steps >= settings.max_steps_per_epoch:
            break
    return total / max(steps, 1)


def steps_per_epoch(data: DataSplits, settings: TrainSettings) -> int:
    steps = math.ceil(len(data.train) / settings.batch_size)
    return min(steps, settings.max_steps_per_epoch or steps)


def make_optimizer(model: nn.Module, settings: TrainSettings, total_steps: int):
    """SGD with Nesterov momentum and a cosine schedule over ``total_steps``."""
    optimizer = torch.optim.SGD(model.parameters(), lr=settings.lr, momentum=0.9, nesterov=True,
                                weight_decay=settings.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(total_steps, 1))
    return optimizer, scheduler


def train_epochs(model: nn.Module, data: DataSplits, settings: TrainSettings, *, seed: int,
                 device: torch.device, num_workers: int = DEFAULT_LOADER_WORKERS):
    """Train ``model`` in place, yielding the number of each finished epoch (1..epochs):
    a caller reports progress between epochs (the reference task streams it to the driver)."""
    generator = torch.Generator().manual_seed(seed)
    model.to(device)
    optimizer, scheduler = make_optimizer(model, settings, settings.epochs * steps_per_epoch(data, settings))
    scaler = make_grad_scaler(settings.amp, device)
    for epoch in range(1, settings.epochs + 1):
        train_epoch(model, data, optimizer, settings, generator=generator, device=device,
                    scheduler=scheduler, scaler=scaler, num_workers=num_workers)
        yield epoch


def train(model: nn.Module, data: DataSplits, settings: TrainSettings, *, seed: int,
          device: torch.device, num_workers: int = DEFAULT_LOADER_WORKERS) -> float:
    """Train ``model`` in place; returns its validation accuracy."""
    for _ in train_epochs(model, data, settings, seed=seed, device=device, num_workers=num_workers):
        pass
    return evaluate(model, data.val, device=device, num_workers=num_workers)


def content_hash(payload: dict) -> str:
    """Stable short hash of a JSON-able dict (the reference-model cache key)."""
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` to a temp file in the same directory, then ``os.replace``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def reference_key(**payload) -> dict:
    return {**payload, "torch": torch.__version__.split("+")[0]}


def reference_cache_key(*, model: str, dataset: str, data: DataSplits, dataset_options: dict,
                        data_root: str, model_kwargs: dict) -> dict:
    """Everything a reference model depends on besides its training settings, seed and
    weights (``reference_model`` adds those): the model (with a content hash of a
    ``module:callable``'s source file), the dataset, its subset options and fingerprint
    (classes, files, split), the data root and the image size."""
    from .models import model_source_hash

    return reference_key(
        model=model, model_source=model_source_hash(model), dataset=dataset,
        dataset_options=dict(sorted((dataset_options or {}).items())), data_fingerprint=data.fingerprint,
        # A "~" root is each node's own (node.node_data_root): the key keeps it as written.
        data_root=data_root if data_root.startswith("~") else os.path.abspath(data_root),
        input_shape=list(data.input_shape),
        **{k: v for k, v in sorted(model_kwargs.items())})


def reference_payload(key: dict, settings: TrainSettings, *, seed: int, weights=None) -> dict:
    """The full cache key of a reference: ``key`` (``reference_cache_key``) plus the
    training settings and seed, or, for a pretrained one, the weights' identity."""
    if weights is not None:
        return {**key, "weights": {"source": weights.source, "identity": weights.identity}}
    # amp joins the key only when on, so references cached before it existed stay valid;
    # a reference never distills (ReferenceSettings), so the distillation keys never join.
    settings_dict = {k: v for k, v in asdict(settings).items()
                     if k not in ("weights", "distill_weight", "distill_temperature")
                     and not (k == "amp" and v == "off")}
    return {**key, "settings": settings_dict, "seed": seed}


def reference_cache_name(payload: dict) -> str:
    """The cache file name of a reference (a 64-bit content hash of its payload)."""
    return f"reference-{content_hash(payload)}.pt"


def load_cached_reference(path: Path | None, payload: dict):
    """``{"state_dict", "val_acc", "key"}`` cached at ``path`` for ``payload``, else None."""
    return _load_cached(path, payload)


def _load_cached(path: Path | None, payload: dict):
    if path is None or not path.exists():
        return None
    cached = torch.load(path, map_location="cpu", weights_only=True)
    # The file name is a 64-bit hash of the key; the stored key settles any collision.
    return cached if cached.get("key") == payload else None


def train_reference(build, data: DataSplits, settings: TrainSettings, *, seed: int,
                    cache_dir: Path | None, key: dict, device: torch.device):
    """The full-precision reference model: trained once per key, cached by content hash.

    Returns ``(state_dict, val_acc, cache_path)``; ``build()`` makes the untrained model.
    Cache entries are written atomically and read with ``weights_only=True``.
    """
    payload = reference_payload(key, settings, seed=seed)
    path = Path(cache_dir) / reference_cache_name(payload) if cache_dir else None
    cached = _load_cached(path, payload)
    if cached is not None:
        return cached["state_dict"], float(cached["val_acc"]), path
    model = build()
    val_acc = train(model, data, settings, seed=seed, device=device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path is not None:
        atomic_torch_save({"state_dict": state, "val_acc": val_acc, "key": payload}, path)
    return state, val_acc, path


def pretrained_reference(build, data: DataSplits, weights, *, cache_dir: Path | None, key: dict,
                         device: torch.device, model_name: str):
    """A pretrained reference (``models.Weights``): loaded into ``build()``, evaluated on the
    validation split, not trained. The evaluation is cached by key and weights identity
    (a checkpoint's content hash), so an edited checkpoint is evaluated again.

    Returns ``(state_dict, val_acc, cache_path)``.
    """
    from .models import apply_weights

    payload = reference_payload(key, None, seed=0, weights=weights)
    path = Path(cache_dir) / reference_cache_name(payload) if cache_dir else None
    cached = _load_cached(path, payload)
    if cached is not None:
        return cached["state_dict"], float(cached["val_acc"]), path
    model = build()
    apply_weights(model, weights, model_name)
    model.to(device)
    val_acc = evaluate(model, data.val, device=device)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if path is not None:
        atomic_torch_save({"state_dict": state, "val_acc": val_acc, "key": payload}, path)
    return state, val_acc, path


def reference_model(build, data: DataSplits, settings: TrainSettings, *, seed: int, cache_dir: Path | None,
                    key: dict, device: torch.device, model_name: str):
    """The reference of a search: ``settings.weights`` evaluated as is when given (a
    ``ReferenceSettings``), else trained from scratch. Returns ``(state_dict, val_acc, cache_path)``."""
    weights = getattr(settings, "weights", None)
    if weights is None:
        return train_reference(build, data, settings, seed=seed, cache_dir=cache_dir, key=key, device=device)
    from .models import load_weights

    return pretrained_reference(build, data, load_weights(model_name, weights), cache_dir=cache_dir,
                                key=key, device=device, model_name=model_name)
