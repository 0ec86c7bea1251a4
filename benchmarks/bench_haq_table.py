"""The BISMO simulators against HAQ's released BISMO-cloud table (MobileNetV2, batch 16).

    .venv/bin/python benchmarks/bench_haq_table.py

Prints, for ``bismo-cloud`` under both mappings (``haq``, the default, and
``bismo-native``): the uniform k/k speedups over 8/8 next to HAQ's, their ratio, the
per-layer log-latency correlation over all 53 x 64 entries, the 8/8 total latency,
and the share of the 8/8 latency in depthwise layers. ``tests/test_haq_table.py``
asserts the targets (speedups within 10%, correlation >= 0.95); this prints the numbers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hardware import BITS, extract_layers, get_cost_model  # noqa: E402
from trainables.models import build_model  # noqa: E402


def speedups(latency_s: np.ndarray) -> np.ndarray:
    totals = latency_s.sum(axis=0)
    return totals[7, 7] / totals[BITS - 1, BITS - 1]


def main() -> None:
    # 1000 classes, as the table (its classifier row is 1280 -> 1000).
    built = build_model("mobilenet_v2", input_size=224, num_classes=1000)
    layers = extract_layers(built.model, built.input_shape)
    depthwise = np.array([s.kind == "depthwise" for s in layers])
    haq = get_cost_model("haq-cloud-mobilenetv2").table(layers).latency_s
    rows = {"HAQ's table": haq}
    for mapping in ("haq", "bismo-native"):
        rows[f"bismo-cloud ({mapping})"] = get_cost_model("bismo-cloud", mapping=mapping).table(layers).latency_s
    bits = list(range(8, 0, -1))
    print("| latency table | " + " | ".join(f"{b}/{b}" for b in bits)
          + " | log corr vs HAQ | 8/8 ms | depthwise share of 8/8 |")
    print("|---|" + "---:|" * (len(bits) + 3))
    for name, lat in rows.items():
        sp = speedups(lat)
        cells = " | ".join(f"{sp[b - 1]:.2f}" for b in bits)
        corr = np.corrcoef(np.log(lat.ravel()), np.log(haq.ravel()))[0, 1]
        share = lat[depthwise, 7, 7].sum() / lat[:, 7, 7].sum()
        print(f"| {name} | {cells} | {corr:.3f} | {lat[:, 7, 7].sum() * 1e3:.1f} | {share:.0%} |")
    print("\nRatio of speedups to HAQ's (target: within 0.90-1.10 at every bit width):\n")
    print("| mapping | " + " | ".join(f"{b}/{b}" for b in bits) + " |")
    print("|---|" + "---:|" * len(bits))
    for name, lat in list(rows.items())[1:]:
        ratio = speedups(lat) / speedups(haq)
        print(f"| {name} | " + " | ".join(f"{ratio[b - 1]:.3f}" for b in bits) + " |")
    for name in ("bismo-edge", "bitfusion"):
        for mapping in (("haq", "bismo-native") if name == "bismo-edge" else (None,)):
            options = {"mapping": mapping} if mapping else {}
            table = get_cost_model(name, **options).table(layers)
            lat, en = speedups(table.latency_s), speedups(table.energy_j)
            label = f"{name} ({mapping})" if mapping else name
            print(f"\n{label}: uniform latency speedup vs 8/8 "
                  + ", ".join(f"{b}/{b} {lat[b - 1]:.2f}x" for b in (6, 4, 2, 1))
                  + "; energy " + ", ".join(f"{b}/{b} {en[b - 1]:.2f}x" for b in (6, 4, 2, 1)))


if __name__ == "__main__":
    main()
