"""The BISMO simulators against HAQ's own released BISMO-cloud table (the fidelity anchor).

HAQ's table (hardware/presets/, MIT license) prices torchvision's MobileNetV2 at batch 16
on the cloud FPGA. With HAQ's mapping (the default) ``bismo-cloud`` must reproduce its
uniform speedups over 8/8 within 10% at every bit width and its 53 x 64 per-layer
latencies with a log correlation of at least 0.95 (issue 14); the BISMO-native mapping
does not, which is the documented difference between the two.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from hardware import BITS, extract_layers, get_cost_model, haq_cloud_table_path

SPEEDUP_TOLERANCE = 0.10
MIN_LOG_CORRELATION = 0.95
# HAQ's own uniform speedups vs 8/8 at 6 / 4 / 2 / 1 bits, read off the file (issue 14).
HAQ_SPEEDUPS = {6: 1.49, 4: 2.52, 2: 5.61, 1: 11.54}


@pytest.fixture(scope="module")
def mobilenet_v2_layers():
    torchvision = pytest.importorskip("torchvision")
    return extract_layers(torchvision.models.mobilenet_v2(), (3, 224, 224))


@pytest.fixture(scope="module")
def haq_latency_s(mobilenet_v2_layers):
    return get_cost_model("haq-cloud-mobilenetv2").table(mobilenet_v2_layers).latency_s


def uniform_speedups(latency_s: np.ndarray) -> np.ndarray:
    """Total 8/8 latency over total k/k latency, for k = 1..8."""
    totals = latency_s.sum(axis=0)
    return totals[7, 7] / totals[BITS - 1, BITS - 1]


def log_correlation(latency_s: np.ndarray, reference_s: np.ndarray) -> float:
    return float(np.corrcoef(np.log(latency_s.ravel()), np.log(reference_s.ravel()))[0, 1])


def test_preset_is_haqs_file(mobilenet_v2_layers, haq_latency_s):
    raw = np.load(haq_cloud_table_path())
    assert raw.shape == (53, 8, 8) and raw.dtype == np.int64
    assert len(mobilenet_v2_layers) == 53
    # Cycles at 200 MHz, rows in extract_layers order; the first layer at 8/8 is 1,620,752 cycles.
    np.testing.assert_allclose(haq_latency_s, raw / 200e6, rtol=1e-15)
    assert raw[0, 7, 7] == 1_620_752
    speedups = uniform_speedups(haq_latency_s)
    for bits, expected in HAQ_SPEEDUPS.items():
        assert speedups[bits - 1] == pytest.approx(expected, abs=0.005)
    assert (haq_latency_s.shape, np.all(haq_latency_s > 0)) == ((53, 8, 8), True)


def test_bismo_cloud_agrees_with_haqs_table(mobilenet_v2_layers, haq_latency_s):
    table = get_cost_model("bismo-cloud").table(mobilenet_v2_layers)
    assert table.batch == 16
    ratio = uniform_speedups(table.latency_s) / uniform_speedups(haq_latency_s)
    assert np.all(np.abs(ratio - 1) <= SPEEDUP_TOLERANCE), ratio.round(3)
    assert log_correlation(table.latency_s, haq_latency_s) >= MIN_LOG_CORRELATION
    # Absolute time as well: the uniform 8-bit network within 10% of HAQ's cycles.
    total_8 = table.latency_s[:, 7, 7].sum()
    assert total_8 == pytest.approx(haq_latency_s[:, 7, 7].sum(), rel=SPEEDUP_TOLERANCE)


def test_bismo_native_mapping_is_the_documented_difference(mobilenet_v2_layers, haq_latency_s):
    # Depthwise layers padded to Dk = 1024 words plus the 32-bit write-back: the gains at
    # low bits are about half of HAQ's, and the per-layer shape no longer matches.
    native = get_cost_model("bismo-cloud", mapping="bismo-native").table(mobilenet_v2_layers)
    ratio = uniform_speedups(native.latency_s) / uniform_speedups(haq_latency_s)
    assert ratio[0] < 0.6  # 1 bit
    assert log_correlation(native.latency_s, haq_latency_s) < MIN_LOG_CORRELATION


def test_haq_preset_through_the_cost_cli():
    from orchestrator.cost_cli import cost

    args = ["--model", "mobilenet_v2", "--hardware", "haq-cloud-mobilenetv2", "--json"]
    out8 = CliRunner().invoke(cost, [*args, "--bits", "8"])
    out4 = CliRunner().invoke(cost, [*args, "--bits", "4"])
    assert out8.exit_code == 0 and out4.exit_code == 0, out8.output + out4.output
    got8, got4 = json.loads(out8.stdout), json.loads(out4.stdout)
    assert (got8["hardware"], got8["batch"], len(got8["layers"])) == ("haq-cloud-mobilenetv2", 16, 53)
    assert got8["latency_ms"] / got4["latency_ms"] == pytest.approx(HAQ_SPEEDUPS[4], abs=0.005)


def test_haq_preset_takes_no_options():
    with pytest.raises(ValueError, match="unknown option.*path.*it takes none"):
        get_cost_model("haq-cloud-mobilenetv2", path="x.npy")
