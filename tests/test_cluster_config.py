"""Cluster deployment: the cluster YAMLs validate against Ray's autoscaler schema (offline),
the autoscaler's maximum and the node shapes decide max_concurrent and what a trial may
ask for, and a cluster that cannot run a search fails fast through the real CLI."""

import copy
import re
import socket
from pathlib import Path

import pytest
import yaml

from e2e import run_cli
from orchestrator.cluster_resources import (
    ClusterView,
    NodeShape,
    check_address,
    check_trial_fits,
    node_types_from_bootstrap,
)
from orchestrator.config import fit_concurrency
from orchestrator.errors import HaqtuneError

pytestmark = pytest.mark.cluster

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAMLS = ("ray_cluster.yaml", "deploy/ray_cluster_onprem.yaml")
TORCH_PINS = ('"torch==2.14.1"', '"torchvision==0.29.1"')


def _load(name: str) -> dict:
    return yaml.safe_load((ROOT / name).read_text())


def _validate(config: dict) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


@pytest.mark.parametrize("name", CLUSTER_YAMLS)
def test_cluster_yaml_validates_against_ray_schema(name):
    config = _load(name)
    _validate(config)
    setup = " ".join(config["setup_commands"])
    # The README's torch/torchvision pair, not whatever pip resolves on the day.
    assert all(pin in setup for pin in TORCH_PINS)
    # Ray's token auth on every node (RAY_AUTH_MODE must agree cluster-wide), the token
    # shipped to every node, and the SSH user of the launcher set explicitly.
    starts = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
    assert all("RAY_AUTH_MODE=token" in c for c in starts if "ray start" in c)
    assert "export RAY_AUTH_MODE=token" in setup
    assert any(target.endswith(".ray/auth_token") for target in config["file_mounts"])
    assert config["auth"]["ssh_user"]
    # Tracking and storage URIs set explicitly for every shell (`ray exec`) on the head.
    assert "export MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in setup
    assert re.search(r"export HAQTUNE_STORAGE_DIR=\S+", setup)
    # The head takes no trial (no CPU or GPU for Ray tasks); MLflow stays on loopback with a
    # SQL store; users reach it and the dashboard by port-forward.
    head_start = " ".join(config["head_start_ray_commands"])
    assert "--num-cpus=0 --num-gpus=0" in head_start and "--dashboard-host=127.0.0.1" in head_start
    assert re.search(r"mlflow server --host 127\.0\.0\.1 .*--backend-store-uri sqlite:", head_start)


def test_aws_cluster_has_cpu_head_and_autoscaling_gpu_workers():
    config = _load("ray_cluster.yaml")
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] > workers["min_workers"] == 0
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"] == {"CPU": 0, "GPU": 0}
    assert "--artifacts-destination s3://" in " ".join(config["head_start_ray_commands"])
    # max_concurrent auto on this cluster: the autoscaler's maximum, 8 GPU workers = 8 trials.
    node_types, max_workers = node_types_from_bootstrap(config)
    view = ClusterView(running=(NodeShape("head", {"CPU": 0, "GPU": 0}),), node_types=node_types,
                       max_workers=max_workers)
    assert view.max_resources() == {"CPU": 64, "GPU": 8}
    assert fit_concurrency(view.max_resources(), cpus_per_trial=4, gpus_per_trial=1, num_trials=100) == 8


@pytest.mark.parametrize(("mutate", "message"), [
    (lambda c: c["available_node_types"]["gpu_worker"].update(resources={"GPU": "one"}),
     r"'one' is not of type 'integer'.*\['gpu_worker'\]\['resources'\]\['GPU'\]"),
    (lambda c: c["available_node_types"]["gpu_worker"].update(max_worker=3),
     r"'max_worker' was unexpected"),
    (lambda c: c.update(head_node_type="cpu_head"), r"head_node_type` must be one of `available_node_types"),
])
def test_broken_cluster_yaml_fails_with_a_clear_message(mutate, message):
    config = _load("ray_cluster.yaml")
    mutate(config)
    with pytest.raises(Exception, match=re.compile(message, re.S)):
        _validate(config)


def test_onprem_yaml_without_worker_ips_is_refused():
    config = _load("deploy/ray_cluster_onprem.yaml")
    del config["provider"]["worker_ips"]
    import click

    with pytest.raises(click.ClickException, match="supply a `head_ip` and list of `worker_ips`"):
        _validate(config)


# ---- the autoscaler's maximum and node shapes (orchestrator/cluster_resources.py) ----------

