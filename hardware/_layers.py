"""Quantizable-layer extraction: ``LayerSpec`` and ``extract_layers``.

A network is traced once with a dummy input; forward hooks on every ``Conv2d``
and ``Linear`` record the shapes each layer actually sees. The order of
``LayerSpec``s is execution order, which is the order HAQ's agent walks the
network and the order of rows in a ``Policy``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

LayerKind = Literal["conv", "depthwise", "linear"]
LAYER_KINDS: tuple[str, ...] = ("conv", "depthwise", "linear")


class NoQuantizableLayersError(ValueError):
    """The model has no Conv2d or Linear layer that a policy could quantize."""


@dataclass(frozen=True, slots=True)
class LayerSpec:
    """Shape facts of one quantizable layer, for one sample (batch 1).

    A convolution is a GEMM after im2col; per group:
    ``M = out_h * out_w`` rows, ``K = (in_channels / groups) * kh * kw`` and
    ``N = out_channels / groups``. A linear layer is the same with
    ``kh = kw = 1`` and ``out_h * out_w`` the number of positions it is applied to.
    """

    name: str
    kind: LayerKind
    in_channels: int
    out_channels: int
    kernel: tuple[int, int]
    stride: tuple[int, int]
    groups: int
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    weights: int
    macs: int

    def __post_init__(self) -> None:
        if self.kind not in LAYER_KINDS:
            raise ValueError(f"kind: expected one of {LAYER_KINDS}, got {self.kind!r}")
        if self.groups < 1 or self.in_channels % self.groups or self.out_channels % self.groups:
            raise ValueError(
                f"{self.name}: groups={self.groups} must divide in_channels={self.in_channels} "
                f"and out_channels={self.out_channels}"
            )

    # GEMM view (per sample, per group), used by every cost model.
    @property
    def gemm_m(self) -> int:
        return self.out_hw[0] * self.out_hw[1]

    @property
    def gemm_k(self) -> int:
        return (self.in_channels // self.groups) * self.kernel[0] * self.kernel[1]

    @property
    def gemm_n(self) -> int:
        return self.out_channels // self.groups

    @property
    def input_elements(self) -> int:
        """Activations read per sample (the input feature map)."""
        return self.in_channels * self.in_hw[0] * self.in_hw[1]

    @property
    def output_elements(self) -> int:
        return self.out_channels * self.out_hw[0] * self.out_hw[1]


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, tuple | list) else (int(v), int(v))


def _spec_for(name: str, module, inp, out) -> LayerSpec:
    import torch.nn as nn

    if isinstance(module, nn.Conv2d):
        groups = int(module.groups)
        in_ch, out_ch = int(module.in_channels), int(module.out_channels)
        kind: LayerKind = "depthwise" if groups > 1 and groups == in_ch else "conv"
        in_hw = (int(inp.shape[-2]), int(inp.shape[-1]))
        out_hw = (int(out.shape[-2]), int(out.shape[-1]))
        kernel = _pair(module.kernel_size)
        weights = int(module.weight.numel())
        macs = out_hw[0] * out_hw[1] * out_ch * (in_ch // groups) * kernel[0] * kernel[1]
        return LayerSpec(name, kind, in_ch, out_ch, kernel, _pair(module.stride), groups,
                         in_hw, out_hw, weights, macs)
    # nn.Linear: every leading dimension but the batch is a position it is applied to.
    positions = math.prod(int(d) for d in out.shape[1:-1]) if out.dim() > 2 else 1
    in_f, out_f = int(module.in_features), int(module.out_features)
    return LayerSpec(name, "linear", in_f, out_f, (1, 1), (1, 1), 1, (positions, 1),
                     (positions, 1), int(module.weight.numel()), positions * in_f * out_f)


def extract_layers(model, x) -> list[LayerSpec]:
    """Trace ``model`` once and list its quantizable layers, in execution order.

    ``x`` is either one sample's shape ``(C, H, W)`` (traced on a zero input of
    ``(1, C, H, W)``) or an example input tensor, batched, as users pass to
    ``torchinfo``/``fvcore`` (moved to the model's device; any batch size: specs are
    per sample). Works on any ``nn.Module``; the model's train/eval mode is restored
    afterwards. A module called twice (weight sharing) is recorded once, at its first
    call, because one policy row sets its bits. A forward pass that fails on ``x``
    (say, 1-channel images into a 3-channel model) is a ``ValueError`` naming the
    input shape and torch's first error line.
    """
    import torch
    import torch.nn as nn

    if isinstance(x, torch.Tensor):
        if x.dim() < 2:
            raise ValueError(f"input: expected a batched example tensor (N, ...), got shape {list(x.shape)}")
        example, shown = x, list(x.shape)
    else:
        try:
            shape = tuple(int(d) for d in x)
        except TypeError:
            raise TypeError(
                f"input: expected a (C, H, W) shape or an example input tensor, got {type(x).__name__}"
            ) from None
        if not shape or min(shape) < 1:
            raise ValueError(f"input shape: expected positive sizes such as (3, 224, 224), got {list(shape)}")
        example, shown = None, [1, *shape]
    specs: dict[str, LayerSpec] = {}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d | nn.Linear):
            def hook(mod, args, out, _name=name):
                if _name not in specs:
                    specs[_name] = _spec_for(_name, mod, args[0], out)
            handles.append(module.register_forward_hook(hook))
    was_training = model.training
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        example = torch.zeros(shown, device=device) if example is None else example.to(device)
        model.eval()
        with torch.no_grad():
            model(example)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(
            f"model {type(model).__name__}: forward pass on an input of shape {shown} failed ({first})"
        ) from None
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    if not specs:
        raise NoQuantizableLayersError(
            f"model {type(model).__name__} has no quantizable layer: expected at least one "
            "nn.Conv2d or nn.Linear reached by forward()"
        )
    return list(specs.values())
