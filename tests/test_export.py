"""Export: integer PyTorch file (bit-exact), ONNX QDQ graph (ONNX Runtime), policy report."""

import json
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto

from hardware import extract_layers, get_cost_model
from search_spaces import format_policy
from trainables import export as E
from trainables.data import load_dataset
from trainables.models import build_model
from trainables.quantize import QuantLayer, quantize_model
from trainables.training import TrainSettings, evaluate, train

MODEL_KWARGS = {"num_classes": 10, "input_size": 8, "in_channels": 1}
# Every bit width for weights and activations, 1-bit signed and unsigned activations
# (features.0 and features.4.block.0 take signed inputs), INT4 and INT8 containers.
POLICY = np.array([[8, 1], [1, 1], [2, 2], [3, 4], [4, 1], [5, 5], [6, 6], [7, 7],
                   [8, 8], [4, 3], [2, 6], [5, 2]])


@pytest.fixture(scope="module")
def setup():
    torch.set_num_threads(1)
    data = load_dataset("digits")
    built = build_model("demo", seed=0, **MODEL_KWARGS)
    # A briefly trained net: agreement on an untrained one (one class everywhere) proves nothing.
    train(built.model, data, TrainSettings(epochs=3, lr=0.05), seed=0, device=torch.device("cpu"))
    model = built.model.eval()
    layers = extract_layers(model, built.input_shape)
    calib = torch.stack([data.train[i][0] for i in range(256)])
    qmodel = quantize_model(model, [s.name for s in layers], POLICY, calib).eval()
    return data, built, layers, qmodel


def _logits(model, dataset):
    x = torch.stack([dataset[i][0] for i in range(len(dataset))])
    with torch.no_grad():
        return model(x)


def test_policy_covers_signed_and_unsigned_one_bit_activations(setup):
    _, _, layers, qmodel = setup
    grids = {(q.a_bits, q.signed) for q in qmodel.modules() if isinstance(q, QuantLayer)}
    assert {(1, True), (1, False)} <= grids


def test_torch_round_trip_is_bit_identical(setup, tmp_path):
    data, built, _, qmodel = setup
    path = tmp_path / "model.pt"
    int_model = E.save_quantized(qmodel, path, policy=POLICY, identity=E.ModelIdentity(
        "demo", MODEL_KWARGS, 0, built.input_shape), extra={"test_acc": 0.5})
    loaded = E.load_quantized(path)
    reference = _logits(qmodel, data.test)
    assert torch.equal(_logits(int_model, data.test), reference)
    assert torch.equal(_logits(loaded, data.test), reference)
    assert evaluate(loaded, data.test, device=torch.device("cpu")) == evaluate(
        qmodel, data.test, device=torch.device("cpu"))
    payload = E.read_quantized(path)
    assert payload["policy"] == format_policy(POLICY) and payload["info"] == {"test_acc": 0.5}
    for layer, (w_bits, _) in zip(payload["layers"], POLICY, strict=True):
        q = payload["state_dict"][f"{layer['name']}.weight_q"]
        assert q.dtype == torch.int8
        levels = 1 if w_bits == 1 else 2 ** (w_bits - 1) - 1
        assert int(q.abs().max()) <= levels  # inside the layer's grid, not just int8
        if w_bits == 1:
            assert set(q.unique().tolist()) <= {-1, 1}
    # No float copy of a quantized weight travels in the file.
    assert not any(k.endswith("layer.weight") for k in payload["state_dict"])


def test_load_rejects_other_files(tmp_path):
    path = tmp_path / "x.pt"
    torch.save({"format": "something"}, path)
    with pytest.raises(ValueError, match="expected a file written by haqtune export"):
        E.load_quantized(path)


@pytest.fixture(scope="module")
def onnx_export(setup):
    _, built, _, qmodel = setup
    int_model = E.to_integer_model(qmodel)
    return int_model, E.to_onnx(int_model, built.input_shape, metadata={"haqtune.trial_id": "t1"})


def test_onnx_runtime_agrees_with_torch(setup, onnx_export):
    data, *_ = setup
    int_model, model = onnx_export
    check = E.verify_onnx(int_model, model, data.test)
    assert check.num_samples == len(data.test)
    # Far from one class everywhere (an untrained net), so agreement means something.
    assert len(set(_logits(int_model, data.test).argmax(1).tolist())) >= 5
    assert check.agreement >= E.MIN_AGREEMENT and check.passed
    assert check.max_abs_logit_diff < 1e-3


