"""Issue 15 exploration: does distilling from the reference during a *trial's* brief
fine-tune lower the noise of its val_acc, the floor under AQGAN's target error?

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/experiments/trial_noise_distill.py \
        --work /tmp/trialnoise --policies 8 --seeds 4 --variants 0,0.5:2

A trial's val_acc is deterministic per (policy, search seed); over other seeds it moves by
~1.8 points on the demo (``bench_aqgan.py``, "Noise floor"), which puts a perfect
generator's mean |achieved - target| at ~1.44 points. Here ``--policies`` random policies
of the demo problem (digits, BitFusion energy=0.5, 2-8 bits, projected to the budget; a
few more at a wider budget so the accuracies spread) are fine-tuned like a trial (the
search's 2-epoch ``finetune``) under ``--seeds`` search seeds, once per variant
``WEIGHT[:TEMPERATURE]`` of ``distill_weight`` / ``distill_temperature`` (0: labels only,
the default). Per variant: the mean standard deviation of a policy's val_acc across seeds
(the noise), the standard deviation of the policies' mean val_acc (the signal a predictor
can learn), and their ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from final_distill import POINTS, parse_variant  # noqa: E402

from orchestrator.config import SearchConfig  # noqa: E402
from orchestrator.search import local_context, prepare  # noqa: E402
from search_spaces import Budget, format_policy, project  # noqa: E402
from trainables.trial import finetune_policy  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="storage dir for the reference cache")
    parser.add_argument("--policies", type=int, default=8)
    parser.add_argument("--seeds", type=int, default=4)
    parser.add_argument("--variants", default="0,0.5:2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = SearchConfig.demo()
    prepared = prepare(config)
    rng = np.random.default_rng(0)
    # Half at the demo's budget, half at a looser one: accuracies that spread like a history's.
    policies = []
    for i in range(args.policies):
        budget = config.budget if i % 2 == 0 else Budget.parse("energy=0.8")
        raw = rng.integers(config.min_bits, config.max_bits + 1, size=(len(prepared.layers), 2))
        policies.append(project(raw, prepared.table, budget, allowed=prepared.allowed))
    print("| variant | noise: mean std across seeds (pp) | signal: std of policy means (pp) | signal / noise "
          "| mean abs dev from the policy's mean (pp) | s |")
    print("|---|---:|---:|---:|---:|---:|")
    for weight, temperature in (parse_variant(v) for v in args.variants.split(",")):
        finetune = dataclasses.replace(config.finetune, distill_weight=weight, distill_temperature=temperature)
        base = local_context(config, prepared, args.work, finetune=finetune)
        started = time.perf_counter()
        accs = np.array([[float(finetune_policy(dataclasses.replace(base, seed=config.seed + s), p)[3])
                          for s in range(args.seeds)] for p in policies])
        noise = accs.std(axis=1, ddof=1).mean() * POINTS
        signal = accs.mean(axis=1).std(ddof=1) * POINTS
        dev = np.abs(accs - accs.mean(axis=1, keepdims=True)).mean() * POINTS
        for p, row in zip(policies, accs, strict=True):
            print(f"  {weight:g}:{temperature:g} {format_policy(p)}: " + " / ".join(f"{a:.4f}" for a in row),
                  file=sys.stderr)
        print(f"| {weight:g} : {temperature:g} | {noise:.2f} | {signal:.2f} | {signal / noise:.1f} | {dev:.2f} | "
              f"{time.perf_counter() - started:.0f} |", flush=True)


if __name__ == "__main__":
    main()
