"""Per-layer weight/activation fake quantization for 1-8 bits, with straight-through gradients.

- Weights: per-output-channel symmetric (``torch.fake_quantize_per_channel_affine``),
  levels ``-q..q`` with ``q = 2**(b-1) - 1``; the clipping range per channel is
  chosen once by minimizing the quantization MSE (max-abs scaling is poor below
  4 bits: a ternary grid spanning a Gaussian's max zeroes almost every weight).
  1-bit weights are ``sign(w) * mean|w|`` per channel (XNOR-Net / HAQ).
- Activations: per-tensor, at each quantized layer's input, with a clipping value
  calibrated on training data (again MSE-optimal). Calibration streams batches and
  keeps, per layer, only the running min / max |x| and a strided sample of at most
  ``MAX_CALIBRATION_VALUES`` values: memory does not grow with the number of
  calibration samples (keeping every input was ~7 GB for MobileNetV2 at 224x224). Non-negative inputs
  (after ReLU) use an unsigned grid ``0..2**b - 1``, so 1-bit is ``{0, alpha}``; signed
  inputs use the symmetric grid (1-bit signed is ``sign(x) * alpha``).

Both fake-quantize ops pass gradients straight through inside the clipping range.
BatchNorm stays in floating point (not folded): the policy prices conv/linear MACs.

Options (``QuantOptions``), as in HAQ's experiments:

- ``weight_granularity``: ``per_channel`` (default) or ``per_tensor`` (one clipping
  range, or one codebook, for the whole weight tensor, as HAQ's code does).
- ``weight_quantizer``: ``linear`` (the uniform grid above) or ``kmeans`` (HAQ's
  model-size experiments, after Deep Compression): ``2**b`` centroids per channel or
  tensor from k-means on the reference weights (linear initialization, Lloyd
  iterations); each forward maps every weight to its nearest centroid, gradients
  pass straight through to the float weights, and the codebook stays fixed.
- ``quantize``: ``weights+activations`` (default) or ``weights`` (weight-only: inputs
  stay in floating point and the policy's activation bits are not applied, as in
  HAQ's model-size experiments; meaningful with a size budget).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

# Candidate clipping values, as fractions of the max |value|, searched for the lowest MSE.
CLIP_RATIOS = torch.linspace(0.05, 1.0, 20)
# Activation samples used to choose a clipping value (subsampled for big feature maps).
MAX_CALIBRATION_VALUES = 200_000
# Calibration images per forward pass when given one tensor: bounds activation memory.
CALIBRATION_BATCH_SIZE = 32


WEIGHT_GRANULARITIES = ("per_channel", "per_tensor")
WEIGHT_QUANTIZERS = ("linear", "kmeans")
QUANTIZE_MODES = ("weights+activations", "weights")
# Lloyd iterations of the k-means codebook (converged to <1e-4 relative MSE change on
# MobileNetV2-sized tensors well before this).
KMEANS_ITERATIONS = 30


@dataclass(frozen=True, kw_only=True)
class QuantOptions:
    """How weights (and whether activations) are quantized; see the module docstring."""

    weight_granularity: str = "per_channel"
    weight_quantizer: str = "linear"
    quantize: str = "weights+activations"

    def __post_init__(self) -> None:
        for name, allowed in (("weight_granularity", WEIGHT_GRANULARITIES),
                              ("weight_quantizer", WEIGHT_QUANTIZERS), ("quantize", QUANTIZE_MODES)):
            value = getattr(self, name)
            if value not in allowed:
                raise ValueError(f"{name}: choose between {', '.join(allowed)}, got {value!r}")

    @property
    def quantize_activations(self) -> bool:
        return self.quantize == "weights+activations"


def _signed_levels(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _straight_through(q: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Forward value exactly ``q``, gradient 1 w.r.t. ``x`` (``x - x.detach()`` is exactly 0;
    ``x + (q - x).detach()`` would be ``q`` only up to rounding, and an exported integer
    model must reproduce the fake-quantized one bit for bit)."""
    return q.detach() + (x - x.detach())


def _weight_rows(w: torch.Tensor, granularity: str) -> torch.Tensor:
    """``w`` as ``[rows, n]``: one row per output channel, or a single row per tensor."""
    return w.reshape(w.shape[0], -1) if granularity == "per_channel" else w.reshape(1, -1)


