import pytest
import torch
from torch import nn

from hardware import LayerSpec, NoQuantizableLayersError, extract_layers
from trainables.models import UnknownModelError, build_model


def test_demo_net_layers():
    built = build_model("demo")
    layers = extract_layers(built.model, built.input_shape)
    assert len(layers) == 12
    kinds = [s.kind for s in layers]
    assert kinds.count("depthwise") == 3 and kinds[-1] == "linear" and kinds[0] == "conv"
    dw = layers[2]
    assert dw.groups == dw.in_channels == dw.out_channels == 32
    assert dw.gemm_n == 1 and dw.gemm_k == 9
    # macs = out_h * out_w * out_ch * (in_ch / groups) * kh * kw
    assert dw.macs == 8 * 8 * 32 * 1 * 9
    assert layers[5].stride == (2, 2) and layers[5].out_hw == (4, 4)
    assert layers[-1].weights == 64 * 10 and layers[-1].macs == 640


def test_mobilenet_v2_layers():
    built = build_model("mobilenet_v2")
    layers = extract_layers(built.model, built.input_shape)
    assert len(layers) == 53
    assert sum(s.kind == "depthwise" for s in layers) == 17
    first = layers[0]
    assert (first.in_channels, first.out_channels, first.stride, first.in_hw, first.out_hw) == (
        3, 32, (2, 2), (224, 224), (112, 112))
    assert sum(s.weights for s in layers) == sum(
        m.weight.numel() for m in built.model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    # ~300M MACs is MobileNetV2-1.0's published figure at 224x224.
    assert 290e6 < sum(s.macs for s in layers) < 310e6


def test_resnet18_layers():
    built = build_model("resnet18")
    layers = extract_layers(built.model, built.input_shape)
    assert len(layers) == 21  # 17 3x3 convs + 3 downsample 1x1 + fc
    assert 1.7e9 < sum(s.macs for s in layers) < 1.9e9


def test_user_model_module_callable():
    built = build_model("user_models:tiny_cnn", num_classes=5)
    assert built.input_shape == (3, 16, 16)
    layers = extract_layers(built.model, built.input_shape)
    assert [s.kind for s in layers] == ["conv", "depthwise", "conv", "linear"]
    assert layers[-1].out_channels == 5


def test_model_mode_restored_and_errors():
    built = build_model("demo")
    built.model.train()
    extract_layers(built.model, built.input_shape)
    assert built.model.training
    with pytest.raises(NoQuantizableLayersError, match="no quantizable layer"):
        extract_layers(build_model("user_models:no_layers").model, (1, 4, 4))
    with pytest.raises(UnknownModelError, match="unknown model"):
        build_model("not_a_model")
    with pytest.raises(UnknownModelError, match="could not load"):
        build_model("user_models:missing")


def test_shared_module_recorded_once():
    layers = extract_layers(build_model("user_models:shared").model, (1, 1, 4))
    assert len(layers) == 1


def test_build_model_is_seeded_without_global_side_effects():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = build_model("demo", seed=7).model
    after = torch.rand(1)
    b = build_model("demo", seed=7).model
    assert torch.equal(before, after)  # global RNG untouched
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_layerspec_validation():
    with pytest.raises(ValueError, match="kind"):
        LayerSpec("x", "pool", 1, 1, (1, 1), (1, 1), 1, (1, 1), (1, 1), 1, 1)
    with pytest.raises(ValueError, match="groups"):
        LayerSpec("x", "conv", 3, 4, (1, 1), (1, 1), 2, (1, 1), (1, 1), 1, 1)
