"""Issue 15 exploration: does one fine-tune seed shared by every policy (common random
numbers) make a policy's val_acc predictable from its neighbours?

    .venv/bin/python benchmarks/experiments/aqgan_common_seed.py \
        --search /tmp/aqg/demo/haqtune_runs/aqgan-20261201-181308-530c --evals /tmp/aqg/demo/evals.json

``--search``: an ``aqgan`` search directory on the demo (its generator holds the history);
``--evals``: ``bench_aqgan.py --part demo --cache`` output (out-of-sample policies and
their val_acc under per-policy seeds). Every policy is fine-tuned again under two common
seeds; the ridge fitted on the history predicts the rest. Results: RESULTS.md, AQGAN.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import trainables.trial as trial_module  # noqa: E402
from orchestrator.config import SearchConfig  # noqa: E402
from orchestrator.search import local_context, prepare  # noqa: E402
from orchestrator.searchers._aqgan import RidgePredictor  # noqa: E402
from orchestrator.searchers.aqgan import load_generator  # noqa: E402
from search_spaces import metrics as M  # noqa: E402
from search_spaces import parse_policy  # noqa: E402
from trainables import evaluate_on_test  # noqa: E402

COMMON_SEEDS = (1000, 1001)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--search", required=True, type=Path)
    parser.add_argument("--evals", required=True, type=Path)
    args = parser.parse_args()
    torch.set_num_threads(1)
    config = SearchConfig.from_yaml(args.search / "config.yaml").replace(budget="none")
    context = local_context(config, prepare(config), args.search.parent, finetune=config.finetune)
    _, extra = load_generator(args.search / "aqgan_generator.pt")
    hist_p, hist_a = extra["policies"].numpy(), extra["accs"].numpy()
    seen = {p.astype(np.int8).tobytes() for p in hist_p}
    evals = json.loads(args.evals.read_text())[args.search.name]
    pairs = [(parse_policy(k), a) for k, a in evals.items()]
    pairs = [(p, a) for p, a in pairs if p.astype(np.int8).tobytes() not in seen]
    new_p, new_a = np.stack([p for p, _ in pairs]), np.array([a for _, a in pairs])
    check = evaluate_on_test(context, hist_p[0], project=False)[M.VAL_ACC]
    print(f"reproduces the history: {check == hist_a[0]} ({check:.4f})")

    def report(label: str, train_acc, test_acc) -> None:
        ridge = RidgePredictor(policies=hist_p, accs=np.asarray(train_acc), min_bits=1, max_bits=8)
        pred = ridge.predict(new_p)
        print(f"{label}: ridge out-of-sample mean abs error {np.abs(pred - test_acc).mean() * 100:.2f} points, "
              f"Spearman {spearmanr(pred, test_acc).statistic:.3f} ({len(test_acc)} policies)", flush=True)

    report("per-policy seeds (haqtune's trials)", hist_a, new_a)
    common = []
    for seed in COMMON_SEEDS:
        trial_module.policy_seed = lambda _seed, _policy, s=seed: s  # every policy: one seed
        train = [evaluate_on_test(context, p, project=False)[M.VAL_ACC] for p in hist_p]
        test = np.array([evaluate_on_test(context, p, project=False)[M.VAL_ACC] for p in new_p])
        report(f"common seed {seed}", train, test)
        common.append(test)
    diff = np.abs(common[0] - common[1]).mean() * 100
    print(f"same policies under the two common seeds: mean abs difference {diff:.2f} points, "
          f"correlation {np.corrcoef(common[0], common[1])[0, 1]:.3f}")


if __name__ == "__main__":
    main()
