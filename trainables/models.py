"""Models by name: the embedded demo net, torchvision classifiers, or ``module:callable``.

Every model is built without weights; pretrained weights (``load_weights``) come
from a checkpoint file or torchvision's weights in the local torch cache: haqtune
never downloads weights at run time.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

DEMO = "demo"
DEMO_INPUT_SHAPE = (1, 8, 8)  # scikit-learn digits: 1 x 8 x 8 gray images
TORCHVISION_INPUT_SIZE = 224


class UnknownModelError(ValueError):
    pass


class WeightsError(ValueError):
    """Pretrained weights that are missing, unknown, unreadable or for another model."""


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
        if shape is None or input_size is not None or in_channels is not None:
            size = input_size or (shape[-1] if shape is not None else TORCHVISION_INPUT_SIZE)
            shape = (in_channels or first_conv_channels(model) or 3, size, size)
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
    channels = first_conv_channels(model) or 3
    if in_channels is not None and in_channels != channels:
        raise ValueError(f"model {name!r} takes {channels}-channel images, but the data has "
                         f"{in_channels}-channel images: pick a dataset with {channels} channels or "
                         "a model (module:callable) for yours")
    return BuiltModel(model, (channels, size, size))


def first_conv_channels(model: nn.Module) -> int | None:
    """Input channels of the first ``Conv2d`` in definition order (the stem of every
    torchvision classifier), or None for a model without one."""
    conv = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return int(conv.in_channels) if conv is not None else None


def model_source_hash(name: str) -> str | None:
    """Content hash of a ``module:callable`` model's source file (None for built-in
    models): an edited user model is another model (another reference cache entry)."""
    if ":" not in name:
        return None
    module = importlib.import_module(name.partition(":")[0])
    path = getattr(module, "__file__", None)
    return file_hash(path) if path else None


def file_hash(path: str | os.PathLike) -> str:
    """sha256 of a file's content, read in chunks (checkpoints are hundreds of MB)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()[:16]


CHECKPOINT_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".tar")


@dataclass(frozen=True)
class Weights:
    """Loaded pretrained weights: the state dict and what it is (for the cache key)."""

    state_dict: dict
    source: str  # "checkpoint" or "torchvision"
    identity: str  # file content hash or torchvision weights name
    location: str  # the checkpoint path or the torchvision weights name, for messages


def _looks_like_path(weights: str) -> bool:
    return os.sep in weights or "/" in weights or weights.lower().endswith(CHECKPOINT_SUFFIXES)


def load_weights(model_name: str, weights: str) -> Weights:
    """Pretrained weights for ``model_name``: a checkpoint file (a state dict, or a dict
    with a ``state_dict`` entry, loaded with ``weights_only=True``) or a torchvision
    weights name (``MobileNet_V2_Weights.IMAGENET1K_V1``, or ``IMAGENET1K_V1`` /
    ``DEFAULT`` for a torchvision model name) read from the local torch hub cache.

    Raises ``WeightsError`` (one line) when the file or the cached weights are absent.
    """
    import torch

    if Path(weights).is_file():
        try:
            loaded = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as exc:  # pickle/zip errors of all kinds: the file is not a state dict
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise WeightsError(f"reference.weights: could not load checkpoint {weights!r} as a state "
                               f"dict with torch.load(weights_only=True) ({first[:200]})") from None
        state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise WeightsError(f"reference.weights: checkpoint {weights!r} expected a state dict "
                               f"(name -> tensor), got {type(loaded).__name__}")
        return Weights(state, "checkpoint", file_hash(weights), weights)
    if _looks_like_path(weights):
        raise WeightsError(f"reference.weights: checkpoint {weights!r} not found: expected a state-dict "
                           "file or a torchvision weights name such as MobileNet_V2_Weights.IMAGENET1K_V1")
    return _torchvision_weights(model_name, weights)


def _torchvision_weights(model_name: str, name: str) -> Weights:
    import torch
    import torchvision.models as tvm

    try:
        enum = tvm.get_weight(name) if "." in name else tvm.get_model_weights(model_name)[name]
    except (KeyError, ValueError, AttributeError):
        hint = ""
        if ":" not in model_name and model_name in tvm.list_models(module=tvm):
            hint = f" (for {model_name}: {', '.join(w.name for w in tvm.get_model_weights(model_name))})"
        raise WeightsError(f"reference.weights: unknown weights {name!r}: expected a checkpoint file or a "
                           f"torchvision weights name such as MobileNet_V2_Weights.IMAGENET1K_V1{hint}") from None
    full_name = f"{type(enum).__name__}.{enum.name}"
    # torch.hub's own cache layout, so weights fetched once by torchvision are found here;
    # never load_state_dict_from_url: offline it would try (and hang on) a download.
    path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(enum.url)
    if not path.is_file():
        raise WeightsError(
            f"reference.weights: torchvision weights {full_name} are not in the local torch cache "
            f"(expected {path}); haqtune does not download: fetch them once where there is network "
            f"(python -c \"import torchvision; torchvision.models.get_weight('{full_name}').get_state_dict()\") "
            "and copy the file there, or set TORCH_HOME"
        )
    state = torch.load(path, map_location="cpu", weights_only=True)
    return Weights(state, "torchvision", full_name, full_name)


def apply_weights(model: nn.Module, weights: Weights, model_name: str) -> None:
    """``load_state_dict`` (strict) with a one-line error when the weights belong to another model."""
    result = _load_strict(model, weights.state_dict)
    if result is not None:
        raise WeightsError(f"reference.weights: {weights.source} {weights.location!r} does not fit "
                           f"model {model_name!r}: {result}")


def _load_strict(model: nn.Module, state: dict) -> str | None:
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    mismatched = [f"{k} {list(state[k].shape)} vs {list(own[k].shape)}"
                  for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    problems = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            more = f" (+{len(items) - 3} more)" if len(items) > 3 else ""
            problems.append(f"{len(items)} {label} key(s): {', '.join(items[:3])}{more}")
    if problems:
        return "expected its own parameter names and shapes, got " + "; ".join(problems)
    model.load_state_dict(state, strict=True)
    return None
