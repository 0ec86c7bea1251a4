"""Models by name: the embedded demo net, torchvision classifiers, or ``module:callable``.

Every model is built without pretrained weights: haqtune never downloads weights
at run time; a user who wants them builds the model in their own callable.
"""

from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass

import torch
from torch import nn

DEMO = "demo"
DEMO_INPUT_SHAPE = (1, 8, 8)  # scikit-learn digits: 1 x 8 x 8 gray images
TORCHVISION_INPUT_SIZE = 224


class UnknownModelError(ValueError):
    pass


class InvertedResidual(nn.Module):
    """MobileNetV2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection (+ skip)."""

    def __init__(self, in_ch: int, out_ch: int, *, stride: int, expand: int) -> None:
        super().__init__()
        hidden = in_ch * expand
        self.use_skip = stride == 1 and in_ch == out_ch
        self.block = nn.Sequential(
            nn.Conv2d(in_ch, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, hidden, 3, stride=stride, padding=1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(inplace=True),
            nn.Conv2d(hidden, out_ch, 1, bias=False), nn.BatchNorm2d(out_ch),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.block(x)
        return x + out if self.use_skip else out


class DemoNet(nn.Module):
    """A small MobileNetV2-style net for 8x8 inputs: 12 quantizable layers.

    Conv stem, three inverted-residual blocks (pointwise, depthwise, pointwise),
    a 1x1 head conv and a linear classifier: every layer kind the simulators
    price differently, small enough to fine-tune in a second on a CPU.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1) -> None:
        super().__init__()
        self.input_shape = (in_channels, 8, 8)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(inplace=True),
            InvertedResidual(16, 16, stride=1, expand=2),
            InvertedResidual(16, 24, stride=2, expand=4),
            InvertedResidual(24, 24, stride=1, expand=4),
            nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6(inplace=True),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


@dataclass
class BuiltModel:
    model: nn.Module
    input_shape: tuple[int, int, int]  # (channels, height, width) of one sample


def _call_with_supported(fn, **kwargs):
    """Call ``fn`` with those of ``kwargs`` its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return fn()
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return fn(**kwargs)
    return fn(**{k: v for k, v in kwargs.items() if k in params})


def build_model(name: str, *, seed: int = 0, **kwargs) -> BuiltModel:
    """Build a model by name; its initialization is seeded without touching global RNG state.

    - ``demo``: ``DemoNet`` on 1x8x8 digits;
    - a torchvision classifier name (``mobilenet_v2``, ``resnet18``, ...), weights=None,
      3 x ``input_size`` x ``input_size`` (default 224);
    - ``module:callable``: called with ``num_classes`` if it accepts it; the input
      shape is the model's ``input_shape`` attribute if it has one, else
      ``in_channels`` (default 3) x ``input_size`` (default 224).
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build(name, **kwargs)


def _build(
    name: str,
    *,
    num_classes: int = 10,
    in_channels: int | None = None,
    input_size: int | None = None,
) -> BuiltModel:
    if name == DEMO:
        channels = in_channels or DEMO_INPUT_SHAPE[0]
        model = DemoNet(num_classes=num_classes, in_channels=channels)
        if input_size not in (None, 8):
            raise ValueError(f"input size: the demo model takes 8x8 inputs, got {input_size}")
        return BuiltModel(model, model.input_shape)
    if ":" in name:
        module_name, _, attr = name.partition(":")
        try:
            fn = getattr(importlib.import_module(module_name), attr)
        except (ImportError, AttributeError) as exc:
            raise UnknownModelError(
                f"model {name!r}: could not load {attr!r} from module {module_name!r} ({exc})"
            ) from None
        model = _call_with_supported(fn, num_classes=num_classes)
        if not isinstance(model, nn.Module):
            raise UnknownModelError(
                f"model {name!r}: expected the callable to return a torch.nn.Module, got {type(model).__name__}"
            )
        shape = getattr(model, "input_shape", None)
        if shape is None or input_size is not None:
            size = input_size or TORCHVISION_INPUT_SIZE
            shape = (in_channels or 3, size, size)
        return BuiltModel(model, tuple(int(s) for s in shape))
    import torchvision.models as tvm

    available = tvm.list_models(module=tvm)
    if name not in available:
        raise UnknownModelError(
            f"unknown model {name!r}: expected 'demo', 'module:callable' or a torchvision "
            f"classifier name such as mobilenet_v2, resnet18 ({len(available)} available)"
        )
    model = tvm.get_model(name, weights=None, num_classes=num_classes)
    size = input_size or TORCHVISION_INPUT_SIZE
    return BuiltModel(model, (in_channels or 3, size, size))