BOOTSTRAP = {
    "max_workers": 5, "head_node_type": "head",
    "available_node_types": {
        "head": {"resources": {"CPU": 4}, "max_workers": 0},
        "a100x4": {"resources": {"CPU": 32, "GPU": 4}, "min_workers": 0, "max_workers": 2},
        "t4": {"resources": {"CPU": 8, "GPU": 1}, "min_workers": 1, "max_workers": 10},
    },
}


def test_autoscaler_maximum_counts_node_types_up_to_the_global_max_workers():
    node_types, max_workers = node_types_from_bootstrap(BOOTSTRAP)
    assert {s.name: s.max_count for s in node_types} == {"head (head)": 1, "a100x4": 2, "t4": 10}
    running = (NodeShape("head", {"CPU": 4}), NodeShape("t4-1", {"CPU": 8, "GPU": 1}))
    view = ClusterView(running, node_types, max_workers)
    # 5 workers at most: 2 a100x4 (8 GPUs) + 3 t4 (3 GPUs); CPUs: head 4 + 2x32 + 3x8.
    assert view.max_resources() == {"CPU": 4 + 64 + 24, "GPU": 11}
    assert view.current_resources() == {"CPU": 12, "GPU": 1}
    assert fit_concurrency(view.max_resources(), cpus_per_trial=2, gpus_per_trial=1, num_trials=100) == 11
    # Without a global cap every type counts at its own max_workers.
    unbounded = ClusterView(running, node_types, None)
    assert unbounded.max_resources()["GPU"] == 2 * 4 + 10
    # No autoscaler: what is running now.
    assert ClusterView(running).max_resources() == {"CPU": 12, "GPU": 1}


def test_autoscaler_cluster_config_from_the_gcs_is_read_like_the_bootstrap_file():
    """The ``ClusterConfig`` an autoscaler reports to the GCS (Ray's own protobuf type)."""
    from ray.core.generated import autoscaler_pb2

    from orchestrator.cluster_resources import node_types_from_cluster_config

    proto = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 4}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 8, "GPU": 2}, max_count=3),
        autoscaler_pb2.NodeGroupConfig(name="spot", resources={"CPU": 8, "GPU": 1}, max_count=-1),
    ])
    shapes = node_types_from_cluster_config(proto)
    assert [(s.name, s.get("GPU")) for s in shapes] == [("head", 0), ("gpu", 2), ("spot", 1)]
    assert shapes[2].max_count >= 1 << 30  # -1: no limit
    view = ClusterView((NodeShape("head", {"CPU": 4}),), shapes[:2])
    assert view.max_resources() == {"CPU": 4 + 24, "GPU": 6}
    check_trial_fits(view, cpus_per_trial=8, gpus_per_trial=2)


def test_a_trial_must_fit_one_node_autoscaler_types_included():
    node_types, max_workers = node_types_from_bootstrap(BOOTSTRAP)
    running = (NodeShape("head", {"CPU": 4}),)
    view = ClusterView(running, node_types, max_workers)
    check_trial_fits(view, cpus_per_trial=32, gpus_per_trial=4)  # an a100x4 node the autoscaler adds
    with pytest.raises(HaqtuneError, match=r"gpus_per_trial: expected at most 4, .* got 8"):
        check_trial_fits(view, cpus_per_trial=1, gpus_per_trial=8)
    with pytest.raises(HaqtuneError, match=r"cpus_per_trial: expected at most 32, .* got 64"):
        check_trial_fits(view, cpus_per_trial=64, gpus_per_trial=0)
    with pytest.raises(HaqtuneError, match=r"expected a node with 16 CPU and 2 GPU together"):
        check_trial_fits(ClusterView((NodeShape("a", {"CPU": 32, "GPU": 1}), NodeShape("b", {"CPU": 8, "GPU": 2}))),
                         cpus_per_trial=16, gpus_per_trial=2)
    # A node type the autoscaler may not add (max_workers 0) does not count.
    none_allowed = ClusterView(running, (NodeShape("gpu", {"CPU": 8, "GPU": 1}, max_count=0),))
    with pytest.raises(HaqtuneError, match="gpus_per_trial"):
        check_trial_fits(none_allowed, cpus_per_trial=1, gpus_per_trial=1)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens once the socket is closed


def test_check_address_fails_fast_and_accepts_a_listening_port(monkeypatch):
    port = _closed_port()
    with pytest.raises(HaqtuneError, match=rf"--address 127\.0\.0\.1:{port}.*no Ray cluster answers"):
        check_address(f"127.0.0.1:{port}")
    with pytest.raises(HaqtuneError, match="no Ray cluster answers"):
        check_address(f"ray://127.0.0.1:{port}")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # how `auto` finds the cluster
    with pytest.raises(HaqtuneError, match="--address auto .*no Ray cluster answers"):
        check_address("auto")
    with pytest.raises(HaqtuneError, match="expected HOST:PORT"):
        check_address("ray://nohost")
    check_address(None)
    check_address("local")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        check_address(f"ray://127.0.0.1:{server.getsockname()[1]}")