def weight_scale(w: torch.Tensor, bits: int, clip_ratio: torch.Tensor | None = None,
                 granularity: str = "per_channel") -> torch.Tensor:
    """Per-output-channel float32 scale of ``w`` at ``bits``: integer level ``k`` means ``k * scale``.

    1 bit: levels -1, +1 and scale ``mean|w|``; else levels ``-q..q`` and scale
    ``clip_ratio * max|w| / q``; per row of ``_weight_rows`` (``per_tensor``: one row, its
    scale repeated for every channel). The one definition fake quantization and export use.
    """
    flat = _weight_rows(w.detach(), granularity)
    if bits == 1:
        scale = flat.abs().mean(dim=1).float()
    else:
        max_abs = flat.abs().amax(dim=1).clamp_min(1e-8)
        if clip_ratio is not None:
            max_abs = max_abs * clip_ratio
        scale = (max_abs / _signed_levels(bits)).float()
    return scale.expand(w.shape[0]).contiguous() if scale.numel() != w.shape[0] else scale


def quantize_weight(w: torch.Tensor, bits: int, clip_ratio: torch.Tensor | None = None,
                    granularity: str = "per_channel") -> torch.Tensor:
    """Fake-quantize ``w`` (out channels first) to ``bits`` per output channel (or per tensor)."""
    scale = weight_scale(w, bits, clip_ratio, granularity)
    if bits == 1:
        # sign * mean|w|: the L2-optimal binary approximation per row; STE gradient.
        scale = scale.view(-1, *([1] * (w.dim() - 1)))
        return _straight_through(torch.where(w >= 0, scale, -scale), w)
    levels = _signed_levels(bits)
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zero, 0, -levels, levels)


def kmeans_codebook(w: torch.Tensor, bits: int, granularity: str = "per_channel",
                    iterations: int = KMEANS_ITERATIONS) -> torch.Tensor:
    """``[rows, 2**bits]`` sorted centroids of ``w``'s rows by k-means (HAQ / Deep Compression:
    centroids initialized evenly between each row's min and max, then Lloyd iterations)."""
    flat = _weight_rows(w.detach(), granularity).float()
    rows, k = flat.shape[0], 2**bits
    low, high = flat.amin(dim=1, keepdim=True), flat.amax(dim=1, keepdim=True)
    steps = torch.linspace(0.0, 1.0, k, device=flat.device)
    centroids = low + (high - low) * steps  # [rows, k]
    offsets = (torch.arange(rows, device=flat.device) * k)[:, None]
    for _ in range(iterations):
        assign = _nearest(flat, centroids) + offsets  # flat index into [rows * k]
        sums = torch.zeros(rows * k, device=flat.device).index_add_(0, assign.reshape(-1), flat.reshape(-1))
        counts = torch.bincount(assign.reshape(-1), minlength=rows * k).float()
        # An empty cluster keeps its centroid (it still sorts between its neighbours).
        updated = torch.where(counts > 0, sums / counts.clamp_min(1.0), centroids.reshape(-1))
        updated = updated.reshape(rows, k).sort(dim=1).values
        if torch.equal(updated, centroids):
            break
        centroids = updated
    return centroids.cpu()


