"""BISMO: the bit-serial matrix-multiply overlay HAQ runs on an edge and a cloud FPGA.

BISMO (Umuroglu, Rasnayake, Själander, FPL 2018; https://github.com/EECS-NTNU/bismo)
is a ``Dm x Dn`` array of dot-product units (DPUs). Each cycle every DPU ANDs a
``Dk``-bit word of one LHS bit-plane with a ``Dk``-bit word of one RHS bit-plane and
accumulates the popcount, shifted by the planes' weights. A product of ``w``-bit and
``a``-bit matrices therefore takes ``w * a`` binary GEMMs, the source of the
``w * a`` scaling. Operands are fetched from DRAM into BRAM by a fetch stage, results
(32-bit accumulators) written back by a result stage; the three stages overlap, so a
layer takes ``max(compute, memory)`` cycles (roofline).

Mapping (DESIGN.md): a convolution is lowered by im2col on the host, so the LHS is
the ``M x K`` lowered activation matrix (``M = out_h * out_w * batch``,
``K = in_ch / groups * kh * kw``) and the RHS the ``N x K`` weights
(``N = out_ch / groups``); a grouped convolution is ``groups`` such GEMMs. BISMO
stores each bit-plane row padded to whole ``Dk``-bit words and each matrix to whole
``Dm``/``Dn`` row tiles (``BitSerialMatMulExecutor::lhsBytes``), so short
reductions (a depthwise ``K = 9``) move mostly padding.

Two mappings (``mapping=``), because HAQ's own simulator, whose released cloud table
(mit-han-lab/haq, ``qmobilenetv2_imagenet100_batch16_latency_table.npy``, shipped here as
the ``haq-cloud-mobilenetv2`` preset) is the only published ground truth, differs from
BISMO's runtime in three conventions:

- ``haq`` (default): what that table shows. A depthwise layer runs channel by channel,
  one activation bit-plane per pass over ``ceil(M / Dm)`` row tiles, so it takes
  ``C * ceil(M / Dm) * a`` cycles (no weight-bit factor: the 9-tap kernel is applied in
  one pass), and its lowered activations are not padded to ``Dk``-bit words. The fetch
  stage writes one ``Dk``-bit BRAM word per cycle (a 1x1 convolution with ``K <= Dk``
  takes exactly ``M * a`` cycles in the table), so DRAM moves at most ``Dk`` bits per
  cycle. The 32-bit results are not charged a DRAM write-back. The cloud instance
  reduces ``K`` in 256-wide chunks (table rows for ``K`` = 96, 144 and 192 are equal;
  384 doubles 192; 576 is 1.5x and 960 is 4/3x of those below them): ``Dk = 256``.
  Against the table this gives uniform speedups within 1% of HAQ's at every bit
  width and a per-layer log-latency correlation of 0.98 (tests/test_haq_table.py).
- ``bismo-native``: BISMO's runtime as documented: every channel of a depthwise layer
  is its own ``N = 1`` GEMM padded to ``Dk``-bit words (so depthwise layers are
  memory-bound and follow ``a`` only), the whole AXI width feeds the fetch stage, 32-bit
  results are written back to DRAM, and the cloud instance uses ``Dk = 1024`` (one
  fetch beat over all four 256-bit ports fills one word). Its uniform speedups vs 8/8
  on MobileNetV2 are far smaller than HAQ's (1.32 / 1.93 / 3.45 / 5.69 at 6 / 4 / 2 / 1
  bits against 1.49 / 2.52 / 5.61 / 11.54): the depthwise padding makes those layers
  ~94% of the latency, and the write-back caps the gain at low bits.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._analytic import AnalyticCostModel
from ._gemm import (
    E_ADD8_J,
    E_DRAM_BIT_J,
    E_REG_BIT_J,
    E_SRAM_BIT_J,
    bit_arrays,
    ceil_div,
    gemm_shapes,
    streamed_bits,
)
from ._layers import LayerSpec
from ._registry import register_cost_model

# One binary op (AND + one full adder of the popcount tree) on FPGA fabric: a 1-bit adder
# is ~1/8 of Horowitz's 8-bit add (0.03 pJ, 45 nm), and FPGA logic burns ~14x the dynamic
# energy of standard cells (Kuon & Rose, "Measuring the gap between FPGAs and ASICs",
# IEEE TCAD 2007). Not rescaled between 28 nm and 16 nm parts: the search compares
# bitwidths on one device, not devices.
E_FPGA_BITOP_J = E_ADD8_J / 8 * 14
# BISMO's result type is a 32-bit integer (ResultType in the BISMO runtime).
ACC_BITS = 32
BRAM36_BITS = 36 * 1024
# BISMO overlaps fetch and execute with two token-synchronized buffers per operand
# (FETCHEXEC_TOKENS), and splits BRAM between LHS and RHS: each operand tile gets 1/4.
BRAM_FRACTION_PER_OPERAND = 1 / 4
# DDR4 (1.2 V) vs DDR3 (1.5 V) I/O + array energy scales ~V^2: 20 pJ/bit * 0.64.
E_DDR4_BIT_J = E_DRAM_BIT_J * (1.2 / 1.5) ** 2
# How layers map onto the array (module docstring): HAQ's simulator or BISMO's runtime.
MAPPINGS = ("haq", "bismo-native")


@dataclass(frozen=True)
class BismoConfig:
    """One BISMO instance: array shape, clock, memory system, energy constants."""

    dpa_rows: int  # Dm: LHS rows per tile
    dpa_cols: int  # Dn: RHS rows (output columns) per tile
    dpu_width_bits: int  # Dk: popcount width, bits of reduction per cycle
    clock_hz: float
    port_bits_per_cycle: float  # sum of the AXI data ports
    dram_bytes_per_s: float  # peak of the DRAM behind the ports
    bram_blocks: int  # 36 Kb block RAMs
    static_power_w: float
    e_bitop_j: float = E_FPGA_BITOP_J
    e_acc_bit_j: float = E_REG_BIT_J
    e_bram_bit_j: float = E_SRAM_BIT_J
    e_dram_bit_j: float = E_DRAM_BIT_J
    default_batch: int = 1
    mapping: str = "haq"

    def __post_init__(self) -> None:
        if self.mapping not in MAPPINGS:
            raise ValueError(f"mapping: choose between {', '.join(MAPPINGS)}, got {self.mapping!r}")
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if field.name != "mapping" and not value > 0:
                raise ValueError(f"{field.name}: expected a positive number, got {value!r}")

    @property
    def bits_per_cycle(self) -> float:
        """Effective DRAM bandwidth: the narrower of the ports and the DRAM itself, and under
        HAQ's mapping at most one ``Dk``-bit BRAM word per cycle (the fetch stage's width)."""
        bits = min(self.port_bits_per_cycle, self.dram_bytes_per_s * 8 / self.clock_hz)
        return min(bits, self.dpu_width_bits) if self.mapping == "haq" else bits

    @property
    def operand_buffer_bits(self) -> float:
        return self.bram_blocks * BRAM36_BITS * BRAM_FRACTION_PER_OPERAND


# Edge: Xilinx Zynq-7020 (PYNQ-Z1), batch 1, as in HAQ (Wang et al., CVPR 2019, Sec. 4).
# 8x256x8 @ 200 MHz is BISMO's largest PYNQ-Z1 build ("6.5 binary TOPS", BISMO repo
# doc/platforms.md). Four 64-bit AXI HP ports = 256 bit/cycle, but the PS DDR controller
# is at most 32-bit DDR3-1066 (Zynq-7000 datasheet DS187): 4.26 GB/s, 170 bit/cycle.
# 140 BRAM36 (Zynq-7000 product table DS190). Static power ~0.15 W for the XC7Z020
# programmable logic (Xilinx Power Estimator, typical process, 25 C).
BISMO_EDGE = BismoConfig(
    dpa_rows=8, dpa_cols=8, dpu_width_bits=256, clock_hz=200e6,
    port_bits_per_cycle=4 * 64, dram_bytes_per_s=32 / 8 * 1066e6,
    bram_blocks=140, static_power_w=0.15, default_batch=1,
)

# Cloud: Xilinx Virtex UltraScale+ VU9P, batch 16, 16x16 DPUs (HAQ). Dk = 256: HAQ's
# released cloud table reduces K in 256-wide chunks (module docstring). Four 256-bit AXI
# ports at 200 MHz = 25.6 GB/s, below the 4 x DDR4-2400 x64 channels of a VU9P card
# (76.8 GB/s), so the ports bind (and under HAQ's mapping the 256-bit fetch stage).
# 2160 BRAM36 (UltraScale+ product table DS890). Static ~2.5 W for the XCVU9P (XPE,
# typical, 25 C).
BISMO_CLOUD = BismoConfig(
    dpa_rows=16, dpa_cols=16, dpu_width_bits=256, clock_hz=200e6,
    port_bits_per_cycle=4 * 256, dram_bytes_per_s=4 * 64 / 8 * 2400e6,
    bram_blocks=2160, static_power_w=2.5, e_dram_bit_j=E_DDR4_BIT_J, default_batch=16,
)
# The BISMO-native cloud build: Dk = 1024 keeps BISMO's rule that one fetch beat over all
# ports fills one Dk-bit BRAM word (edge: 4 x 64 = 256, the documented build; cloud:
# 4 x 256 = 1024); it also fills the VU9P as 8x256x8 fills the Z-7020 (1,182k vs 53.2k
# LUTs: 22x; 16*16*1024 vs 8*8*256 bit-ops: 16x).
BISMO_CLOUD_NATIVE = dataclasses.replace(BISMO_CLOUD, dpu_width_bits=1024, mapping="bismo-native")
BISMO_EDGE_NATIVE = dataclasses.replace(BISMO_EDGE, mapping="bismo-native")


class BismoCostModel(AnalyticCostModel):
    """Roofline model of one BISMO instance (see the module docstring)."""

    def grid_costs(
        self, specs: Sequence[LayerSpec], w_bits, a_bits, batch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        w, a, ndim = bit_arrays(w_bits, a_bits)
        g = gemm_shapes(specs, batch, ndim)
        dm, dn, dk = cfg.dpa_rows, cfg.dpa_cols, cfg.dpu_width_bits

        # Tiles per group; each (LHS tile, RHS tile, Dk chunk) runs once per bit-plane pair.
        m_tiles, n_tiles, k_chunks = ceil_div(g.m, dm), ceil_div(g.n, dn), ceil_div(g.k, dk)
        tile_cycles = g.groups * m_tiles * n_tiles * k_chunks
        compute_cycles = tile_cycles * w * a

        # DRAM footprint per group as BISMO lays it out (rows padded to tiles, K to Dk words).
        k_padded = k_chunks * dk
        lhs_bits = m_tiles * dm * k_padded * a
        rhs_bits = n_tiles * dn * k_padded * w
        result_bits = m_tiles * dm * n_tiles * dn * ACC_BITS
        write_back_bits = result_bits
        if cfg.mapping == "haq":
            # HAQ's simulator (module docstring): depthwise channels one activation
            # bit-plane per pass, unpadded; no write-back of the 32-bit results.
            depthwise = np.array([s.kind == "depthwise" for s in specs]).reshape(g.m.shape)
            compute_cycles = np.where(depthwise, g.groups * m_tiles * a, compute_cycles)
            lhs_bits = np.where(depthwise, g.m * g.k * a, lhs_bits)
            rhs_bits = np.where(depthwise, g.n * g.k * w, rhs_bits)
            write_back_bits = 0.0
        cap = cfg.operand_buffer_bits
        dram_bits = g.groups * (streamed_bits(lhs_bits, rhs_bits, cap, cap, result_bits) + write_back_bits)
        memory_cycles = dram_bits / cfg.bits_per_cycle

        latency_s = np.maximum(compute_cycles, memory_cycles) / cfg.clock_hz

        # Per compute cycle: Dm*Dn*Dk binary ops, Dm*Dn accumulator updates, and one Dk-bit
        # BRAM word read per DPU row and column; every DRAM bit is also written into BRAM.
        per_cycle_j = (
            dm * dn * dk * cfg.e_bitop_j
            + dm * dn * ACC_BITS * cfg.e_acc_bit_j
            + (dm + dn) * dk * cfg.e_bram_bit_j
        )
        energy_j = (
            compute_cycles * per_cycle_j
            + dram_bits * (cfg.e_dram_bit_j + cfg.e_bram_bit_j)
            + cfg.static_power_w * latency_s
        )
        return latency_s, energy_j


def _factory(name: str, description: str, presets: dict[str, BismoConfig]):
    def make(**overrides) -> BismoCostModel:
        """Build the model; ``mapping`` picks the preset (``haq`` or ``bismo-native``), other
        keyword arguments override fields of its ``BismoConfig``."""
        known = {f.name for f in dataclasses.fields(BismoConfig)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ValueError(
                f"{name}: unknown option(s) {', '.join(unknown)}: choose between {', '.join(sorted(known))}"
            )
        mapping = overrides.pop("mapping", "haq")
        if mapping not in presets:
            raise ValueError(f"{name}: mapping: choose between {', '.join(presets)}, got {mapping!r}")
        return BismoCostModel(name=name, description=description,
                              config=dataclasses.replace(presets[mapping], **overrides))

    return register_cost_model(name, description)(make)


_EDGE_DESCRIPTION = "BISMO bit-serial overlay on a Zynq-7020 edge FPGA (8x256x8 DPUs, 200 MHz, batch 1)"
_CLOUD_DESCRIPTION = "BISMO bit-serial overlay on a Virtex UltraScale+ VU9P cloud FPGA (16x256x16 DPUs, 200 MHz, batch 16)"
bismo_edge = _factory("bismo-edge", _EDGE_DESCRIPTION,
                      {"haq": BISMO_EDGE, "bismo-native": BISMO_EDGE_NATIVE})
bismo_cloud = _factory("bismo-cloud", _CLOUD_DESCRIPTION,
                       {"haq": BISMO_CLOUD, "bismo-native": BISMO_CLOUD_NATIVE})