# ---- through the real CLI: exit 2, one line, nothing written --------------------------------


def _assert_refused(result, tmp_path, pattern):
    assert result.returncode == 2, result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("haqtune: error: "), result.stderr
    assert re.search(pattern, lines[0]), lines[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "nothing may be written"


def test_cli_unreachable_address_exits_2_fast(tmp_path):
    port = _closed_port()
    result = run_cli(["search", "--num-trials", "1", "--address", f"127.0.0.1:{port}"], tmp_path,
                     timeout=60)
    _assert_refused(result, tmp_path, r"--address 127\.0\.0\.1:\d+ .*no Ray cluster answers there")


def test_cli_more_gpus_per_trial_than_any_node_exits_2(tmp_path):
    # The local Ray instance advertises no GPU on this machine (RAY's own detection);
    # Tune would leave such a trial pending forever.
    result = run_cli(["search", "--num-trials", "1", "--gpus-per-trial", "64"], tmp_path, timeout=120)
    _assert_refused(result, tmp_path, r"gpus_per_trial: expected at most \d+, the most GPUs one node .* got 64")


def test_amp_setting_is_validated():
    from orchestrator.config import SearchConfig

    with pytest.raises(HaqtuneError, match=r"finetune\.amp: choose between off, bf16, fp16, got 'fp8'"):
        SearchConfig.from_dict({"finetune": {"epochs": 1, "lr": 0.01, "amp": "fp8"}})
    # fp16 needs CUDA: a search whose trials cannot have a GPU is told so before it starts.
    with pytest.raises(HaqtuneError, match=r"reference\.amp: fp16 runs on GPUs only .* got fp16"):
        SearchConfig.from_dict({"reference": {"epochs": 1, "lr": 0.01, "amp": "fp16"}})
    config = SearchConfig.from_dict({"finetune": {"epochs": 1, "lr": 0.01, "amp": "fp16"}, "gpus_per_trial": 1})
    assert config.finetune.amp == "fp16" and config.reference.amp == "off"
    assert SearchConfig.from_dict({"finetune": {"epochs": 1, "lr": 0.01, "amp": "bf16"}}).finetune.amp == "bf16"


def _readme_cluster_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text.split("## Run on a cluster", 1)[1].split("\n## ", 1)[0]
    return [line.strip() for line in section.splitlines() if line.startswith("    ray ")]


def test_readme_cluster_commands_are_valid_for_this_checkout(tmp_path):
    """The README's `ray exec ... haqtune search` is a search the CLI accepts (the flags the
    fake-cluster test runs: --address, --gpus-per-trial 1); its YAML and forwarded ports exist."""
    import shlex

    from click.testing import CliRunner

    from orchestrator.cli import main

    commands = _readme_cluster_commands()
    yaml_file = _load("ray_cluster.yaml")
    assert any(c.startswith("ray up ray_cluster.yaml") for c in commands)
    assert any(c.startswith("ray down ray_cluster.yaml") for c in commands)
    search = next(c for c in commands if "haqtune search" in c)
    inner = shlex.split(shlex.split(search)[-1].split("&&", 1)[1])
    assert inner[:2] == ["haqtune", "search"] and inner[3:] == ["--address", "auto", "--gpus-per-trial", "1"]
    assert (ROOT / inner[2]).is_file()
    # The cluster sets HAQTUNE_STORAGE_DIR to a bucket; a storage URI that needs no network
    # here (prepare checks the bucket is reachable).
    result = CliRunner().invoke(main, [*inner[1:], "--dry-run"],
                                env={"HAQTUNE_STORAGE_DIR": f"file://{tmp_path}/runs"})
    assert result.exit_code == 0, result.output
    assert "resources: 4 CPU + 1 GPU per trial" in result.output and "Ray auto" in result.output
    attach = next(c for c in commands if c.startswith("ray attach"))
    head = " ".join(yaml_file["head_start_ray_commands"])
    assert "-p 5000" in attach and "--port 5000" in head and "-p 8265" in attach  # 8265: Ray's dashboard
    resume = next(c for c in commands if "haqtune resume" in c)
    assert "haqtune resume s3://YOUR-BUCKET/haqtune_runs/<search_id>" in resume
