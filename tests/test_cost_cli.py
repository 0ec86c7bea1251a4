"""``haqtune cost`` and ``haqtune hardware`` through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from orchestrator.cost_cli import cost, hardware

DEMO_LAYERS = 12


def run(command, *args):
    return CliRunner().invoke(command, list(args))


def assert_user_error(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("haqtune: error: "), lines[0]
    assert fragment in lines[0], lines[0]
    assert "Traceback" not in result.output


def test_hardware_lists_models_with_descriptions():
    result = run(hardware)
    assert result.exit_code == 0, result.output
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert {"bismo-edge", "bismo-cloud", "bitfusion", "table"} <= set(names)
    assert all(len(line.split(maxsplit=1)) == 2 for line in result.stdout.splitlines())
    # BitFusion's natural bit widths, and the search setting that uses them, under its line.
    lines = result.stdout.splitlines()
    note = lines[names.index("bitfusion") + 1]
    assert note.split()[:4] == ["natural", "bits", "2,", "4,"]
    assert "bits: {w: [2, 4, 8], a: [2, 4, 8]}" in note
    assert lines[names.index("bismo-edge") + 1].split()[0] == "bismo-cloud"  # no note for BISMO


def test_cost_demo_text():
    result = run(cost, "--model", "demo", "--hardware", "bismo-edge", "--bits", "4/8")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "hardware bismo-edge" in out and "batch 1" in out and "total: latency" in out
    rows = [line for line in out.splitlines() if line.split()[:1] and line.split()[1:2]
            and line.split()[1] in ("conv", "depthwise", "linear")]
    assert len(rows) == DEMO_LAYERS
    assert all(line.split()[2:4] == ["4", "8"] for line in rows)


def test_cost_demo_json_shape_and_totals():
    result = run(cost, "--model", "demo", "--hardware", "bitfusion", "--bits", "4", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert {"latency_ms", "energy_mj", "size_mb", "layers"} <= set(data)
    assert data["batch"] == 16  # the hardware model's own batch
    layers = data["layers"]
    assert len(layers) == DEMO_LAYERS
    for layer in layers:
        assert {"name", "kind", "w_bits", "a_bits", "latency_ms", "energy_mj"} <= set(layer)
        assert (layer["w_bits"], layer["a_bits"]) == (4, 4)
    assert data["latency_ms"] == pytest.approx(sum(la["latency_ms"] for la in layers))
    assert data["energy_mj"] == pytest.approx(sum(la["energy_mj"] for la in layers))


def test_cost_batch_option_overrides_the_default():
    one = json.loads(run(cost, "--model", "demo", "--hardware", "bismo-cloud", "--bits", "8",
                         "--batch", "1", "--json").stdout)
    sixteen = json.loads(run(cost, "--model", "demo", "--hardware", "bismo-cloud", "--bits", "8",
                             "--json").stdout)
    assert (one["batch"], sixteen["batch"]) == (1, 16)
    assert sixteen["latency_ms"] > one["latency_ms"]


def test_cost_mobilenet_v2_has_53_layers():
    result = run(cost, "--model", "mobilenet_v2", "--input-size", "224", "--hardware", "bismo-edge",
                 "--bits", "8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert len(data["layers"]) == 53
    assert sum(la["kind"] == "depthwise" for la in data["layers"]) == 17
    assert data["layers"][-1]["kind"] == "linear"


@pytest.mark.parametrize(
    "make_content",
    [
        lambda pol: pol,
        lambda pol: {"policy": pol},
        lambda pol: {k: v for i, (w, a) in enumerate(pol) for k, v in ((f"w_{i}", w), (f"a_{i}", a))},
    ],
    ids=["list", "policy-key", "config-keys"],
)
def test_cost_policy_file_formats(tmp_path, make_content):
    policy = [[8, 8]] * DEMO_LAYERS
    policy[3] = [2, 5]
    path = tmp_path / "policy.json"
    path.write_text(json.dumps(make_content(policy)))
    result = run(cost, "--model", "demo", "--hardware", "bismo-edge", "--policy", str(path), "--json")
    assert result.exit_code == 0, result.output
    layers = json.loads(result.stdout)["layers"]
    assert [[la["w_bits"], la["a_bits"]] for la in layers] == policy


def test_cost_with_a_measured_table(tmp_path):
    latency = np.cumsum(np.full((DEMO_LAYERS, 8, 8), 1e-4), axis=2)
    np.save(tmp_path / "lat.npy", latency)
    result = run(cost, "--model", "demo", "--hardware", "table", "--table", str(tmp_path / "lat.npy"),
                 "--bits", "8", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["latency_ms"] == pytest.approx(latency[:, 7, 7].sum() * 1e3)
    assert data["energy_mj"] == 0


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--hardware", "tpu", "--bits", "8"], "unknown hardware 'tpu': choose between"),
        (["--hardware", "bismo-edge", "--bits", "9"], "bits must be in [1, 8], got 9"),
        (["--hardware", "bismo-edge", "--bits", "4/0"], "bits must be in [1, 8], got 0"),
        (["--hardware", "bismo-edge", "--bits", "4/x"], "expected W or W/A"),
        (["--hardware", "bismo-edge", "--bits", "four"], "expected W or W/A"),
        (["--hardware", "bismo-edge"], "expected exactly one of --bits"),
        (["--hardware", "bismo-edge", "--bits", "8", "--batch", "0"], "--batch: expected a positive"),
        (["--hardware", "table", "--bits", "8"], "needs --table PATH"),
        (["--hardware", "table", "--bits", "8", "--table", "missing.npy"], "file not found"),
    ],
)
def test_cost_bad_input_is_one_line_and_exit_2(args, fragment):
    assert_user_error(run(cost, "--model", "demo", *args), fragment)


def test_cost_unknown_model_is_a_user_error():
    assert_user_error(run(cost, "--model", "no_such_net", "--hardware", "bismo-edge", "--bits", "8"),
                      "unknown model 'no_such_net'")
    assert_user_error(run(cost, "--model", "nosuchmodule:net", "--hardware", "bismo-edge", "--bits", "8"),
                      "could not load")


def test_cost_table_shape_mismatch(tmp_path):
    np.save(tmp_path / "lat.npy", np.ones((3, 8, 8)))
    result = run(cost, "--model", "demo", "--hardware", "table", "--table", str(tmp_path / "lat.npy"),
                 "--bits", "8")
    assert_user_error(result, "expected 3 layers")


def test_cost_policy_file_errors(tmp_path):
    base = ["--model", "demo", "--hardware", "bismo-edge", "--policy"]
    assert_user_error(run(cost, *base, str(tmp_path / "missing.json")), "not found")
    short = tmp_path / "short.json"
    short.write_text(json.dumps([[8, 8]] * 5))
    assert_user_error(run(cost, *base, str(short)), f"expected {DEMO_LAYERS} layers")
    bad_bits = tmp_path / "bad_bits.json"
    bad_bits.write_text(json.dumps([[8, 9]] * DEMO_LAYERS))
    assert_user_error(run(cost, *base, str(bad_bits)), "bits must be in [1, 8]")
    missing_key = tmp_path / "keys.json"
    missing_key.write_text(json.dumps({"w_0": 8}))
    assert_user_error(run(cost, *base, str(missing_key)), "missing 'a_0'")
    not_json = tmp_path / "not.json"
    not_json.write_text("[[8, 8],")
    assert_user_error(run(cost, *base, str(not_json)), "not valid JSON")
    both = run(cost, *base, str(short), "--bits", "8")
    assert_user_error(both, "expected exactly one of --bits")
