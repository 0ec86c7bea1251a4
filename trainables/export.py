"""Export a quantized model: integer PyTorch file, ONNX QDQ graph, verification, policy report.

The input is what ``quantize_model`` returns (``QuantLayer`` wrappers with calibrated
activation clipping values and per-channel weight clip ratios), typically after a
trial's fine-tune. Everything here is independent of how that model was stored.

- ``to_integer_model``: the same network with every ``QuantLayer`` replaced by an
  ``IntegerQuantLayer`` holding int8-container weights (values inside the layer's
  ``w_bits`` grid), per-output-channel float32 scales and the activation clip range.
  Its logits are bit-identical to the fake-quantized model's.
- ``save_quantized`` / ``load_quantized``: one ``torch.save`` file (weights-only
  loadable) with the integer model's state, the policy, the per-layer grids and the
  model's identity (``build_model`` name and keywords), from which it is rebuilt.
- ``to_onnx``: a standard QDQ graph built node by node with ``onnx.helper`` from a
  ``torch.fx`` trace (explicit and small; torch's exporters cannot emit per-layer
  INT4 QDQ): weights as INT4 (<= 4 bits) or INT8 initializers with per-axis
  ``DequantizeLinear``; each quantized layer's input goes through ``Clip`` (so only
  the ``2**a`` levels of an a-bit grid are reachable; ``Max`` -> ``Min`` for 4-bit
  types, see ``_quant_layer_nodes``) -> ``QuantizeLinear`` -> ``DequantizeLinear``
  with UINT4/INT4 (<= 4 bits) or UINT8/INT8 types. 1-bit signed activations
  (``sign(x) * alpha``, no integer zero point fits) are ``GreaterOrEqual`` + ``Where``.
- ``verify_onnx``: ONNX Runtime vs the PyTorch module on a dataset.
- ``policy_report`` / ``format_policy_markdown``: per-layer kind, MACs, bits, cost shares, size.
"""

from __future__ import annotations

import json
import operator
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import fx, nn

from hardware import CostTable, LayerSpec
from search_spaces import format_policy
from search_spaces import metrics as M

from .models import build_model
from .quantize import (
    QuantLayer,
    activation_levels,
    quantize_activation,
    weight_scale,
)
from .training import atomic_torch_save

EXPORT_FORMAT = "haqtune.integer-model"  # not a trial checkpoint (haqtune.quantized/1: float weights)
EXPORT_VERSION = 1
ONNX_OPSET = 21  # the first opset with INT4/UINT4 QuantizeLinear/DequantizeLinear
ONNX_IR_VERSION = 10  # INT4/UINT4 tensor types
ONNX_INPUT, ONNX_OUTPUT = "input", "logits"
INT4_MAX_BITS = 4  # grids of at most 4 bits fit INT4 (-8..7) / UINT4 (0..15)
MIN_AGREEMENT = 0.995  # export fails below this ONNX Runtime vs PyTorch top-1 agreement