def test_onnx_graph_is_qdq_with_int4_for_small_bit_widths(onnx_export):
    int_model, model = onnx_export
    inits = {t.name: t for t in model.graph.initializer}
    ops = [n.op_type for n in model.graph.node]
    assert model.opset_import[0].version >= 21
    names = [n for n, m in int_model.named_modules() if isinstance(m, E.IntegerQuantLayer)]
    nodes = {n.name: n for n in model.graph.node}
    for name, (w_bits, a_bits) in zip(names, POLICY, strict=True):
        tag = name.replace(".", "_")
        weight_dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                     and n.input[0].startswith(f"{tag}_w_q")]
        assert len(weight_dq) == 1
        w_init = inits[weight_dq[0].input[0]]
        assert w_init.data_type == (TensorProto.INT4 if w_bits <= 4 else TensorProto.INT8)
        assert {a.name: a.i for a in weight_dq[0].attribute}["axis"] == 0
        assert list(inits[weight_dq[0].input[1]].dims) == [w_init.dims[0]]  # per-axis scales
        module = int_model.get_submodule(name)
        quant = [n for n in model.graph.node if n.op_type == "QuantizeLinear"
                 and n.output[0].startswith(f"{tag}_aq")]
        if a_bits == 1 and module.signed:
            assert not quant  # sign(x) * alpha: GreaterOrEqual + Where
            continue
        assert len(quant) == 1
        zp = inits[quant[0].input[2]]
        signed = module.signed
        expected = {(True, True): TensorProto.INT4, (True, False): TensorProto.UINT4,
                    (False, True): TensorProto.INT8, (False, False): TensorProto.UINT8}
        assert zp.data_type == expected[(a_bits <= 4, signed)]
        # The range limit in front of QuantizeLinear allows exactly the 2**a grid levels.
        limiter = next(n for n in nodes.values() if n.output[0] == quant[0].input[0])
        hi = onnx.numpy_helper.to_array(inits[limiter.input[-1] if limiter.op_type == "Clip"
                                              else limiter.input[1]])
        scale = onnx.numpy_helper.to_array(inits[quant[0].input[1]])
        levels = 2 ** (a_bits - 1) - 1 if signed else 2**a_bits - 1
        assert float(hi) == pytest.approx(levels * float(scale), rel=1e-6)
    signed_binary = sum(1 for n in names if int_model.get_submodule(n).signed
                        and int_model.get_submodule(n).a_bits == 1)
    assert ops.count("QuantizeLinear") == len(names) - signed_binary
    assert ops.count("DequantizeLinear") == 2 * len(names) - signed_binary
    assert "Conv" in ops and "BatchNormalization" in ops


def test_onnx_activation_grid_has_exactly_two_pow_a_levels(setup):
    """Run the graph up to one quantized activation: only the a-bit grid's values appear."""
    import onnxruntime as ort

    data, built, _, qmodel = setup
    int_model = E.to_integer_model(qmodel)
    model = E.to_onnx(int_model, built.input_shape)
    name, module = next((n, m) for n, m in int_model.named_modules()
                        if isinstance(m, E.IntegerQuantLayer) and m.a_bits == 2 and not m.signed)
    target = next(n.output[0] for n in model.graph.node
                  if n.op_type == "DequantizeLinear" and n.output[0].startswith(name.replace(".", "_") + "_adq"))
    model.graph.output.append(onnx.helper.make_tensor_value_info(target, TensorProto.FLOAT, None))
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = torch.stack([data.test[i][0] for i in range(len(data.test))]).numpy()
    values = np.unique(session.run([target], {E.ONNX_INPUT: x})[0])
    assert 2 <= len(values) <= 4  # a subset of 0..3 * scale
    scale = float(module.alpha) / 3
    np.testing.assert_allclose(values / scale, np.round(values / scale), atol=1e-4)


def test_onnx_metadata_records_per_layer_bits(onnx_export):
    int_model, model = onnx_export
    props = {p.key: p.value for p in model.metadata_props}
    layers = json.loads(props["haqtune.layers"])
    assert [(x["w_bits"], x["a_bits"]) for x in layers] == [tuple(p) for p in POLICY.tolist()]
    assert props["haqtune.policy"] == format_policy(POLICY)
    assert props["haqtune.trial_id"] == "t1"


