"""ray_cluster.yaml is a valid Ray autoscaler config (checked offline against Ray's schema)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_ray_cluster_yaml_validates_against_ray_schema():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "ray_cluster.yaml").read_text())
    validate_config(prepare_config(config))
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["resources"]["GPU"] >= 1 and workers["max_workers"] > workers["min_workers"]
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    # MLflow on the head stays on loopback; users reach it by port-forward.
    assert any("mlflow server --host 127.0.0.1" in c for c in config["head_start_ray_commands"])