class IntegerQuantLayer(nn.Module):
    """Inference form of a ``QuantLayer``: integer weights + scales, activation clip range.

    ``weight_q`` is int8 (a container: its values lie in the ``w_bits`` grid, ``-1/+1``
    for 1 bit, ``-q..q`` otherwise); ``weight_scale[c]`` turns channel ``c``'s integers
    into weights. ``alpha`` is the activation clipping value, ``signed`` picks the grid.
    """

    def __init__(self, layer: nn.Conv2d | nn.Linear, *, w_bits: int, a_bits: int, signed: bool) -> None:
        super().__init__()
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        if isinstance(layer, nn.Conv2d) and isinstance(layer.padding, str):
            raise ValueError(f"expected integer conv padding, got padding={layer.padding!r}")
        self.w_bits, self.a_bits, self.signed = int(w_bits), int(a_bits), bool(signed)
        self.is_conv = isinstance(layer, nn.Conv2d)
        if self.is_conv:
            self.stride, self.padding = tuple(layer.stride), tuple(layer.padding)
            self.dilation, self.groups = tuple(layer.dilation), int(layer.groups)
        weight = layer.weight.detach()
        self.register_buffer("weight_q", torch.zeros(weight.shape, dtype=torch.int8, device=weight.device))
        self.register_buffer("weight_scale", torch.ones(weight.shape[0], device=weight.device))
        self.register_buffer("alpha", torch.ones((), device=weight.device))
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone())

    @classmethod
    def from_quant_layer(cls, qlayer: QuantLayer) -> IntegerQuantLayer:
        """The integer form of a calibrated ``QuantLayer``; raises if it would not be exact."""
        layer, options = qlayer.layer, qlayer.options
        if options.weight_quantizer != "linear" or not options.quantize_activations:
            # A k-means codebook is not an integer grid, and weight-only models keep float inputs.
            raise ValueError(
                "export: expected a linear grid with quantized activations (weight_quantizer: linear, "
                f"quantize: weights+activations), got weight_quantizer: {options.weight_quantizer}, "
                f"quantize: {options.quantize}")
        out = cls(layer, w_bits=qlayer.w_bits, a_bits=qlayer.a_bits, signed=qlayer.signed)
        with torch.no_grad():
            w = layer.weight.detach()
            scale = weight_scale(w, qlayer.w_bits, qlayer.w_clip, options.weight_granularity)
            fake = qlayer_weight(qlayer)
            view = scale.view(-1, *([1] * (w.dim() - 1)))
            q = torch.round(fake / view)
            out.weight_q.copy_(q.to(torch.int8))
            out.weight_scale.copy_(scale)
            out.alpha.copy_(qlayer.alpha)
        if not torch.equal(out.dequantized_weight(), fake):
            raise RuntimeError(f"integer weights of a {qlayer.w_bits}-bit layer do not reproduce its "
                               "fake-quantized weights exactly")
        return out

    def dequantized_weight(self) -> torch.Tensor:
        return self.weight_q.float() * self.weight_scale.view(-1, *([1] * (self.weight_q.dim() - 1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xq = quantize_activation(x, self.a_bits, self.alpha, self.signed)
        w = self.dequantized_weight()
        if not self.is_conv:
            return F.linear(xq, w, self.bias)
        return F.conv2d(xq, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        kind = "conv" if self.is_conv else "linear"
        return f"{kind}, w_bits={self.w_bits}, a_bits={self.a_bits}, signed={self.signed}"


def qlayer_weight(qlayer: QuantLayer) -> torch.Tensor:
    """The fake-quantized weight a ``QuantLayer`` computes with (no gradient)."""
    with torch.no_grad():
        return qlayer.quantized_weight()


def quant_layer_names(model: nn.Module, cls=QuantLayer) -> list[str]:
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def to_integer_model(qmodel: nn.Module) -> nn.Module:
    """A copy of ``qmodel`` (from ``quantize_model``) in eval mode with integer layers."""
    import copy

    names = quant_layer_names(qmodel)
    if not names:
        raise ValueError("expected a model from quantize_model (with QuantLayer wrappers), got none")
    model = copy.deepcopy(qmodel).eval()
    for name in names:
        _set_submodule(model, name, IntegerQuantLayer.from_quant_layer(model.get_submodule(name)))
    return model


# --- the PyTorch file ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelIdentity:
    """Enough to rebuild the float architecture: ``build_model(name, seed=seed, **kwargs)``."""

    name: str
    kwargs: dict
    seed: int = 0
    input_shape: tuple[int, int, int] | None = None


def save_quantized(qmodel: nn.Module, path: str | Path, *, identity: ModelIdentity,
                   policy, extra: dict | None = None) -> nn.Module:
    """Write the integer form of ``qmodel`` to ``path`` (atomic); returns that integer model.

    ``extra`` (JSON-able: metrics, hardware, search id) travels in the file's ``info``.
    """
    int_model = to_integer_model(qmodel)
    names = quant_layer_names(int_model, IntegerQuantLayer)
    policy = np.asarray(policy, dtype=np.int64)
    layers = []
    for name, (w_bits, a_bits) in zip(names, policy.tolist(), strict=True):
        m = int_model.get_submodule(name)
        if (m.w_bits, m.a_bits) != (w_bits, a_bits):
            raise ValueError(f"{name}: policy says w{w_bits}/a{a_bits}, the model has "
                             f"w{m.w_bits}/a{m.a_bits}")
        layers.append({"name": name, "w_bits": m.w_bits, "a_bits": m.a_bits, "signed": m.signed})
    payload = {
        "format": EXPORT_FORMAT, "version": EXPORT_VERSION,
        "model": {"name": identity.name, "kwargs": dict(identity.kwargs), "seed": int(identity.seed),
                  "input_shape": list(identity.input_shape) if identity.input_shape else None},
        "policy": format_policy(policy), "layers": layers,
        "state_dict": {k: v.detach().cpu() for k, v in int_model.state_dict().items()},
        "info": json.loads(json.dumps(extra or {})),
    }
    atomic_torch_save(payload, Path(path))
    make_readable(Path(path))
    return int_model


def make_readable(path: Path) -> None:
    """A deployable file gets the umask's permissions, not the temp file's private 0600."""
    import os

    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def read_quantized(path: str | Path) -> dict:
    """The payload of a ``save_quantized`` file (weights-only load), checked."""
    payload = torch.load(Path(path), map_location="cpu", weights_only=True)
    if not isinstance(payload, dict) or payload.get("format") != EXPORT_FORMAT:
        got = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise ValueError(f"{str(path)!r}: expected a file written by haqtune export (format "
                         f"{EXPORT_FORMAT!r}), got {got!r}")
    if payload.get("version") != EXPORT_VERSION:
        raise ValueError(f"{str(path)!r}: expected format version {EXPORT_VERSION}, "
                         f"got {payload.get('version')}")
    return payload


def load_quantized(path: str | Path, *, map_location: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the integer model saved by ``save_quantized`` (eval mode).

    The architecture comes from ``build_model`` (a ``module:callable`` model must be
    importable); its float layers are replaced by ``IntegerQuantLayer`` shells and the
    saved state is loaded strictly, so nothing is silently left at its initial value.
    """
    payload = read_quantized(path)
    ident = payload["model"]
    model = build_model(ident["name"], seed=ident["seed"], **ident["kwargs"]).model
    for layer in payload["layers"]:
        shell = IntegerQuantLayer(model.get_submodule(layer["name"]), w_bits=layer["w_bits"],
                                  a_bits=layer["a_bits"], signed=layer["signed"])
        _set_submodule(model, layer["name"], shell)
    model.load_state_dict(payload["state_dict"], strict=True)
    return model.to(map_location).eval()


# --- ONNX QDQ graph ------------------------------------------------------------------------------


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, IntegerQuantLayer) or super().is_leaf_module(m, qualname)


def _int_type(bits: int, signed: bool) -> int:
    from onnx import TensorProto

    if bits <= INT4_MAX_BITS:
        return TensorProto.INT4 if signed else TensorProto.UINT4
    return TensorProto.INT8 if signed else TensorProto.UINT8


class _OnnxBuilder:
    """Accumulates nodes and initializers; one method per kind of torch node."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.initializers: list = []
        self._count = 0

    def fresh(self, hint: str) -> str:
        self._count += 1
        return f"{hint}_{self._count}"

    def const(self, hint: str, array, dtype: int | None = None) -> str:
        from onnx import helper, numpy_helper

        name, arr = self.fresh(hint), np.asarray(array)
        if dtype is None:  # keep numpy's dtype (float32 everywhere here)
            self.initializers.append(numpy_helper.from_array(arr, name))
        else:  # INT4/UINT4 have no numpy dtype: make_tensor packs them
            self.initializers.append(helper.make_tensor(name, dtype, list(arr.shape), arr.reshape(-1).tolist()))
        return name

    def node(self, op: str, inputs: Sequence[str], hint: str, **attrs) -> str:
        from onnx import helper

        out = self.fresh(hint)
        self.nodes.append(helper.make_node(op, list(inputs), [out], name=f"{op}_{out}", **attrs))
        return out


def _quant_layer_nodes(b: _OnnxBuilder, m: IntegerQuantLayer, x: str, name: str) -> str:
    """Activation Clip -> QuantizeLinear -> DequantizeLinear, weight DequantizeLinear, Conv/MatMul."""
    alpha = np.float32(m.alpha.item())
    tag = name.replace(".", "_")
    if m.signed and m.a_bits == 1:
        # sign(x) * alpha is not a linear grid with an integer zero point: x >= 0 picks +alpha.
        pos = b.node("GreaterOrEqual", [x, b.const(f"{tag}_zero", np.float32(0))], f"{tag}_ge")
        xq = b.node("Where", [pos, b.const(f"{tag}_alpha", alpha), b.const(f"{tag}_nalpha", -alpha)],
                    f"{tag}_xq")
    else:
        lo, hi = activation_levels(m.a_bits, m.signed)
        # The same float32 scale torch's fake quantization uses (alpha / hi).
        scale = (m.alpha.detach().cpu().reshape(1).float() / hi).numpy()[0]
        qtype = _int_type(m.a_bits, m.signed)
        s_name = b.const(f"{tag}_a_scale", np.float32(scale))
        zp_name = b.const(f"{tag}_a_zp", np.zeros((), dtype=np.int64), qtype)
        a_min = b.const(f"{tag}_a_min", np.float32(lo) * np.float32(scale))
        a_max = b.const(f"{tag}_a_max", np.float32(hi) * np.float32(scale))
        if m.a_bits <= INT4_MAX_BITS:
            # Same range limit as Clip, spelled Max -> Min: ONNX Runtime's Clip+QuantizeLinear
            # fusion throws on 4-bit zero points (checked with onnxruntime 1.32).
            clipped = b.node("Min", [b.node("Max", [x, a_min], f"{tag}_max"), a_max], f"{tag}_clip")
        else:
            clipped = b.node("Clip", [x, a_min, a_max], f"{tag}_clip")
        q = b.node("QuantizeLinear", [clipped, s_name, zp_name], f"{tag}_aq")
        xq = b.node("DequantizeLinear", [q, s_name, zp_name], f"{tag}_adq")
    w_type = _int_type(m.w_bits, True)
    w_q = b.const(f"{tag}_w_q", m.weight_q.cpu().numpy().astype(np.int64), w_type)
    w_scale = b.const(f"{tag}_w_scale", m.weight_scale.cpu().numpy().astype(np.float32))
    w_zp = b.const(f"{tag}_w_zp", np.zeros(m.weight_q.shape[0], dtype=np.int64), w_type)
    w = b.node("DequantizeLinear", [w_q, w_scale, w_zp], f"{tag}_w", axis=0)
    bias = [] if m.bias is None else [b.const(f"{tag}_b", m.bias.detach().cpu().numpy())]
    if m.is_conv:
        pads = [*m.padding, *m.padding]
        return b.node("Conv", [xq, w, *bias], tag, strides=list(m.stride), pads=pads,
                      dilations=list(m.dilation), group=m.groups,
                      kernel_shape=list(m.weight_q.shape[2:]))
    wt = b.node("Transpose", [w], f"{tag}_wt", perm=[1, 0])
    y = b.node("MatMul", [xq, wt], f"{tag}_mm")
    return b.node("Add", [y, bias[0]], tag) if bias else y


def _float_layer_nodes(b: _OnnxBuilder, m: nn.Module, x: str, tag: str) -> str:
    w = b.const(f"{tag}_w", m.weight.detach().cpu().numpy())
    bias = [] if m.bias is None else [b.const(f"{tag}_b", m.bias.detach().cpu().numpy())]
    if isinstance(m, nn.Conv2d):
        if isinstance(m.padding, str):
            raise ValueError(f"{tag}: expected integer conv padding, got {m.padding!r}")
        return b.node("Conv", [x, w, *bias], tag, strides=list(m.stride), pads=[*m.padding, *m.padding],
                      dilations=list(m.dilation), group=m.groups, kernel_shape=list(m.kernel_size))
    y = b.node("MatMul", [x, b.const(f"{tag}_wt", m.weight.detach().cpu().numpy().T)], f"{tag}_mm")
    return b.node("Add", [y, bias[0]], tag) if bias else y


def _pool_args(v, n: int = 2) -> list[int]:
    return list(v) if isinstance(v, tuple | list) else [int(v)] * n


def _is_global_pool(size) -> bool:
    return size in (1, (1, 1), [1, 1])


def _module_nodes(b: _OnnxBuilder, m: nn.Module, x: str, tag: str) -> str:
    if isinstance(m, IntegerQuantLayer):
        return _quant_layer_nodes(b, m, x, tag)
    if isinstance(m, nn.Conv2d | nn.Linear):
        return _float_layer_nodes(b, m, x, tag)
    if isinstance(m, nn.BatchNorm2d):
        if m.running_mean is None:
            raise ValueError(f"{tag}: expected BatchNorm with running statistics")
        gamma = m.weight.detach() if m.weight is not None else torch.ones(m.num_features)
        beta = m.bias.detach() if m.bias is not None else torch.zeros(m.num_features)
        arrays = [t.detach().cpu().float().numpy() for t in (gamma, beta, m.running_mean, m.running_var)]
        return b.node("BatchNormalization", [x, *(b.const(f"{tag}_{k}", a) for k, a in
                                                  zip(("g", "b", "m", "v"), arrays, strict=True))],
                      tag, epsilon=float(m.eps))
    if isinstance(m, nn.ReLU):
        return b.node("Relu", [x], tag)
    if isinstance(m, nn.Hardtanh):  # ReLU6 is Hardtanh(0, 6)
        return b.node("Clip", [x, b.const(f"{tag}_min", np.float32(m.min_val)),
                               b.const(f"{tag}_max", np.float32(m.max_val))], tag)
    if isinstance(m, nn.Sigmoid):
        return b.node("Sigmoid", [x], tag)
    if isinstance(m, nn.Hardsigmoid):
        return b.node("HardSigmoid", [x], tag, alpha=1.0 / 6.0, beta=0.5)
    if isinstance(m, nn.Hardswish):
        return b.node("HardSwish", [x], tag)
    if isinstance(m, nn.SiLU):
        return b.node("Mul", [x, b.node("Sigmoid", [x], f"{tag}_sig")], tag)
    if isinstance(m, nn.Identity | nn.Dropout):
        return x  # eval mode
    if isinstance(m, nn.AdaptiveAvgPool2d) and _is_global_pool(m.output_size):
        return b.node("GlobalAveragePool", [x], tag)
    if isinstance(m, nn.MaxPool2d) and not m.return_indices:
        pad = _pool_args(m.padding)
        return b.node("MaxPool", [x], tag, kernel_shape=_pool_args(m.kernel_size),
                      strides=_pool_args(m.stride), pads=pad + pad, dilations=_pool_args(m.dilation),
                      ceil_mode=int(m.ceil_mode))
    if isinstance(m, nn.AvgPool2d) and m.divisor_override is None:
        pad = _pool_args(m.padding)
        return b.node("AveragePool", [x], tag, kernel_shape=_pool_args(m.kernel_size),
                      strides=_pool_args(m.stride), pads=pad + pad, ceil_mode=int(m.ceil_mode),
                      count_include_pad=int(m.count_include_pad))
    if isinstance(m, nn.Flatten) and m.end_dim == -1 and m.start_dim == 1:
        return b.node("Flatten", [x], tag, axis=1)
    raise ValueError(f"ONNX export: unsupported module {tag} ({type(m).__name__}); supported: conv, linear, "
                     "batchnorm, relu/relu6/hardtanh, sigmoid, hardsigmoid, hardswish, silu, dropout, "
                     "identity, max/avg/global-average pooling, flatten, add, mul, cat")


def _arg(b: _OnnxBuilder, env: dict, a, tag: str) -> str:
    if isinstance(a, fx.Node):
        return env[a.name]
    if isinstance(a, int | float):
        return b.const(f"{tag}_c", np.float32(a))
    raise ValueError(f"ONNX export: unsupported argument {a!r} in {tag}")


def _function_nodes(b: _OnnxBuilder, node: fx.Node, env: dict) -> str:
    fn, args, kwargs, tag = node.target, node.args, node.kwargs, node.name
    if fn in (operator.add, torch.add) and not kwargs:
        return b.node("Add", [_arg(b, env, a, tag) for a in args], tag)
    if fn in (operator.mul, torch.mul) and not kwargs:
        return b.node("Mul", [_arg(b, env, a, tag) for a in args], tag)
    if fn is torch.flatten:
        start = args[1] if len(args) > 1 else kwargs.get("start_dim", 0)
        end = args[2] if len(args) > 2 else kwargs.get("end_dim", -1)
        if start == 1 and end == -1:
            return b.node("Flatten", [env[args[0].name]], tag, axis=1)
    if fn in (F.relu, torch.relu):
        return b.node("Relu", [env[args[0].name]], tag)
    if fn is F.relu6:
        return b.node("Clip", [env[args[0].name], b.const(f"{tag}_min", np.float32(0)),
                               b.const(f"{tag}_max", np.float32(6))], tag)
    if fn is F.adaptive_avg_pool2d:
        size = args[1] if len(args) > 1 else kwargs.get("output_size")
        if _is_global_pool(size):
            return b.node("GlobalAveragePool", [env[args[0].name]], tag)
    if fn is F.dropout:
        return env[args[0].name]
    if fn is torch.cat:
        dim = args[1] if len(args) > 1 else kwargs.get("dim", 0)
        return b.node("Concat", [env[a.name] for a in args[0]], tag, axis=int(dim))
    raise ValueError(f"ONNX export: unsupported function {getattr(fn, '__name__', fn)} at {tag}")


def _method_nodes(b: _OnnxBuilder, node: fx.Node, env: dict) -> str:
    args, tag = node.args, node.name
    if node.target == "flatten":
        start = args[1] if len(args) > 1 else node.kwargs.get("start_dim", 0)
        if start == 1 and node.kwargs.get("end_dim", -1) == -1 and len(args) <= 2:
            return b.node("Flatten", [env[args[0].name]], tag, axis=1)
    if node.target in ("relu", "relu_"):
        return b.node("Relu", [env[args[0].name]], tag)
    if node.target in ("add", "add_", "mul", "mul_") and not node.kwargs:
        op = "Add" if node.target.startswith("add") else "Mul"
        return b.node(op, [_arg(b, env, a, tag) for a in args], tag)
    raise ValueError(f"ONNX export: unsupported tensor method .{node.target}() at {tag}")


def to_onnx(int_model: nn.Module, input_shape: Sequence[int], *, metadata: dict[str, str] | None = None):
    """The integer model as an ``onnx.ModelProto`` QDQ graph (checked), batch dimension dynamic.

    ``metadata`` goes into ``metadata_props`` next to the per-layer bit widths
    (``haqtune.layers``: JSON list of name / w_bits / a_bits / signed, ``haqtune.policy``).
    """
    import onnx
    from onnx import TensorProto, helper

    int_model = int_model.cpu().eval()
    graph = fx.GraphModule(int_model, _Tracer().trace(int_model))
    b = _OnnxBuilder()
    env: dict[str, str] = {}
    output = None
    for node in graph.graph.nodes:
        if node.op == "placeholder":
            if env:
                raise ValueError("ONNX export: expected a model with one input tensor")
            env[node.name] = ONNX_INPUT
        elif node.op == "call_module":
            env[node.name] = _module_nodes(b, graph.get_submodule(node.target), env[node.args[0].name],
                                           node.target.replace(".", "_"))
        elif node.op == "call_function":
            env[node.name] = _function_nodes(b, node, env)
        elif node.op == "call_method":
            env[node.name] = _method_nodes(b, node, env)
        elif node.op == "output":
            if not isinstance(node.args[0], fx.Node):
                raise ValueError("ONNX export: expected a model returning one tensor")
            output = env[node.args[0].name]
        else:
            raise ValueError(f"ONNX export: unsupported graph node {node.op} {node.target}")
    b.nodes.append(helper.make_node("Identity", [output], [ONNX_OUTPUT], name="output"))
    inp = helper.make_tensor_value_info(ONNX_INPUT, TensorProto.FLOAT, ["batch", *map(int, input_shape)])
    with torch.no_grad():
        out_shape = int_model(torch.zeros(1, *map(int, input_shape))).shape[1:]
    out = helper.make_tensor_value_info(ONNX_OUTPUT, TensorProto.FLOAT, ["batch", *out_shape])
    model = helper.make_model(
        helper.make_graph(b.nodes, "haqtune_qdq", [inp], [out], b.initializers),
        opset_imports=[helper.make_opsetid("", ONNX_OPSET)], producer_name="haqtune")
    model.ir_version = ONNX_IR_VERSION
    layers = [{"name": n, "w_bits": m.w_bits, "a_bits": m.a_bits, "signed": m.signed}
              for n, m in int_model.named_modules() if isinstance(m, IntegerQuantLayer)]
    props = {"haqtune.layers": json.dumps(layers),
             "haqtune.policy": " ".join(f"{x['w_bits']}/{x['a_bits']}" for x in layers),
             **(metadata or {})}
    helper.set_model_props(model, props)
    onnx.checker.check_model(model, full_check=True)
    return model


def save_onnx(model, path: str | Path) -> None:
    """Write an ONNX model atomically."""
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    make_readable(path)


# --- verification ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Verification:
    """ONNX Runtime vs PyTorch on ``num_samples`` inputs."""

    num_samples: int
    agreement: float  # fraction of inputs with the same top-1 class
    max_abs_logit_diff: float
    torch_acc: float  # top-1 accuracy of each on the labels
    onnx_acc: float

    @property
    def passed(self) -> bool:
        return self.agreement >= MIN_AGREEMENT


def onnx_session(model_or_path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    source = model_or_path.SerializeToString() if hasattr(model_or_path, "SerializeToString") \
        else str(model_or_path)
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


@torch.no_grad()
def verify_onnx(int_model: nn.Module, onnx_model, dataset, *, batch_size: int = 512) -> Verification:
    """Run both on every sample of ``dataset``: top-1 agreement, max |logit difference|, accuracies."""
    from .data import batches

    session = onnx_session(onnx_model)
    int_model = int_model.cpu().eval()
    agree = correct_t = correct_o = total = 0
    max_diff = 0.0
    for x, y in batches(dataset, batch_size, device=torch.device("cpu")):
        logits_t = int_model(x)
        logits_o = torch.from_numpy(session.run([ONNX_OUTPUT], {ONNX_INPUT: x.numpy()})[0])
        pred_t, pred_o = logits_t.argmax(1), logits_o.argmax(1)
        agree += int((pred_t == pred_o).sum())
        correct_t += int((pred_t == y).sum())
        correct_o += int((pred_o == y).sum())
        total += int(y.numel())
        max_diff = max(max_diff, float((logits_t - logits_o).abs().max()))
    if total == 0:
        raise ValueError("verification: expected a non-empty dataset, got 0 samples")
    return Verification(total, agree / total, max_diff, correct_t / total, correct_o / total)


# --- policy report ---------------------------------------------------------------------------------


def policy_report(layers: Sequence[LayerSpec], table: CostTable, policy) -> dict:
    """Per-layer kind, MACs, weights, bits, latency/energy (and their share), size; totals.

    Costs come from the search's ``CostTable`` (the same numbers the search reported).
    """
    policy = np.asarray(policy, dtype=np.int64)
    if len(layers) != table.num_layers or policy.shape != (table.num_layers, 2):
        raise ValueError(f"policy report: expected {table.num_layers} layers and a policy of shape "
                         f"[{table.num_layers}, 2], got {len(layers)} layers and {list(policy.shape)}")
    latency, energy, size = table.layer_costs(policy)
    lat8, en8, size8 = table.layer_costs(table.uniform(8))
    total = {M.LATENCY_MS: float(latency.sum()), M.ENERGY_MJ: float(energy.sum()),
             M.SIZE_MB: float(size.sum())}
    uniform8 = {M.LATENCY_MS: float(lat8.sum()), M.ENERGY_MJ: float(en8.sum()), M.SIZE_MB: float(size8.sum())}
    rows = []
    for i, spec in enumerate(layers):
        rows.append({
            "name": spec.name, "kind": spec.kind, "macs": int(spec.macs), "weights": int(spec.weights),
            "w_bits": int(policy[i, 0]), "a_bits": int(policy[i, 1]),
            M.LATENCY_MS: float(latency[i]), M.ENERGY_MJ: float(energy[i]), M.SIZE_MB: float(size[i]),
            "latency_share": float(latency[i] / total[M.LATENCY_MS]) if total[M.LATENCY_MS] > 0 else 0.0,
            "energy_share": float(energy[i] / total[M.ENERGY_MJ]) if total[M.ENERGY_MJ] > 0 else 0.0,
        })
    return {"hardware": table.hardware, "batch": int(table.batch), "policy": format_policy(policy),
            "total": total, "uniform_8bit": uniform8, "layers": rows}


def format_policy_markdown(report: dict, *, title: str = "Quantization policy",
                           notes: Sequence[str] = ()) -> str:
    """``policy.md``: one table row per layer plus totals vs uniform 8-bit."""
    total, ref = report["total"], report["uniform_8bit"]
    lines = [f"# {title}", "", f"Hardware `{report['hardware']}` (batch {report['batch']}); "
             f"policy (w/a per layer): `{report['policy']}`", ""]
    lines += [f"- {n}" for n in notes]
    if notes:
        lines.append("")
    lines += ["| # | layer | kind | MACs | weights | w bits | a bits | latency_ms | latency share "
              "| energy_mj | energy share | size_mb |",
              "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for i, r in enumerate(report["layers"]):
        lines.append(f"| {i} | `{r['name']}` | {r['kind']} | {r['macs']:,} | {r['weights']:,} | {r['w_bits']} "
                     f"| {r['a_bits']} | {r[M.LATENCY_MS]:.4g} | {r['latency_share']:.1%} "
                     f"| {r[M.ENERGY_MJ]:.4g} | {r['energy_share']:.1%} | {r[M.SIZE_MB]:.4g} |")
    lines += ["", "| | latency_ms | energy_mj | size_mb |", "|---|---:|---:|---:|",
              f"| this policy | {total[M.LATENCY_MS]:.4g} | {total[M.ENERGY_MJ]:.4g} | {total[M.SIZE_MB]:.4g} |",
              f"| uniform 8-bit | {ref[M.LATENCY_MS]:.4g} | {ref[M.ENERGY_MJ]:.4g} | {ref[M.SIZE_MB]:.4g} |"]
    ratio = " / ".join(f"{ref[k] / total[k]:.2f}x" if total[k] > 0 else "-" for k in M.COST_METRICS)
    lines += ["", f"Reduction vs uniform 8-bit (latency / energy / size): {ratio}", ""]
    return "\n".join(lines)
