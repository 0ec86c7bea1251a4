import pytest
import torch
from torch import nn

from trainables.models import build_model
from trainables.quantize import (
    QuantLayer,
    best_activation_alpha,
    best_weight_clip,
    quantize_activation,
    quantize_model,
    quantize_weight,
)


@pytest.fixture
def weights():
    return torch.randn(32, 8, 3, 3, generator=torch.Generator().manual_seed(0))


def _w_err(w, bits):
    return float(((quantize_weight(w, bits, best_weight_clip(w, bits)) - w) ** 2).mean())


def test_weight_8bit_close_and_error_non_increasing(weights):
    errors = [_w_err(weights, b) for b in range(1, 9)]
    assert errors[-1] < 1e-3 * float((weights**2).mean())
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False))


def test_weight_levels_per_channel(weights):
    q = quantize_weight(weights, 3, best_weight_clip(weights, 3))
    for c in range(weights.shape[0]):
        assert len(torch.unique(q[c])) <= 7  # 3-bit symmetric: -3..3


def test_one_bit_weights_are_sign_times_mean_abs(weights):
    q = quantize_weight(weights, 1)
    mean_abs = weights.abs().flatten(1).mean(1)
    for c in range(weights.shape[0]):
        assert torch.allclose(q[c].abs(), mean_abs[c].expand_as(q[c]))
        assert torch.equal(torch.sign(q[c]), torch.where(weights[c] >= 0, 1.0, -1.0))


@pytest.mark.parametrize("signed", [False, True])
def test_activation_error_non_increasing(signed):
    x = torch.randn(20000, generator=torch.Generator().manual_seed(1))
    if not signed:
        x = x.relu()
    errors = []
    for b in range(1, 9):
        alpha = best_activation_alpha(x, b, signed)
        errors.append(float(((quantize_activation(x, b, alpha, signed) - x) ** 2).mean()))
    assert errors[-1] < 1e-3 * float((x**2).mean())
    assert all(later <= earlier for earlier, later in zip(errors, errors[1:], strict=False))


def test_one_bit_unsigned_activation_is_zero_or_alpha():
    x = torch.rand(1000)
    q = quantize_activation(x, 1, torch.tensor(0.7), signed=False)
    values = torch.unique(q)
    assert len(values) == 2 and float(values[0]) == 0.0 and float(values[1]) == pytest.approx(0.7)


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_gradients_flow(bits, weights):
    w = weights.clone().requires_grad_(True)
    x = torch.rand(100, requires_grad=True)
    loss = quantize_weight(w, bits, best_weight_clip(w, bits)).sum() + quantize_activation(
        x, bits, torch.tensor(0.9), signed=False).sum()
    loss.backward()
    assert w.grad is not None and float(w.grad.abs().sum()) > 0
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_quantize_model_8bit_close_and_1bit_runs():
    built = build_model("demo", seed=0)
    model = built.model.eval()
    x = torch.randn(64, *built.input_shape, generator=torch.Generator().manual_seed(2))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    ref = model(x)
    q8 = quantize_model(model, names, [(8, 8)] * len(names), x).eval()
    assert sum(isinstance(m, QuantLayer) for m in q8.modules()) == len(names)
    with torch.no_grad():
        rel = float((q8(x) - ref).norm() / ref.norm())
    assert rel < 0.05
    q1 = quantize_model(model, names, [(1, 1)] * len(names), x).eval()
    out = q1(x)
    assert torch.isfinite(out).all()
    # The original model is untouched.
    assert not any(isinstance(m, QuantLayer) for m in model.modules())


def test_quantlayer_rejects_bad_bits():
    with pytest.raises(ValueError, match=r"w_bits: expected an integer in \[1, 8\]"):
        QuantLayer(nn.Linear(2, 2), 9, 8)


# ---- quantizer options (QuantOptions) ---------------------------------------------------------


def test_per_tensor_weights_share_one_grid(weights):
    from trainables.quantize import QuantOptions

    q = quantize_weight(weights, 3, best_weight_clip(weights, 3, "per_tensor"), "per_tensor")
    assert len(torch.unique(q)) <= 7  # one 3-bit symmetric grid for the whole tensor
    per_channel = quantize_weight(weights, 3, best_weight_clip(weights, 3))
    assert len(torch.unique(per_channel)) > 7  # one grid per channel
    one = quantize_weight(weights, 1, granularity="per_tensor")
    assert torch.allclose(one.abs(), weights.abs().mean().expand_as(one))
    with pytest.raises(ValueError, match="weight_granularity: choose between per_channel, per_tensor"):
        QuantOptions(weight_granularity="per_row")


@pytest.mark.parametrize("granularity", ["per_channel", "per_tensor"])
def test_kmeans_weights_use_2_to_the_b_centroids_and_beat_linear(weights, granularity):
    from trainables.quantize import kmeans_codebook, quantize_weight_kmeans

    for bits in (1, 2, 3):
        codebook = kmeans_codebook(weights, bits, granularity)
        rows = weights.shape[0] if granularity == "per_channel" else 1
        assert codebook.shape == (rows, 2**bits)
        q = quantize_weight_kmeans(weights, codebook, granularity)
        for r in range(rows):
            values = (q[r] if granularity == "per_channel" else q).reshape(-1, 1)
            # Every weight sits on a centroid (up to the STE's w + (q - w) rounding).
            assert float((values - codebook[r][None, :]).abs().min(dim=1).values.max()) < 1e-6
        mse_kmeans = float(((q - weights) ** 2).mean())
        linear = quantize_weight(weights, bits, best_weight_clip(weights, bits, granularity), granularity)
        # k-means places its levels where the weights are: never worse than the uniform grid
        # (which also spends one of its 2**b codes: it has 2**b - 1 levels).
        assert mse_kmeans <= float(((linear - weights) ** 2).mean()) + 1e-9
    w = weights.clone().requires_grad_(True)
    quantize_weight_kmeans(w, kmeans_codebook(weights, 2, granularity), granularity).sum().backward()
    assert torch.equal(w.grad, torch.ones_like(w))  # straight through


def test_weight_only_mode_leaves_activations_in_float():
    from trainables.quantize import QuantOptions

    torch.manual_seed(0)
    layer = nn.Linear(16, 4)
    x = torch.randn(8, 16)
    weights_only = QuantLayer(copy_of(layer), 8, 1, QuantOptions(quantize="weights"))
    both = QuantLayer(copy_of(layer), 8, 1)
    for q in (weights_only, both):
        q.calibrating = True
        q(x)
        q.calibrate()
    exact = torch.nn.functional.linear(x, weights_only.quantized_weight(), layer.bias)
    assert torch.equal(weights_only(x), exact)  # 1-bit activation bits are not applied
    assert not torch.allclose(both(x), exact, atol=1e-3)


def test_quantize_model_with_kmeans_weight_only_options():
    from trainables.quantize import QuantOptions

    built = build_model("demo", seed=0)
    model = built.model.eval()
    x = torch.randn(32, *built.input_shape, generator=torch.Generator().manual_seed(2))
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d | nn.Linear)]
    options = QuantOptions(weight_quantizer="kmeans", weight_granularity="per_tensor", quantize="weights")
    q8 = quantize_model(model, names, [(8, 1)] * len(names), x, options).eval()
    with torch.no_grad():
        ref = model(x)
        rel = float((q8(x) - ref).norm() / ref.norm())
    assert rel < 0.05  # 8-bit k-means weights, float activations (a_bits=1 ignored)
    assert all(m.options == options for m in q8.modules() if isinstance(m, QuantLayer))


def copy_of(module: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(module)
