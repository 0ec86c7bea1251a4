"""A fake multi-node cluster (``ray.cluster_utils.Cluster``) running real ``haqtune search``es.

The head has no trial resources (``num_cpus=0``) and two worker nodes have 2 CPUs and
one fake GPU each, as a CPU head with GPU workers would. Every node is a real raylet
on 127.0.0.1; the search is the real CLI joining with ``--address``. One cluster is
shared by every search of this module.
"""

import json

import pytest

from e2e import run_cli, runs_of

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

CONFIG = """\
num_trials: 4
max_concurrent: 2
reference: {epochs: 3, lr: 0.1, batch_size: 64}
finetune: {epochs: 1, lr: 0.01, batch_size: 64}
final_finetune: null
compare_uniform: false
"""


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    fake = Cluster(initialize_head=True, connect=False, head_node_args={"num_cpus": 0, "num_gpus": 0, "include_dashboard": False})
    workers = [fake.add_node(num_cpus=2, num_gpus=1) for _ in range(2)]
    fake.wait_for_nodes()
    try:
        yield fake.address, fake.head_node.node_id, {w.node_id for w in workers}
    finally:
        fake.shutdown()


def peak_concurrency(runs) -> int:
    """Most child runs RUNNING at one time, from their start and end times (ms)."""
    events = sorted([(r.info.start_time, 1) for r in runs] + [(r.info.end_time, -1) for r in runs],
                    key=lambda e: (e[0], e[1]))  # an end before a start at the same instant
    running = peak = 0
    for _, step in events:
        running += step
        peak = max(peak, running)
    return peak


@pytest.fixture(scope="module")
def shared_store(tmp_path_factory):
    """One MLflow store and storage directory for the module's searches (an experiment
    each): the store's schema is created once, the reference model trained once."""
    root = tmp_path_factory.mktemp("cluster-store")
    return f"sqlite:///{root / 'mlflow.db'}", root / "haqtune_runs"


def _search(tmp_path, address, store, searcher, config=""):
    uri, storage = store
    (tmp_path / "search.yaml").write_text(CONFIG + config)
    # The README's cluster command, with a test cluster's address instead of `auto`.
    proc = run_cli(["search", "search.yaml", "--searcher", searcher, "--address", address,
                    "--gpus-per-trial", 1, "--cpus-per-trial", 1, "--tracking-uri", uri,
                    "--storage-dir", storage, "--experiment", searcher], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    [search_dir] = [p for p in storage.iterdir() if p.name.startswith(searcher + "-")]
    return proc, json.loads((search_dir / "summary.json").read_text()), runs_of(uri, searcher)


def test_search_runs_on_worker_nodes_only(cluster, shared_store, tmp_path):
    address, head, workers = cluster
    proc, summary, (parents, children) = _search(tmp_path, address, shared_store, "haq", "test_top_k: 1\n")
    # Every trial is in MLflow, finished, and tagged with its node; both workers ran trials.
    assert len(parents) == 1 and len(children) == 4
    assert {c.info.status for c in children} == {"FINISHED"}
    trial_nodes = {c.data.tags["haqtune.node_id"] for c in children}
    assert trial_nodes == workers, (trial_nodes, workers)
    assert all("(" in c.data.tags["haqtune.node"] for c in children)  # "hostname (ip)"
    # The driver joined the cluster on the head; nothing heavy ran there.
    nodes = summary["nodes"]
    assert nodes["driver"]["node_id"] == head
    assert nodes["reference"]["node_id"] in workers
    assert nodes["final_evaluation"] and {n["node_id"] for n in nodes["final_evaluation"]} <= workers
    assert nodes["uniform_8bit"]["node_id"] in workers
    assert "haqtune: reference training: 3/3 epochs" in proc.stdout
    assert "haqtune: final evaluation: 1/1 checkpoints" in proc.stdout
    # A GPU was requested on machines without CUDA: the trials fell back to CPU and finished.
    # Exactly one warning line says so (once per search, not once per trial).
    fallback = [line for line in proc.stdout.splitlines()
                if line.startswith("haqtune: warning:") and "CUDA is not available" in line]
    assert len(fallback) == 1, proc.stdout
    # haq (a custom searcher) kept max_concurrent=2 trials running at once, like Optuna's.
    assert peak_concurrency(children) == 2


@pytest.mark.parametrize("searcher", ["sensitivity-dp", "aqgan"])
def test_custom_searchers_keep_max_concurrent_trials_running(cluster, shared_store, tmp_path, searcher):
    address, head, workers = cluster
    proc, _, (_, children) = _search(tmp_path, address, shared_store, searcher, "test_top_k: 0\n")
    assert len(children) == 4
    assert peak_concurrency(children) == 2
    if searcher == "sensitivity-dp":  # the oracle's evaluations ran on the workers, not the head
        line = next(x for x in proc.stdout.splitlines() if x.startswith("haqtune: sensitivity measurement ran on"))
        assert head[:8] not in line and any(w[:8] in line for w in workers)


def test_remote_sensitivity_runner_matches_in_process_evaluation(cluster):
    """The oracle's batch, split over actors on the worker nodes, gives exactly the answers
    of an in-process evaluation (deterministic whichever process evaluates a point)."""
    import ray
    import torch

    from orchestrator.config import SearchConfig
    from orchestrator.remote import RemoteSensitivityRunner
    from orchestrator.search import prepare
    from trainables import TrainSettings, TrialContext, build_model, load_dataset, train
    from trainables.sensitivity import SensitivityOracle

    address, head, workers = cluster
    prepared = prepare(SearchConfig())
    model = build_model("demo", seed=0, **prepared.model_kwargs).model
    # Briefly trained: the points' accuracies differ, so an answer given for another point shows.
    train(model, load_dataset("digits"), TrainSettings(epochs=2, lr=0.1), seed=0, device=torch.device("cpu"))
    context = TrialContext(
        model="demo", dataset="digits", model_kwargs=prepared.model_kwargs, input_size=None,
        layer_names=tuple(s.name for s in prepared.layers), reference_state=model.state_dict(),
        ref_acc=0.1, table=prepared.table, budget=None, finetune=TrainSettings(epochs=1, lr=0.01), seed=0)
    points = [(None, 8, 8), (0, 2, 8), (3, 8, 2), (5, 1, 1), (11, 4, 4), (7, 3, 8)]
    local = SensitivityOracle(context).evaluate_many(points)
    assert len(set(local)) == len(points)
    ray.init(address=address, log_to_driver=False)
    try:
        runner = RemoteSensitivityRunner(cpus=1, gpus=1, workers=2)
        remote = SensitivityOracle(context, runner=runner).evaluate_many(points)
    finally:
        ray.shutdown()
    assert remote == local
    assert {n["node_id"] for n in runner.nodes} <= workers and len(runner.nodes) == 2