def test_onnx_rejects_unsupported_modules():
    class Odd(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(1, 2, 3)
            self.act = torch.nn.GELU()

        def forward(self, x):
            return self.act(self.conv(x))

    with pytest.raises(ValueError, match="unsupported module act .GELU."):
        E.to_onnx(Odd().eval(), (1, 8, 8))


def test_policy_report(setup):
    _, _, layers, _ = setup
    table = get_cost_model("bismo-edge").table(layers)
    report = E.policy_report(layers, table, POLICY)
    rows = report["layers"]
    assert [r["name"] for r in rows] == [s.name for s in layers]
    assert [r["kind"] for r in rows] == [s.kind for s in layers]
    assert "depthwise" in {r["kind"] for r in rows}
    assert [r["macs"] for r in rows] == [s.macs for s in layers]
    assert [(r["w_bits"], r["a_bits"]) for r in rows] == [tuple(p) for p in POLICY.tolist()]
    assert sum(r["latency_share"] for r in rows) == pytest.approx(1.0)
    assert sum(r["energy_share"] for r in rows) == pytest.approx(1.0)
    costs = table.evaluate(POLICY)
    assert report["total"]["latency_ms"] == pytest.approx(float(costs.latency_ms[0]), rel=1e-5)
    assert report["total"]["size_mb"] == pytest.approx(
        sum(s.weights * w / 8 / 2**20 for s, (w, _) in zip(layers, POLICY, strict=True)), rel=1e-9)
    md = E.format_policy_markdown(report, notes=["note one"])
    assert md.count("\n| ") >= len(layers) + 4 and "note one" in md and "uniform 8-bit" in md
    assert f"| 11 | `{layers[-1].name}` | linear |" in md
    with pytest.raises(ValueError, match="expected 12 layers"):
        E.policy_report(layers[:-1], table, POLICY)


# --- CLI: bad input is one line, exit 2, nothing written ------------------------------------------


@pytest.fixture
def fake_search(tmp_path):
    """A finished search's directory whose trials have no checkpoints (an older search)."""
    from orchestrator.config import SearchConfig

    search_dir = tmp_path / "runs" / "random-x"
    search_dir.mkdir(parents=True)
    SearchConfig().write_yaml(search_dir / "config.yaml")
    row = {"trial_id": "abc123", "val_acc": 0.9, "test_acc": 0.9, "policy": "8/8"}
    (search_dir / "summary.json").write_text(json.dumps({"best": [row]}))
    (search_dir / "trial_abc123").mkdir()
    return search_dir


def _cli(args):
    from click.testing import CliRunner

    from orchestrator.cli import main

    return CliRunner().invoke(main, ["export", *map(str, args)])


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*"))


@pytest.mark.parametrize(("args", "message"), [
    ([], "trial abc123 has no checkpoint"),
    (["--rank", 2], "rank 2 does not exist: .*summary.json has ranks 1..1"),
    (["--rank", 0], "rank 0 does not exist"),
    (["--trial", "nope"], "trial nope has no checkpoint"),
    (["--rank", 1, "--trial", "abc123"], "expected --rank or --trial, got both"),
])
def test_cli_bad_input(fake_search, args, message):
    before = _files(fake_search.parent)
    result = _cli([fake_search, *args])
    assert result.exit_code == 2, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("haqtune: error: ")
    assert re.search(message, lines[0]), lines[0]
    assert _files(fake_search.parent) == before  # nothing written


def test_cli_not_a_search_dir(tmp_path):
    result = _cli([tmp_path])
    assert result.exit_code == 2 and "is not a haqtune search directory" in result.output
    assert list(tmp_path.iterdir()) == []


def test_cli_storage_uri_not_a_search_dir(tmp_path):
    uri = f"file://{tmp_path}/runs/random-x"  # export from a bucket: tests/test_e2e_s3.py
    result = _cli([uri])
    assert result.exit_code == 2, result.output
    assert result.output.strip() == (f"haqtune: error: {uri!r} is not a haqtune search directory: expected "
                                     "config.yaml in it, as under s3://bucket/haqtune_runs/<search_id>/")
    assert list(tmp_path.iterdir()) == []


def test_cli_unfinished_search_needs_trial(fake_search):
    (fake_search / "summary.json").unlink()
    result = _cli([fake_search])
    assert result.exit_code == 2 and "has no summary.json" in result.output


class _OpZoo(torch.nn.Module):
    """Every op the ONNX converter maps, in one small net (quantized layers included)."""

    def __init__(self):
        super().__init__()
        nn = torch.nn
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.pool = nn.MaxPool2d(2, ceil_mode=True)
        self.left = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.Hardswish())
        self.right = nn.Sequential(nn.Conv2d(8, 4, 1), nn.SiLU(), nn.Identity())
        self.avg = nn.AvgPool2d(3, stride=1, padding=1, count_include_pad=False)
        self.gate = nn.Sequential(nn.Conv2d(12, 12, 1), nn.Hardsigmoid(), nn.Sigmoid())
        self.gap = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Sequential(nn.Dropout(0.1), nn.Linear(12, 5))

    def forward(self, x):
        x = self.pool(torch.relu(self.stem(x)))
        y = torch.cat([self.left(x), self.right(x)], 1)
        y = F.relu6(self.avg(y)) * self.gate(y) + 0.5
        return self.head(self.gap(y) + torch.flatten(F.adaptive_avg_pool2d(y, (1, 1)), 1))


def test_onnx_converter_covers_its_op_set():
    from torch.utils.data import TensorDataset

    model = _OpZoo().eval()
    generator = torch.Generator().manual_seed(3)
    x = torch.randn(64, 3, 12, 12, generator=generator)
    layers = extract_layers(model, (3, 12, 12))
    policy = [(8, 8), (4, 6), (6, 3), (3, 8), (5, 7)][: len(layers)]
    qmodel = quantize_model(model, [s.name for s in layers], policy, x[:32])
    int_model = E.to_integer_model(qmodel)
    check = E.verify_onnx(int_model, E.to_onnx(int_model, (3, 12, 12)),
                          TensorDataset(x, torch.zeros(64, dtype=torch.long)))
    # Logits, not top-1: a wrong pooling or padding attribute moves them by ~1e-2.
    assert check.agreement >= 0.95 and check.max_abs_logit_diff < 1e-4