def _nearest(flat: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of each row's sorted centroids, without a [rows, n, k] array."""
    midpoints = ((centroids[:, 1:] + centroids[:, :-1]) / 2).contiguous()
    return torch.searchsorted(midpoints, flat.contiguous())


def quantize_weight_kmeans(w: torch.Tensor, centroids: torch.Tensor,
                           granularity: str = "per_channel") -> torch.Tensor:
    """Every weight replaced by its row's nearest centroid; straight-through gradient."""
    flat = _weight_rows(w, granularity)
    codebook = centroids.to(device=w.device, dtype=w.dtype)
    q = torch.gather(codebook, 1, _nearest(flat.detach(), codebook)).reshape(w.shape)
    return _straight_through(q, w)


def quantize_activation(x: torch.Tensor, bits: int, alpha: torch.Tensor, signed: bool) -> torch.Tensor:
    """Fake-quantize ``x`` per tensor to ``bits`` with clipping value ``alpha``."""
    if signed and bits == 1:
        return _straight_through(torch.where(x >= 0, alpha, -alpha), x)
    lo, hi = activation_levels(bits, signed)
    scale = (alpha / hi).reshape(1).float()
    zero = torch.zeros(1, dtype=torch.int32, device=x.device)
    return torch.fake_quantize_per_tensor_affine(x, scale, zero, lo, hi)


def activation_levels(bits: int, signed: bool) -> tuple[int, int]:
    """Integer range of an activation grid: ``-q..q`` signed (``q = 2**(b-1) - 1``), ``0..2**b - 1`` unsigned."""
    return (-_signed_levels(bits), _signed_levels(bits)) if signed else (0, 2**bits - 1)


def best_weight_clip(w: torch.Tensor, bits: int, granularity: str = "per_channel") -> torch.Tensor:
    """Per-row clip ratio (of max|w|) with the lowest quantization MSE; ones for 1 bit."""
    flat = _weight_rows(w.detach(), granularity)
    if bits == 1:
        return torch.ones(flat.shape[0])
    levels = _signed_levels(bits)
    max_abs = flat.abs().amax(dim=1, keepdim=True).clamp_min(1e-8)  # [C, 1]
    ratios = CLIP_RATIOS.to(flat)[:, None, None]  # [R, 1, 1]
    scale = ratios * max_abs / levels  # [R, C, 1]
    q = torch.clamp(torch.round(flat / scale), -levels, levels) * scale
    mse = ((q - flat) ** 2).mean(dim=2)  # [R, C]
    return CLIP_RATIOS.to(flat)[mse.argmin(dim=0)].cpu()


def best_activation_alpha(x: torch.Tensor, bits: int, signed: bool,
                          max_abs: float | None = None) -> torch.Tensor:
    """Clipping value with the lowest quantization MSE on calibration activations ``x``.

    ``max_abs`` is the largest |value| of the whole calibration stream when ``x`` is a
    sample of it (candidates are fractions of it); default: ``x``'s own.
    """
    flat = x.detach().reshape(-1).float()
    if flat.numel() > MAX_CALIBRATION_VALUES:
        step = flat.numel() // MAX_CALIBRATION_VALUES + 1
        flat = flat[::step]
    max_abs = (flat.abs().max() if max_abs is None else torch.tensor(float(max_abs))).clamp_min(1e-8)
    alphas = CLIP_RATIOS.to(flat) * max_abs
    errors = torch.stack([
        ((quantize_activation(flat, bits, a, signed) - flat) ** 2).mean() for a in alphas
    ])
    return alphas[errors.argmin()].detach().cpu()


class ActivationStats:
    """Bounded per-layer calibration statistics over a stream of input batches.

    Keeps the exact running min and max |x| and a strided sample of the values in one
    preallocated buffer of ``capacity`` floats: the stride doubles (and the kept sample
    is halved in place) whenever it would overflow, so the sample stays a uniform
    stride over everything seen, between ``capacity / 2`` and ``capacity`` values,
    whatever the number of batches. One fixed buffer, not a growing list of pieces:
    many small tensors between the big transient activations fragment the heap, and
    the process's RSS kept growing with the sample count although they stayed bounded.
    """

    def __init__(self, capacity: int = MAX_CALIBRATION_VALUES) -> None:
        self.capacity = int(capacity)
        self.stride = 1
        self.buffer: torch.Tensor | None = None  # allocated on the first batch, on the CPU
        self.kept_count = 0
        self.seen = 0
        self.min = float("inf")
        self.max_abs = 0.0

    def update(self, x: torch.Tensor) -> None:
        flat = x.detach().reshape(-1)
        if flat.numel() == 0:
            return
        if self.buffer is None:
            self.buffer = torch.empty(self.capacity, dtype=torch.float32)
        self.seen += flat.numel()
        lo, hi = torch.aminmax(flat)  # one pass, no |x| copy of a large feature map
        self.min = min(self.min, float(lo))
        self.max_abs = max(self.max_abs, float(-lo), float(hi))
        while self.kept_count + -(-flat.numel() // self.stride) > self.capacity:
            self.stride *= 2
            halved = self.buffer[:self.kept_count:2].clone()  # at most capacity / 2 floats
            self.kept_count = int(halved.numel())
            self.buffer[:self.kept_count] = halved
        part = flat[::self.stride]
        self.buffer[self.kept_count:self.kept_count + part.numel()].copy_(part)
        self.kept_count += int(part.numel())

    def sample(self) -> torch.Tensor:
        if self.buffer is None or self.kept_count == 0:
            raise ValueError("calibration: expected at least one input batch through this layer, got none")
        return self.buffer[:self.kept_count]


class QuantLayer(nn.Module):
    """Wraps a ``Conv2d`` or ``Linear``: quantizes its input and its weights, then applies it."""

    def __init__(self, layer: nn.Module, w_bits: int, a_bits: int,
                 options: QuantOptions | None = None) -> None:
        super().__init__()
        if not isinstance(layer, nn.Conv2d | nn.Linear):
            raise TypeError(f"expected nn.Conv2d or nn.Linear, got {type(layer).__name__}")
        for label, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
            if not 1 <= int(bits) <= 8:
                raise ValueError(f"{label}: expected an integer in [1, 8], got {bits}")
        self.layer = layer
        self.w_bits, self.a_bits = int(w_bits), int(a_bits)
        self.options = options or QuantOptions()
        granularity, device = self.options.weight_granularity, layer.weight.device
        if self.options.weight_quantizer == "kmeans":
            self.register_buffer("codebook", kmeans_codebook(layer.weight, self.w_bits, granularity).to(device))
        else:
            self.register_buffer("w_clip", best_weight_clip(layer.weight, self.w_bits, granularity).to(device))
        self.register_buffer("alpha", torch.ones((), device=layer.weight.device))
        self.signed = True
        self._stats: ActivationStats | None = None

    @property
    def calibrating(self) -> bool:
        return self._stats is not None

    @calibrating.setter
    def calibrating(self, on: bool) -> None:
        self._stats = ActivationStats() if on else None

    def calibrate(self) -> None:
        """Set the activation clipping from the inputs seen since ``calibrating = True``."""
        stats, self._stats = self._stats, None
        if stats is None:
            raise ValueError("calibrate: expected calibrating = True and input batches first")
        self.signed = stats.min < 0
        self.alpha.fill_(float(best_activation_alpha(stats.sample(), self.a_bits, self.signed,
                                                     max_abs=stats.max_abs)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._stats is not None:
            self._stats.update(x)
            return self.layer(x)
        xq = quantize_activation(x, self.a_bits, self.alpha, self.signed) \
            if self.options.quantize_activations else x
        wq = self.quantized_weight()
        if isinstance(self.layer, nn.Linear):
            return F.linear(xq, wq, self.layer.bias)
        c = self.layer
        return F.conv2d(xq, wq, c.bias, c.stride, c.padding, c.dilation, c.groups)

    def quantized_weight(self) -> torch.Tensor:
        granularity = self.options.weight_granularity
        if self.options.weight_quantizer == "kmeans":
            return quantize_weight_kmeans(self.layer.weight, self.codebook, granularity)
        return quantize_weight(self.layer.weight, self.w_bits, self.w_clip, granularity)


def quantize_model(
    model: nn.Module,
    layer_names: Sequence[str],
    policy,
    calibration_input: torch.Tensor | Iterable[torch.Tensor],
    options: QuantOptions | None = None,
) -> nn.Module:
    """A copy of ``model`` with layer ``layer_names[i]`` at ``policy[i] = (w_bits, a_bits)``.

    Activation ranges are calibrated in eval mode (BatchNorm statistics are not
    disturbed) on ``calibration_input``: a tensor of training inputs (run
    ``CALIBRATION_BATCH_SIZE`` at a time) or an iterable of input batches, streamed:
    each layer keeps bounded statistics (``ActivationStats``), never the inputs.
    """
    if len(policy) != len(layer_names):
        raise ValueError(f"policy: expected {len(layer_names)} layers, got {len(policy)}")
    qmodel = copy.deepcopy(model)
    wrappers = []
    for name, (w_bits, a_bits) in zip(layer_names, policy, strict=True):
        parent_name, _, child = name.rpartition(".")
        parent = qmodel.get_submodule(parent_name) if parent_name else qmodel
        wrapper = QuantLayer(getattr(parent, child), int(w_bits), int(a_bits), options)
        setattr(parent, child, wrapper)
        wrappers.append(wrapper)
    was_training = qmodel.training
    qmodel.eval()
    if isinstance(calibration_input, torch.Tensor):
        calibration_input = calibration_input.split(CALIBRATION_BATCH_SIZE)
    for w in wrappers:
        w.calibrating = True
    with torch.no_grad():
        for batch in calibration_input:
            qmodel(batch)
    for w in wrappers:
        w.calibrate()
    qmodel.train(was_training)
    return qmodel
