"""Metric names, defined once. Trials report them, searchers and MLflow read them."""

VAL_ACC = "val_acc"  # fraction in [0, 1], on the validation split (the search's reward signal)
TEST_ACC = "test_acc"  # fraction in [0, 1], test split; only for the final best policies
REF_ACC = "ref_acc"  # full-precision reference model's val_acc
ACC_DROP = "acc_drop"  # ref_acc - val_acc
LATENCY_MS = "latency_ms"
ENERGY_MJ = "energy_mj"
SIZE_MB = "size_mb"
REWARD = "reward"  # HAQ's 0.1 * (val_acc - ref_acc)
EPOCH = "epoch"
POLICY = "policy"  # the projected (evaluated) policy, as "w/a w/a ..." text
NODE = "node"  # text: "hostname (ip)" of the node a trial ran on (an MLflow tag, not a metric)
NODE_ID = "node_id"  # text: its Ray node id (tells apart nodes that share an IP, e.g. a test cluster)
# summary.json key and parent-run metric prefix (``uniform_in_budget_test_acc``, ...): the
# widest uniform policy inside the budget, fine-tuned and tested like the best policies.
UNIFORM_IN_BUDGET = "uniform_in_budget"
DONE = "final"  # 1 on the final report of a trial, 0 on per-epoch reports

COST_METRICS = (LATENCY_MS, ENERGY_MJ, SIZE_MB)
FINAL_METRICS = (VAL_ACC, ACC_DROP, LATENCY_MS, ENERGY_MJ, SIZE_MB, REWARD)
