"""Calibration memory benchmark: peak RSS of one MobileNetV2-224 trial's quantize step.

Run from the repository root (each measurement in a fresh subprocess, so peaks do not mix):

    .venv/bin/python benchmarks/bench_memory.py [--samples 64 256 512] [--batch 32]

A trial's quantize step = ``quantize_model(reference, layers, policy, batches)`` with the
calibration images streamed ``--batch`` at a time from a dataset (as ``finetune_policy``
does). Images are generated per index (like an ImageFolder reads them), so no image set
sits in memory. Prints, as markdown for benchmarks/RESULTS.md, per sample count: RSS
before the step, the peak during it (a 2 ms VmRSS sampler and ``ru_maxrss``), what
calibration added, the step's time, and what keeping every quantized layer's input (the
old calibration) would have held: sum over layers of input elements x samples x 4 bytes.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import json  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402

MIB = 1024 * 1024
INPUT_SHAPE = (3, 224, 224)


def _rss_bytes() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("VmRSS not found in /proc/self/status (Linux only)")


class _PeakSampler(threading.Thread):
    """Samples this process's RSS every ``interval_s`` until stopped; keeps the maximum."""

    def __init__(self, interval_s: float = 0.002) -> None:
        super().__init__(daemon=True)
        self.interval_s, self.peak, self._stop_event = interval_s, _rss_bytes(), threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.peak = max(self.peak, _rss_bytes())
            time.sleep(self.interval_s)

    def stop(self) -> int:
        self._stop_event.set()
        self.join()
        self.peak = max(self.peak, _rss_bytes())
        return self.peak


def measure(samples: int, batch: int) -> dict:
    """One quantize step in this process (call in a fresh one)."""
    import torch
    from torch.utils.data import Dataset

    from hardware import extract_layers
    from trainables.data import calibration_batches
    from trainables.models import build_model
    from trainables.quantize import quantize_model

    torch.set_num_threads(1)

    class GeneratedImages(Dataset):
        """Deterministic random normalized images, made when read (like files on disk)."""

        def __len__(self) -> int:
            return samples

        def __getitem__(self, i: int):
            return torch.randn(INPUT_SHAPE, generator=torch.Generator().manual_seed(i)), 0

    built = build_model("mobilenet_v2", num_classes=1000, seed=0)
    model = built.model.eval()
    layers = extract_layers(model, INPUT_SHAPE)
    names = [s.name for s in layers]
    policy = [(4, 4)] * len(names)
    keep_all_bytes = sum(s.input_elements for s in layers) * samples * 4
    dataset = GeneratedImages()
    # Warm-up on one image: first-call allocations (kernels, allocator pools) are not calibration.
    quantize_model(model, names, policy, calibration_batches(dataset, range(1), 1))
    before = _rss_bytes()
    maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sampler = _PeakSampler()
    sampler.start()
    started = time.perf_counter()
    quantize_model(model, names, policy, calibration_batches(dataset, range(samples), batch))
    seconds = time.perf_counter() - started
    peak = sampler.stop()
    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if maxrss > maxrss_before:  # the process's all-time peak rose during the step: it counts too
        peak = max(peak, maxrss)
    return {"samples": samples, "batch": batch, "layers": len(layers), "rss_before_mib": before / MIB,
            "peak_mib": peak / MIB, "added_mib": (peak - before) / MIB,
            "seconds": seconds, "keep_all_mib": keep_all_bytes / MIB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, nargs="+", default=[64, 256, 512])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.samples[0], args.batch)))
        return
    rows = []
    for n in args.samples:
        out = subprocess.run([sys.executable, __file__, "--child", "--samples", str(n), "--batch", str(args.batch)],
                             check=True, capture_output=True, text=True, env={**os.environ})
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"MobileNetV2, 3x224x224, {rows[0]['layers']} quantized layers, 4/4-bit policy, "
          f"calibration batches of {args.batch}, 1 torch thread\n")
    print("| calibration samples | RSS before (MiB) | peak during quantize (MiB) | added by calibration (MiB) "
          "| quantize step (s) | keep-every-input estimate (MiB) |")
    print("|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['samples']} | {r['rss_before_mib']:.0f} | {r['peak_mib']:.0f} | {r['added_mib']:.0f} | "
              f"{r['seconds']:.1f} | {r['keep_all_mib']:.0f} |")


if __name__ == "__main__":
    main()
