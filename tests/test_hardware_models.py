"""Cost models: one contract suite run against every registered model, plus the scaling
laws each model must show because of its hardware, and the table model's file formats."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hardware import (
    BISMO_CLOUD,
    BISMO_EDGE,
    BITFUSION,
    BITS,
    CostModel,
    CostTable,
    LayerSpec,
    get_cost_model,
    list_cost_models,
)

MODEL_NAMES = sorted(list_cost_models())
CONTRACT = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- layer specs -------------------------------------------------------------------------


def conv(cin, cout, k, hw, stride=1, groups=1, name="conv") -> LayerSpec:
    out = math.ceil(hw / stride)
    kind = "depthwise" if groups > 1 and groups == cin else "conv"
    weights = cout * (cin // groups) * k * k
    return LayerSpec(name, kind, cin, cout, (k, k), (stride, stride), groups, (hw, hw),
                     (out, out), weights, out * out * weights)


def depthwise(ch, hw, k=3, stride=1, name="dw") -> LayerSpec:
    return conv(ch, ch, k, hw, stride, groups=ch, name=name)


def linear(fin, fout, positions=1, name="fc") -> LayerSpec:
    return LayerSpec(name, "linear", fin, fout, (1, 1), (1, 1), 1, (positions, 1), (positions, 1),
                     fin * fout, positions * fin * fout)


@st.composite
def layer_specs(draw, index: int = 0) -> LayerSpec:
    kind = draw(st.sampled_from(["conv", "grouped", "depthwise", "linear"]))
    name = f"{kind}{index}"
    if kind == "linear":
        return linear(draw(st.integers(1, 4096)), draw(st.integers(1, 2048)),
                      draw(st.sampled_from([1, 1, 4, 49])), name=name)
    hw = draw(st.integers(1, 112))
    stride = draw(st.sampled_from([1, 2]))
    if kind == "depthwise":
        return depthwise(draw(st.integers(2, 1024)), hw, draw(st.sampled_from([3, 5])), stride, name)
    groups = draw(st.sampled_from([2, 4])) if kind == "grouped" else 1
    cin = groups * draw(st.integers(1, 128))
    cout = groups * draw(st.integers(1, 128))
    return conv(cin, cout, draw(st.sampled_from([1, 3, 5, 7])), hw, stride, groups, name)


@st.composite
def networks(draw) -> list[LayerSpec]:
    count = draw(st.integers(1, 6))
    return [draw(layer_specs(i)) for i in range(count)]


# --- building any registered model for a given network ----------------------------------


def monotone_table(num_layers: int, seed: int) -> np.ndarray:
    """A random latency table that, like real measurements, grows with both bitwidths."""
    rng = np.random.default_rng(seed)
    steps = rng.uniform(0.0, 1e-4, (num_layers, 8, 8))
    return np.cumsum(np.cumsum(steps, axis=1), axis=2) + 1e-6


# Registered presets of the table model: their row count is fixed by the shipped file.
PRESET_LAYERS = {"haq-cloud-mobilenetv2": 53}


def network_for(name: str, specs: list[LayerSpec]) -> list[LayerSpec]:
    """``specs``, or for a preset table any network with its layer count."""
    if name not in PRESET_LAYERS:
        return specs
    return [linear(8, 8, name=f"fc{i}") for i in range(PRESET_LAYERS[name])]


def make_model(name: str, specs, workdir: Path) -> CostModel:
    if name != "table":
        return get_cost_model(name)
    latency = workdir / "latency.npy"
    energy = workdir / "energy.npy"
    np.save(latency, monotone_table(len(specs), 0))
    np.save(energy, monotone_table(len(specs), 1))
    return get_cost_model("table", path=latency, energy_path=energy)


def uniform_total(table: CostTable, bits: int) -> tuple[float, float]:
    costs = table.evaluate(table.uniform(bits))
    return float(costs.latency_ms[0]), float(costs.energy_mj[0])


# --- contract: every registered model ----------------------------------------------------


def test_registry_lists_every_model():
    assert {"bismo-edge", "bismo-cloud", "bitfusion", "table"} <= set(MODEL_NAMES)
    for name, description in list_cost_models().items():
        assert description and "\n" not in description, name


@pytest.mark.parametrize("name", MODEL_NAMES)
@CONTRACT
@given(specs=networks())
def test_costs_non_negative_and_monotone_in_bits(name, specs):
    specs = network_for(name, specs)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(name, specs, Path(tmp))
        assert isinstance(model, CostModel)
        table = model.table(specs)
    for arr in (table.latency_s, table.energy_j):
        assert arr.shape == (len(specs), 8, 8)
        assert np.all(np.isfinite(arr)) and np.all(arr >= 0)
        # Dropping either bitwidth by one never costs more (exactly, not approximately).
        assert np.all(np.diff(arr, axis=1) >= 0), "cost grows when weight bits drop"
        assert np.all(np.diff(arr, axis=2) >= 0), "cost grows when activation bits drop"
    if name != "table":
        assert np.all(table.latency_s > 0)
    lat8, en8 = uniform_total(table, 8)
    lat4, en4 = uniform_total(table, 4)
    lat2, en2 = uniform_total(table, 2)
    assert lat8 >= lat4 >= lat2 and en8 >= en4 >= en2


@pytest.mark.parametrize("name", MODEL_NAMES)
@CONTRACT
@given(specs=networks(), seed=st.integers(0, 2**32 - 1))
def test_table_and_layer_cost_agree_exactly(name, specs, seed):
    rng = np.random.default_rng(seed)
    specs = network_for(name, specs)
    with tempfile.TemporaryDirectory() as tmp:
        model = make_model(name, specs, Path(tmp))
        table = model.table(specs)
        for i, spec in enumerate(specs):
            w, a = (int(b) for b in rng.integers(1, 9, 2))
            latency_s, energy_j = model.layer_cost(spec, w, a, table.batch)
            assert latency_s == table.latency_s[i, w - 1, a - 1]
            assert energy_j == table.energy_j[i, w - 1, a - 1]


@pytest.mark.parametrize("name", MODEL_NAMES)
@CONTRACT
@given(specs=networks(), seed=st.integers(0, 2**32 - 1))
def test_evaluate_is_the_sum_of_layer_costs(name, specs, seed):
    rng = np.random.default_rng(seed)
    specs = network_for(name, specs)
    with tempfile.TemporaryDirectory() as tmp:
        table = make_model(name, specs, Path(tmp)).table(specs)
    policies = rng.integers(1, 9, (7, len(specs), 2))
    costs = table.evaluate(policies)
    fast = table.evaluate(policies.astype(np.uint8))
    for i, policy in enumerate(policies):
        per_layer = table.layer_costs(policy)
        for got, want in zip((costs.latency_ms, costs.energy_mj, costs.size_mb), per_layer, strict=True):
            assert got[i] == pytest.approx(want.sum(), rel=2e-6, abs=1e-12)
    for got, want in zip(fast.__dict__.values(), costs.__dict__.values(), strict=True):
        np.testing.assert_array_equal(got, want)


def test_layer_cost_rejects_bits_outside_range():
    model = get_cost_model("bismo-edge")
    with pytest.raises(ValueError, match=r"w_bits: expected an integer in \[1, 8\], got 9"):
        model.layer_cost(conv(8, 8, 3, 8), 9, 8)


def test_unknown_option_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown option.*clock_mhz.*choose between"):
        get_cost_model("bismo-edge", clock_mhz=100)
    with pytest.raises(ValueError, match="dpa_rows: expected a positive number, got 0"):
        get_cost_model("bismo-cloud", dpa_rows=0)


# --- scaling laws that follow from the hardware --------------------------------------------


def ratios(model_name: str, spec: LayerSpec, batch: int | None = None) -> dict[str, float]:
    """Latency of (w, a) relative to 8/8 for one layer."""
    table = get_cost_model(model_name).table([spec], batch)
    lat = table.latency_s[0]
    base = lat[7, 7]
    return {"w4": lat[3, 7] / base, "a4": lat[7, 3] / base, "4/4": lat[3, 3] / base,
            "2/2": lat[1, 1] / base}


@pytest.mark.parametrize("name", ["bismo-edge", "bismo-cloud", "bitfusion"])
def test_compute_bound_pointwise_conv_scales_with_w_times_a(name):
    # A wide 1x1 conv: each operand is reused many times, so the array is the bottleneck
    # and bit-serial (BISMO) or fused (BitFusion) compute time is proportional to w * a.
    r = ratios(name, conv(512, 512, 1, 28))
    assert r["w4"] == pytest.approx(0.5, rel=1e-9)
    assert r["a4"] == pytest.approx(0.5, rel=1e-9)
    assert r["4/4"] == pytest.approx(0.25, rel=1e-9)


def bismo_ratios(name: str, spec: LayerSpec, **options) -> dict[str, float]:
    lat = get_cost_model(name, **options).table([spec]).latency_s[0]
    return {"w4": lat[3, 7] / lat[7, 7], "a4": lat[7, 3] / lat[7, 7]}


@pytest.mark.parametrize("name", ["bismo-cloud", "bismo-edge"])
def test_depthwise_conv_follows_activation_bits_in_both_mappings(name):
    # HAQ's mapping: channel by channel, one activation bit-plane per pass over the row
    # tiles, C * ceil(M / Dm) * a cycles: exactly proportional to a, independent of w.
    spec = depthwise(144, 56)
    r = bismo_ratios(name, spec)
    assert r["a4"] == pytest.approx(0.5, rel=1e-9)
    assert r["w4"] == 1.0
    cfg = get_cost_model(name).config
    batch = cfg.default_batch
    cycles = 144 * math.ceil(56 * 56 * batch / cfg.dpa_rows) * 8
    assert get_cost_model(name).layer_cost(spec, 8, 8)[0] == pytest.approx(cycles / cfg.clock_hz)
    # BISMO-native: per group K = 9 and N = 1, so the DPU array idles while the im2col'd
    # activations (padded to Dk-bit words) stream in: latency follows a, not w, and the
    # 32-bit write-back keeps a floor under it.
    native = bismo_ratios(name, spec, mapping="bismo-native")
    assert 0.5 <= native["a4"] <= 0.62
    assert native["w4"] >= 0.97
    assert get_cost_model(name, mapping="bismo-native").layer_cost(spec, 8, 8)[0] > 2 * (
        cycles / cfg.clock_hz
    )


def test_haq_mapping_drops_the_32bit_write_back():
    # A memory-bound layer (batch-16 FC on the cloud): the native mapping adds the 32-bit
    # results to DRAM traffic, so its 1/1 latency cannot fall as far as HAQ's.
    spec = linear(1280, 1000)
    for name in ("bismo-cloud", "bismo-edge"):
        haq = get_cost_model(name).table([spec]).latency_s[0]
        native = get_cost_model(name, mapping="bismo-native").table([spec]).latency_s[0]
        assert haq[7, 7] / haq[0, 0] > native[7, 7] / native[0, 0], name


def test_unknown_mapping_is_a_clear_error():
    with pytest.raises(ValueError, match="mapping: choose between haq, bismo-native, got 'fpga'"):
        get_cost_model("bismo-cloud", mapping="fpga")


@pytest.mark.parametrize("name", ["bismo-cloud", "bitfusion"])
def test_batch16_fc_layer_is_dominated_by_weight_traffic(name):
    # Each weight is used by only 16 samples: weight bits stream from DRAM slower than the
    # array consumes them, so latency follows w, hardly a (on BitFusion the 8-bit batch
    # overflows the IBUF, so a few partial sums spill: a little a-dependence remains).
    r = ratios(name, linear(1280, 1000), batch=16)
    assert 0.5 <= r["w4"] <= 0.6
    assert r["a4"] >= 0.85
    assert r["a4"] - r["w4"] > 0.3


def test_edge_and_cloud_relative_costs_differ():
    # A MobileNetV2 projection (144 -> 24, K = 144): on the edge FPGA (batch 1) compute is the
    # larger part, so fewer weight bits pay off; on the cloud FPGA (batch 16) the lowered
    # activations, a Dk-padded word per row and bit-plane, bind the fetch stage, and weight
    # bits buy nothing.
    layer = conv(144, 24, 1, 56)
    edge, cloud = ratios("bismo-edge", layer), ratios("bismo-cloud", layer)
    assert edge["w4"] < 0.75
    assert cloud["w4"] > 0.95
    assert cloud["w4"] - edge["w4"] > 0.2
    # And the defaults differ as HAQ's setup does: edge batch 1, cloud batch 16.
    assert (BISMO_EDGE.default_batch, BISMO_CLOUD.default_batch) == (1, 16)


def test_bismo_roofline_matches_hand_computation():
    # 1x1 conv 256 -> 256 at 14x14 on the edge: M = 196, K = 256 = Dk, N = 256.
    spec = conv(256, 256, 1, 14)
    latency_s, _ = get_cost_model("bismo-edge").layer_cost(spec, 8, 8)
    compute_cycles = math.ceil(196 / 8) * math.ceil(256 / 8) * math.ceil(256 / 256) * 8 * 8
    assert latency_s == pytest.approx(compute_cycles / 200e6, rel=1e-12)


def test_bismo_bram_capacity_forces_restreaming():
    # Same layer, less BRAM: neither 8-bit operand fits any more, so one is re-read per tile
    # and the (memory-bound) 1-bit latency grows.
    spec = conv(512, 512, 3, 14)
    roomy = get_cost_model("bismo-edge").layer_cost(spec, 1, 1)[0]
    cramped = get_cost_model("bismo-edge", bram_blocks=8).layer_cost(spec, 1, 1)[0]
    assert cramped > roomy


# --- BitFusion against the paper -----------------------------------------------------------


def test_bitfusion_peak_throughput_matches_paper_architecture():
    # Sharma et al., "Bit Fusion", ISCA 2018 (Sec. III-V): 16 x 32 Fusion Units, each of
    # 16 BitBricks, at 500 MHz; a Fusion Unit performs one 8x8-bit, four 4x4-bit or
    # sixteen 2x2-bit MACs per cycle. Peak = 512 * MACs/FU * 500 MHz, 2 ops per MAC:
    # 8,192 GOPS at 2/2 bits, 2,048 at 4/4 (and at 2/8: also 4 bricks per MAC), 512 at 8/8.
    gops = {bits: 2 * BITFUSION.peak_macs_per_s(*bits) / 1e9 for bits in [(2, 2), (4, 4), (8, 8), (2, 8)]}
    assert gops == {(2, 2): 8192.0, (4, 4): 2048.0, (8, 8): 512.0, (2, 8): 2048.0}


def test_bitfusion_compute_bound_speedup_is_16x_from_8_to_2_bits():
    # The paper's premise: halving both bitwidths quadruples MACs per Fusion Unit, so a
    # compute-bound layer runs 4x faster at 4/4 and 16x at 2/2 than at 8/8. A 3x3 conv with
    # 256 in/out channels at 14x14 and batch 16 keeps BitFusion compute-bound at 2 bits.
    spec = conv(256, 256, 3, 14)
    table = get_cost_model("bitfusion").table([spec])
    lat = table.latency_s[0]
    assert lat[7, 7] / lat[3, 3] == pytest.approx(4.0, rel=1e-9)
    assert lat[7, 7] / lat[1, 1] == pytest.approx(16.0, rel=1e-9)
    # And the model runs at the paper's peak: MACs / (512 FUs * 16 MACs * 500 MHz).
    macs = 16 * spec.macs
    assert lat[1, 1] == pytest.approx(macs / BITFUSION.peak_macs_per_s(2, 2), rel=1e-9)


def test_bitfusion_energy_uses_the_authors_simulator_constants():
    # github.com/hsharma35/bitfusion: core 3,673,500 nW (4x4 synthesis) * 32 / 500 MHz per
    # cycle; CACTI 45 nm energies per 32-bit access of the banks bf_e_conf.ini implies;
    # 15 pJ per DRAM bit (Stats.get_energy); no leakage.
    cfg = BITFUSION
    assert cfg.e_core_cycle_j == pytest.approx(235.104e-12)
    assert (cfg.e_wbuf_read_bit_j, cfg.e_ibuf_write_bit_j, cfg.e_obuf_read_bit_j) == pytest.approx(
        (0.000683701e-9 / 32, 0.00363853e-9 / 32, 0.00106097e-9 / 32))
    assert (cfg.e_dram_bit_j, cfg.static_power_w) == (15e-12, 0.0)
    # A compute-bound layer with every other energy negligible: energy = cycles * core.
    spec = conv(256, 256, 3, 14)
    tiny = {f: 1e-30 for f in ("e_wbuf_read_bit_j", "e_wbuf_write_bit_j", "e_ibuf_read_bit_j",
                               "e_ibuf_write_bit_j", "e_obuf_read_bit_j", "e_obuf_write_bit_j",
                               "e_dram_bit_j")}
    model = get_cost_model("bitfusion", **tiny)
    latency_s, energy_j = model.layer_cost(spec, 8, 8)
    assert energy_j == pytest.approx(latency_s * cfg.clock_hz * cfg.e_core_cycle_j, rel=1e-9)
    # Leakage is an override: static power times latency on top.
    leaky = get_cost_model("bitfusion", static_power_w=0.243).layer_cost(spec, 8, 8)[1]
    default = get_cost_model("bitfusion").layer_cost(spec, 8, 8)[1]
    assert leaky == pytest.approx(default + 0.243 * latency_s)


def test_bitfusion_fuses_in_powers_of_two():
    # 3-bit operands occupy a 4-bit fusion (2 bricks), 5 to 8-bit an 8-bit one (4 bricks).
    lat = get_cost_model("bitfusion").table([conv(256, 256, 3, 14)]).latency_s[0]
    assert lat[2, 2] == lat[3, 3] and lat[4, 4] == lat[7, 7] and lat[0, 0] == lat[1, 1]


def test_natural_bits_are_the_widths_compute_tells_apart():
    from hardware import cost_model_natural_bits

    model = get_cost_model("bitfusion")
    assert model.natural_bits == cost_model_natural_bits("bitfusion") == (2, 4, 8)
    assert get_cost_model("bismo-edge").natural_bits is None  # bit-serial: every bit counts
    assert cost_model_natural_bits("bismo-cloud") is None and cost_model_natural_bits("table") is None
    # On a compute-bound layer every width costs what the next natural width costs, and
    # natural widths differ from each other.
    lat = model.table([conv(256, 256, 3, 14)]).latency_s[0]
    natural = model.natural_bits
    for b in range(1, 9):
        up = min(n for n in natural if n >= b)
        assert lat[b - 1, 7] == lat[up - 1, 7] and lat[7, b - 1] == lat[7, up - 1]
    assert len({lat[n - 1, n - 1] for n in natural}) == len(natural)


def test_energy_per_mac_grows_with_bits():
    for name in ("bismo-edge", "bismo-cloud", "bitfusion"):
        energy = get_cost_model(name).table([conv(256, 256, 3, 14)]).energy_j[0]
        assert energy[7, 7] > energy[3, 3] > energy[1, 1] > 0, name


# --- the table model: bring-your-own measurements -----------------------------------------


NET = [conv(3, 16, 3, 32, name="stem"), depthwise(16, 32, name="dw"), linear(16, 10, name="fc")]


def test_table_from_npy(tmp_path):
    latency = monotone_table(3, 0)
    np.save(tmp_path / "lat.npy", latency)
    np.save(tmp_path / "en.npy", latency.reshape(3, 64) * 2)  # [L, 64] is accepted too
    model = get_cost_model("table", path=tmp_path / "lat.npy", energy_path=tmp_path / "en.npy")
    table = model.table(NET)
    np.testing.assert_array_equal(table.latency_s, latency)
    np.testing.assert_array_equal(table.energy_j, latency * 2)
    assert model.layer_cost(NET[1], 3, 5) == (latency[1, 2, 4], 2 * latency[1, 2, 4])


def test_table_from_csv_rows(tmp_path):
    latency = monotone_table(3, 0)
    lines = ["layer,w_bits,a_bits,latency_s,energy_j"]
    for layer in reversed(range(3)):  # any row order
        for w in BITS:
            for a in BITS:
                value = float(latency[layer, w - 1, a - 1])
                lines.append(f"{layer},{w},{a},{value!r},{value * 3!r}")
    (tmp_path / "t.csv").write_text("\n".join(lines) + "\n")
    table = get_cost_model("table", path=tmp_path / "t.csv").table(NET)
    np.testing.assert_array_equal(table.latency_s, latency)
    np.testing.assert_allclose(table.energy_j, latency * 3)


def test_table_without_energy_reports_zero_energy(tmp_path):
    np.save(tmp_path / "lat.npy", monotone_table(3, 0))
    model = get_cost_model("table", path=tmp_path / "lat.npy")
    assert not model.has_energy
    assert np.all(model.table(NET).energy_j == 0)


def test_table_layer_count_mismatch_is_a_clear_error(tmp_path):
    np.save(tmp_path / "lat.npy", monotone_table(5, 0))
    model = get_cost_model("table", path=tmp_path / "lat.npy")
    with pytest.raises(ValueError, match="expected 5 layers.*got a model with 3"):
        model.table(NET)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("layer,w_bits,a_bits,latency_s\n0,1,1,0.1\n", "each of 1 layers x 64"),
        ("0,9,1,0.1\n", r"w_bits must be integers in \[1, 8\]"),
        ("0,1,1\n", "expected 4 or 5 columns"),
        ("x,1,1,2\n", "expected numeric rows"),
    ],
)
def test_table_csv_errors(tmp_path, content, message):
    (tmp_path / "t.csv").write_text(content)
    with pytest.raises(ValueError, match=message):
        get_cost_model("table", path=tmp_path / "t.csv")


def test_table_file_errors(tmp_path):
    with pytest.raises(ValueError, match="file not found"):
        get_cost_model("table", path=tmp_path / "missing.npy")
    with pytest.raises(ValueError, match="expected path="):
        get_cost_model("table")
    np.save(tmp_path / "bad.npy", np.zeros((2, 8, 7)))
    with pytest.raises(ValueError, match=r"expected shape \[L, 8, 8\].*got \[2, 8, 7\]"):
        get_cost_model("table", path=tmp_path / "bad.npy")
    np.save(tmp_path / "neg.npy", -np.ones((2, 8, 8)))
    with pytest.raises(ValueError, match="finite and non-negative"):
        get_cost_model("table", path=tmp_path / "neg.npy")


def test_table_layer_cost_needs_known_layer(tmp_path):
    np.save(tmp_path / "lat.npy", monotone_table(3, 0))
    model = get_cost_model("table", path=tmp_path / "lat.npy")
    with pytest.raises(ValueError, match="unknown layer 'stem'"):
        model.layer_cost(NET[0], 8, 8)
    named = get_cost_model("table", path=tmp_path / "lat.npy", layer_names=["stem", "dw", "fc"])
    assert named.layer_cost(NET[2], 8, 8)[0] == monotone_table(3, 0)[2, 7, 7]
    with pytest.raises(ValueError, match="measured at batch 1, got 16"):
        named.table(NET, 16)
