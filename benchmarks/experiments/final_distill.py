"""Issue 14 exploration: does distilling from the full-precision reference during HAQ's
final fine-tune close BitFusion's energy headline (>= 2x at <= 0.5 test points)?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/final_distill.py \
        --headline benchmarks/headline/headline.json --work /tmp/distill \
        --variants 0,0.5:2,1:1

Takes the deployed BitFusion energy=0.5 policies of the headline's searches (haq and
sensitivity-dp, every seed) plus uniform 3/3 and 8/8, and fine-tunes each again the way
the headline's final fine-tune does (30 epochs from the seed's reference, the policy's
own fine-tune seed), once per variant ``WEIGHT[:TEMPERATURE]`` of ``distill_weight`` /
``distill_temperature``; variant 0 is HAQ's protocol. The reference is trained again here
(same seed and settings as the headline's, in another process), so variant 0 is close to
but not exactly the headline's numbers. Loss = uniform 8/8's accuracy - the policy's, in
points, both under the same variant, on val (where a variant is chosen) and on test.
Only a screening: the headline itself chooses among the top 3 policies by val after the
final fine-tune (``bench_headline.py --set 'final_finetune={...}'``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from orchestrator.config import SearchConfig  # noqa: E402
from orchestrator.search import local_context, prepare  # noqa: E402
from search_spaces import metrics as M  # noqa: E402
from search_spaces import parse_policy  # noqa: E402
from trainables import evaluate_on_test  # noqa: E402

POINTS = 100.0


def parse_variant(text: str) -> tuple[float, float]:
    weight, _, temperature = text.partition(":")
    return float(weight), float(temperature or 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--headline", type=Path, default=Path("benchmarks/headline/headline.json"))
    parser.add_argument("--hardware", default="bitfusion")
    parser.add_argument("--budget", default="0.5")
    parser.add_argument("--work", type=Path, required=True, help="storage dir for the reference cache")
    parser.add_argument("--variants", default="0,0.5:2,1:1")
    args = parser.parse_args()
    torch.set_num_threads(1)
    headline = json.loads(args.headline.read_text())
    base = headline["config"]
    metric = {"bitfusion": "energy"}.get(args.hardware, "latency")
    runs = headline["results"][args.hardware][args.budget]
    variants = [parse_variant(v) for v in args.variants.split(",")]
    seeds = sorted({r["seed"] for rows in runs.values() for r in rows})
    rows = []  # (variant, seed, policy label, {"val": val_acc, "test": test_acc})
    for seed in seeds:
        config = SearchConfig.from_dict({**base, "hardware": args.hardware, "seed": seed,
                                         "budget": f"{metric}={args.budget}"})
        prepared = prepare(config)
        policies = {"uniform 8/8": prepared.table.uniform(8), "uniform 3/3": prepared.table.uniform(3)}
        for searcher, results in runs.items():
            for r in results:
                if r["seed"] == seed:
                    policies[searcher] = parse_policy(r["policy"])
        for weight, temperature in variants:
            final = dataclasses.replace(config.final_finetune, distill_weight=weight,
                                        distill_temperature=temperature)
            context = local_context(config, prepared, args.work, finetune=final)
            for label, policy in policies.items():
                result = evaluate_on_test(context, policy, project=False)
                test = result[M.TEST_ACC]
                rows.append(((weight, temperature), seed, label, {"val": result[M.VAL_ACC], "test": test}))
                print(f"seed {seed} distill {weight}:{temperature} {label}: val {result[M.VAL_ACC]:.4f} "
                      f"test {test:.4f}", flush=True)
    # The variant is chosen on validation; test is what it then costs.
    for split in ("val", "test"):
        print(f"\n{split} split\n\n| variant (weight:T) | policy | {split}-acc loss vs 8/8 (points) | per seed |")
        print("|---|---|---:|---|")
        for variant in variants:
            u8 = {s: acc[split] for v, s, lab, acc in rows if v == variant and lab == "uniform 8/8"}
            for label in [lab for lab in dict.fromkeys(lab for _, _, lab, _ in rows) if lab != "uniform 8/8"]:
                loss = np.array([(u8[s] - acc[split]) * POINTS
                                 for v, s, lab, acc in rows if v == variant and lab == label])
                print(f"| {variant[0]:g}:{variant[1]:g} | {label} | {loss.mean():.2f} ± {loss.std(ddof=1):.2f} | "
                      f"{' / '.join(f'{x:+.2f}' for x in loss)} |")
            acc8 = np.array(list(u8.values())) * POINTS
            print(f"| {variant[0]:g}:{variant[1]:g} | uniform 8/8 {split} acc | {acc8.mean():.2f} | "
                  f"{' / '.join(f'{x:.2f}' for x in acc8)} |")

if __name__ == "__main__":
    main()
