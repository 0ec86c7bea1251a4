"""Fine-tune throughput of a quantized trial vs plain PyTorch, and trials/hour, on one device.

Issue #13 item 7. Target on a GPU: a trial's fine-tune reaches >= 80% of the samples/s
of a plain PyTorch training loop of the same model, data, batch size and device.

Data: a CIFAR-shaped ImageFolder (3x32x32 PNGs, 10 classes) written by this script into
a temporary directory, so no download and the real image-decoding path (``DataLoader``
with ``--workers`` processes, pinned memory on CUDA) is exercised, as for CIFAR-10 or
ImageNet subsets.

Measured, on the device ``pick_device`` gives a trial (CUDA when present, else CPU):

1. plain: ``model(x)``, cross-entropy, SGD step, over a ``DataLoader`` of the same data;
2. quantized: the trial's own fine-tune loop (``trainables.training.train_epoch``) on the
   model quantized to a mixed policy (the trial's ``quantize_model``), same batches;
3. one whole trial (``trainables.trial.finetune_policy``: calibration, evaluation before
   and after, ``--epochs`` fine-tune epochs) on ``--train-images`` images: seconds per
   trial, and the trials/hour of one device running trials back to back; plus the
   projection to the CIFAR-10 config (``configs/mobilenetv2-cifar10-bismo-edge.yaml``:
   45,000 training and 5,000 validation images, 1 fine-tune epoch) from the measured
   fine-tune and evaluation throughputs.

Run (CPU, small): ``python benchmarks/bench_gpu.py --steps 8 --train-images 512``;
on a GPU machine: ``python benchmarks/bench_gpu.py`` (defaults: batch 128, 50 steps).
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

CIFAR_TRAIN_IMAGES = 45_000  # CIFAR-10's 50,000 training images less the 10% validation split
CIFAR_VAL_IMAGES = 5_000
CLASSES = 10


def write_cifar_like(root: Path, *, train_images: int, val_images: int, seed: int) -> None:
    """``root/train/<class>/*.png`` and ``root/val/<class>/*.png``, 32x32 RGB noise + a class tint."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for split, count in (("train", train_images), ("val", val_images)):
        for i in range(count):
            label = i % CLASSES
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            pixels = rng.integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
            pixels[..., label % 3] //= 2  # learnable signal, not only noise
            Image.fromarray(pixels).save(folder / f"{i}.png")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_samples_per_s(model, dataset, *, device, batch_size: int, steps: int, warmup: int,
                        workers: int, amp: str, seed: int) -> float:
    """The reference loop: what a PyTorch user writes for the same model and data."""
    from trainables.training import autocast, make_grad_scaler, optimizer_step

    model = model.to(device).train()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
    scaler = make_grad_scaler(amp, device)
    pin = device.type == "cuda"
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=workers,
                                         pin_memory=pin, generator=torch.Generator().manual_seed(seed),
                                         drop_last=True)
    done, start = 0, None
    while done < warmup + steps:
        for x, y in loader:
            if done == warmup:
                _sync(device)
                start = time.perf_counter()
            x, y = x.to(device, non_blocking=pin), y.to(device, non_blocking=pin)
            with autocast(amp, device):
                loss = F.cross_entropy(model(x), y)
            optimizer_step(loss, optimizer, scaler)  # the same backward/step as a trial
            done += 1
            if done == warmup + steps:
                break
    _sync(device)
    return steps * batch_size / (time.perf_counter() - start)


def quantized_samples_per_s(qmodel, data, *, device, batch_size: int, steps: int, warmup: int,
                            workers: int, amp: str, seed: int) -> float:
    """The trial's own fine-tune loop (``train_epoch``) on the quantized model."""
    from trainables.training import TrainSettings, make_grad_scaler, make_optimizer, train_epoch

    qmodel = qmodel.to(device)
    generator = torch.Generator().manual_seed(seed)
    timings = {}
    for phase, n in (("warmup", warmup), ("measure", steps)):
        settings = TrainSettings(epochs=1, lr=0.01, batch_size=batch_size, max_steps_per_epoch=n, amp=amp)
        optimizer, scheduler = make_optimizer(qmodel, settings, n)
        _sync(device)
        start = time.perf_counter()
        train_epoch(qmodel, data, optimizer, settings, generator=generator, device=device,
                    scheduler=scheduler, scaler=make_grad_scaler(amp, device), num_workers=workers)
        _sync(device)
        timings[phase] = time.perf_counter() - start
    return steps * batch_size / timings["measure"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="measured training steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (cuDNN autotune, workers)")
    parser.add_argument("--workers", type=int, default=4, help="DataLoader processes (a trial's cpus_per_trial)")
    parser.add_argument("--train-images", type=int, default=6400)
    parser.add_argument("--val-images", type=int, default=1000)
    parser.add_argument("--epochs", type=int, default=1, help="fine-tune epochs of the whole-trial run")
    parser.add_argument("--trials", type=int, default=2, help="whole trials timed (the first is a warm-up)")
    parser.add_argument("--amp", default="off", choices=("off", "bf16", "fp16"))
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from hardware import extract_layers, get_cost_model
    from trainables.data import load_dataset
    from trainables.models import build_model
    from trainables.quantize import QuantOptions, quantize_model
    from trainables.training import TrainSettings, evaluate, pick_device
    from trainables.trial import TrialContext, finetune_policy

    device = pick_device(1)
    if args.amp == "fp16" and device.type != "cuda":
        raise SystemExit("--amp fp16 needs CUDA (on the CPU a trial runs fp16 in float32); use bf16 or off")
    with tempfile.TemporaryDirectory(prefix="haqtune-bench-gpu-") as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        write_cifar_like(root, train_images=args.train_images, val_images=args.val_images, seed=args.seed)
        print(f"wrote {args.train_images} + {args.val_images} CIFAR-shaped PNGs in {time.perf_counter() - start:.1f} s")
        data = load_dataset("imagefolder", root=str(root), input_size=32)
        kwargs = {"num_classes": CLASSES, "input_size": 32, "in_channels": 3}
        built = build_model(args.model, seed=args.seed, **kwargs)
        layers = extract_layers(built.model, (3, 32, 32))
        names = [s.name for s in layers]
        rng = np.random.default_rng(args.seed)
        policy = rng.integers(2, 9, size=(len(names), 2))  # a mixed policy, as a searcher proposes
        calib = torch.stack([data.train[i][0] for i in range(min(256, len(data.train)))])
        common = {"device": device, "batch_size": args.batch_size, "steps": args.steps,
                  "warmup": args.warmup, "workers": args.workers, "amp": args.amp, "seed": args.seed}

        plain = plain_samples_per_s(build_model(args.model, seed=args.seed, **kwargs).model, data.train, **common)
        qmodel = quantize_model(build_model(args.model, seed=args.seed, **kwargs).model, names, policy, calib,
                                QuantOptions())
        quant = quantized_samples_per_s(qmodel, data, **common)
        eval_start = time.perf_counter()
        evaluate(qmodel, data.val, device=device, num_workers=args.workers)
        _sync(device)
        eval_sps = len(data.val) / (time.perf_counter() - eval_start)

        # One whole trial, as a Ray worker runs it (minus Ray): the real finetune_policy.
        table = get_cost_model("bismo-edge").table(layers)
        context = TrialContext(
            model=args.model, dataset="imagefolder", model_kwargs=kwargs, input_size=32,
            layer_names=tuple(names), reference_state=built.model.state_dict(), ref_acc=0.0, table=table,
            budget=None, finetune=TrainSettings(epochs=args.epochs, lr=0.01, batch_size=args.batch_size,
                                                amp=args.amp),
            seed=args.seed, data_root=str(root), gpus_per_trial=1.0)
        trial_s = []
        for _ in range(max(args.trials, 2)):
            t0 = time.perf_counter()
            finetune_policy(context, policy, num_workers=args.workers)
            _sync(device)
            trial_s.append(time.perf_counter() - t0)
        steady = float(np.mean(trial_s[1:]))

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    projected_s = args.epochs * CIFAR_TRAIN_IMAGES / quant + (args.epochs + 1) * CIFAR_VAL_IMAGES / eval_sps
    print(f"\ndevice: {name}; torch {torch.__version__}; model {args.model} 3x32x32, {len(names)} quantized "
          f"layers; batch {args.batch_size}; amp {args.amp}; DataLoader workers {args.workers}\n")
    print("| measure | value |\n|---|---:|")
    print(f"| plain PyTorch fine-tune, samples/s | {plain:,.0f} |")
    print(f"| quantized trial fine-tune (train_epoch), samples/s | {quant:,.0f} |")
    print(f"| quantized / plain | {quant / plain:.0%} |")
    print(f"| quantized evaluation, samples/s | {eval_sps:,.0f} |")
    print(f"| one trial ({args.train_images} train / {args.val_images} val images, {args.epochs} epoch), s | "
          f"{steady:.1f} |")
    print(f"| trials/hour at that size, one device | {3600 / steady:,.0f} |")
    print(f"| CIFAR-10 config trial (45k train, 5k val, {args.epochs} epoch), projected s | {projected_s:,.0f} |")
    print(f"| CIFAR-10 config trials/hour, one device, projected | {3600 / projected_s:,.1f} |")
    print(f"\ntarget (GPU): quantized >= 80% of plain: {'met' if quant >= 0.8 * plain else 'NOT met'} "
          f"on this {device.type.upper()}")


if __name__ == "__main__":
    main()
