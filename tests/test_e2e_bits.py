"""End-to-end: a search restricted to a target's bit sets never evaluates another width."""

import csv
import io
from pathlib import Path

import pytest

from e2e import run_cli, runs_of
from search_spaces import parse_policy

pytestmark = pytest.mark.slow

CONFIG = """\
searcher: haq            # fix_first_last defaults to true for haq
num_trials: 4
bits: {w: [4, 8], a: [8]}
hardware: bismo-edge
budget: latency=0.95     # binding: the all-8/8 policy is over it
reference: {epochs: 1}     # what is checked here is bits, not accuracy
finetune: {epochs: 0}
test_top_k: 1
final_finetune: null
compare_uniform: false
"""


def test_bit_set_search_evaluates_only_allowed_widths(tmp_path):
    (tmp_path / "bits.yaml").write_text(CONFIG)
    proc = run_cli(["search", "bits.yaml"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "haqtune: bits w 8 a 8 (layers 0, 11); w 4,8 a 8 (layers 1-10) (first and last" in proc.stdout

    parents, children = runs_of(f"sqlite:///{tmp_path / 'mlflow.db'}")
    assert len(parents) == 1 and len(children) == 4
    assert parents[0].data.params["fix_first_last"] == "True"
    num_layers = int(parents[0].data.params["num_layers"])
    for child in children:  # what each trial was asked to run and what it evaluated
        params = child.data.params
        assert {params[f"w_{i}"] for i in range(num_layers)} <= {"4", "8"}
        assert {params[f"a_{i}"] for i in range(num_layers)} == {"8"}
        policy = parse_policy(params["policy"])
        assert policy[0].tolist() == policy[-1].tolist() == [8, 8]
        assert set(policy[:, 0]) <= {4, 8} and set(policy[:, 1]) == {8}

    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    path = client.download_artifacts(parents[0].info.run_id, "results.csv", str(tmp_path))
    rows = list(csv.DictReader(io.StringIO(Path(path).read_text())))
    assert len(rows) == 4
    for row in rows:
        policy = parse_policy(row["policy"])
        assert set(policy[:, 0]) <= {4, 8} and set(policy[:, 1]) == {8}
