"""BitFusion: a bit-level dynamically composable systolic array (Sharma et al., ISCA 2018).

The array has 16 x 32 Fusion Units (FUs), each made of 16 2-bit x 2-bit BitBricks
that fuse into one 8x8 multiplier, four 4x4 (or 8x2) ones, or sixteen 2x2 ones:
an FU does ``16 / (bricks(w) * bricks(a))`` MACs per cycle, where ``bricks(b)`` is
the number of 2-bit slices a ``b``-bit operand needs, rounded up to the fusion
granularity the hardware supports (1, 2 or 4 slices: 2, 4 or 8 bits). 1-bit
operands run as 2-bit ones; 3-bit as 4-bit; 5 to 7-bit as 8-bit (the authors'
simulator, ``Simulator.get_perf_factor``, does the same). Inputs enter the 16 rows
(the reduction), outputs leave the 32 columns; fused products inside an FU extend
the reduction, so one cycle covers ``16 * MACs-per-FU`` of ``K`` for 32 outputs.

Memory: the input feature map, weights and outputs stream between DRAM
(192 bit/cycle) and three on-chip buffers (IBUF, WBUF, OBUF), double-buffered;
im2col patches are formed on chip from the IBUF, so DRAM sees the feature map
once per pass, not the lowered matrix. Outputs leave requantized to the layer's
activation precision (each BitFusion layer declares its output precision).

Constants are from the paper and from the authors' simulator configuration for
the comparison with Eyeriss (github.com/hsharma35/bitfusion, ``bf_e_conf.ini``).

Energy follows the authors' simulator (``Simulator.get_energy_cost`` and
``Stats.get_energy``): a dynamic core energy per compute cycle from their synthesis
results (``results/systolic_array_synth.csv``), per-bit read and write energies of the
three buffers from their CACTI sweep at 45 nm (``bitfusion/sram/cacti_sweep.csv``, for
the bank sizes ``bf_e_conf.ini`` implies), and 15 pJ per DRAM bit. Like theirs, the
default counts no leakage (``static_power_w=0``); their CACTI and synthesis numbers put
it at ~0.24 W, available as an override. The per-bit buffer energies belong to the
configured buffer sizes: overriding a size does not rescale them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._analytic import AnalyticCostModel
from ._cost import BITS, MAX_BITS
from ._gemm import bit_arrays, ceil_div, gemm_shapes, streamed_bits
from ._layers import LayerSpec
from ._registry import register_cost_model

KIB = 1024
# Partial sums are 32-bit in the OBUF (authors' simulator: obuf_bits = 32).
PSUM_BITS = 32
# The authors' simulator halves every buffer for double buffering.
DOUBLE_BUFFER_FRACTION = 1 / 2
# Fusion granularity: 2-bit slices per operand, rounded up to 1, 2 or 4.
_BRICKS_BY_BITS = np.array([0, 1, 1, 2, 2, 4, 4, 4, 4], dtype=np.float64)

# --- Energy constants of the authors' simulator (github.com/hsharma35/bitfusion) -----------
# Buffers are banked as Simulator.get_energy_cost does for bf_e_conf.ini (a = N = 16,
# c = M = 32, high_prec 8, low_prec 2): WBUF 512 banks (N * M) of 128 B, IBUF 16 banks (N)
# of 2 KB, OBUF 32 banks (M) of 512 B with a read-write port, all with 32-bit words
# (pmax * pmax / pmin = 32; OBUF: obuf_bits = 32). Per-bit energy = the CACTI row's
# energy per access / 32 bits (bitfusion/sram/cacti_sweep.csv, technology 0.045 um):
#   128 B:  read 0.000683701 nJ, write 0.000925317 nJ
#   2048 B: read 0.00190318 nJ,  write 0.00363853 nJ
#   512 B (rw port): read 0.00106097 nJ, write 0.00233869 nJ
_NJ = 1e-9
_WORD_BITS = 32
E_WBUF_READ_BIT_J = 0.000683701 * _NJ / _WORD_BITS  # 0.0214 pJ/bit
E_WBUF_WRITE_BIT_J = 0.000925317 * _NJ / _WORD_BITS  # 0.0289 pJ/bit
E_IBUF_READ_BIT_J = 0.00190318 * _NJ / _WORD_BITS  # 0.0595 pJ/bit
E_IBUF_WRITE_BIT_J = 0.00363853 * _NJ / _WORD_BITS  # 0.1137 pJ/bit
E_OBUF_READ_BIT_J = 0.00106097 * _NJ / _WORD_BITS  # 0.0332 pJ/bit
E_OBUF_WRITE_BIT_J = 0.00233869 * _NJ / _WORD_BITS  # 0.0731 pJ/bit
# Core: results/systolic_array_synth.csv has no 16x32 row, so the simulator scales the
# 4x4 array (8-bit max, 2-bit min precision, 500 MHz) by N * M / 16 = 32: dynamic power
# 3,673,500 nW * 32 / 500 MHz = 235 pJ per cycle for the whole array.
E_CORE_CYCLE_J = 3_673_500e-9 * (16 * 32 / 16) / 500e6
# Stats.get_energy(dram_cost=15.e-3): 15 pJ per DRAM bit read or written.
E_DRAM_BIT_J = 15e-12
# Leakage the simulator does not count: core 949,240 nW * 32 = 30.4 mW, and the CACTI
# banks' leak_power_mW times bank count: WBUF 0.249588 * 512 = 127.8 mW, IBUF
# 3.22997 * 16 = 51.7 mW, OBUF 1.03183 * 32 = 33.0 mW; 242.9 mW in all.
LEAKAGE_W = 0.0304 + 0.1278 + 0.0517 + 0.0330


def bricks(bits) -> np.ndarray:
    """2-bit BitBrick slices one ``bits``-wide operand occupies (1, 2 or 4)."""
    return _BRICKS_BY_BITS[np.asarray(bits, dtype=np.int64)]


# The widths the fusion distinguishes: the widest width at each brick count (2, 4, 8).
# 1 bit computes as 2, 3 as 4, 5-7 as 8, so a search need not spend trials on them.
NATURAL_BITS = tuple(int(b) for b in BITS if b == MAX_BITS or bricks(b + 1) > bricks(b))


@dataclass(frozen=True)
class BitFusionConfig:
    rows: int = 16  # FUs per column: reduction inputs per cycle at 8 bits (paper, Sec. 5)
    cols: int = 32  # FUs per row: outputs per cycle (paper; bf_e_conf.ini a=16, c=32)
    bricks_per_fu: int = 16  # 4 x 4 BitBricks of 2x2 bits per Fusion Unit (paper, Fig. 4)
    clock_hz: float = 500e6  # paper, 45 nm synthesis; conf.ini frequency
    dram_bits_per_cycle: float = 192  # bf_e_conf.ini if_width
    wbuf_bytes: int = 64 * KIB  # bf_e_conf.ini Wgt_SRAM
    ibuf_bytes: int = 32 * KIB  # bf_e_conf.ini Act_SRAM
    obuf_bytes: int = 16 * KIB  # bf_e_conf.ini Out_SRAM
    # Energy: the authors' simulator constants (above). The whole array burns the same
    # energy per compute cycle at any precision; at 4 or 2 bits it serves 4 or 16 times
    # the products, so energy per MAC falls with bricks(w) * bricks(a).
    e_core_cycle_j: float = E_CORE_CYCLE_J
    e_wbuf_read_bit_j: float = E_WBUF_READ_BIT_J
    e_wbuf_write_bit_j: float = E_WBUF_WRITE_BIT_J
    e_ibuf_read_bit_j: float = E_IBUF_READ_BIT_J
    e_ibuf_write_bit_j: float = E_IBUF_WRITE_BIT_J
    e_obuf_read_bit_j: float = E_OBUF_READ_BIT_J
    e_obuf_write_bit_j: float = E_OBUF_WRITE_BIT_J
    e_dram_bit_j: float = E_DRAM_BIT_J
    static_power_w: float = 0.0  # the authors' energy has no leakage; LEAKAGE_W to add it
    # The authors' benchmarks (src/benchmarks/benchmarks.py) all run at batch 16.
    default_batch: int = 16

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            ok = value >= 0 if field.name == "static_power_w" else value > 0
            if not ok:
                kind = "non-negative" if field.name == "static_power_w" else "positive"
                raise ValueError(f"{field.name}: expected a {kind} number, got {value!r}")

    @property
    def fusion_units(self) -> int:
        return self.rows * self.cols

    def peak_macs_per_s(self, w_bits: int, a_bits: int) -> float:
        """Array throughput when every FU is busy: 512 * 16 / (bricks(w) * bricks(a)) * f."""
        per_fu = self.bricks_per_fu / float(bricks(w_bits) * bricks(a_bits))
        return self.fusion_units * per_fu * self.clock_hz


BITFUSION = BitFusionConfig()


class BitFusionCostModel(AnalyticCostModel):
    """Roofline model of BitFusion (see the module docstring)."""

    natural_bits = NATURAL_BITS

    def grid_costs(
        self, specs: Sequence[LayerSpec], w_bits, a_bits, batch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.config
        w, a, ndim = bit_arrays(w_bits, a_bits)
        g = gemm_shapes(specs, batch, ndim)

        # Compute: per group, M rows stream through ceil(N/32) column tiles, each
        # reducing 16 * MACs-per-FU elements of K per cycle.
        macs_per_fu = cfg.bricks_per_fu / (bricks(w) * bricks(a))
        k_tiles = ceil_div(g.k, cfg.rows * macs_per_fu)
        n_tiles = ceil_div(g.n, cfg.cols)
        compute_cycles = g.groups * g.m * n_tiles * k_tiles

        # DRAM: feature map, weights and (requantized) outputs per group, with re-streaming
        # when neither operand fits its (double-buffered) buffer.
        act_bits = g.input_elems * a
        wgt_bits = g.n * g.k * w
        out_bits = g.m * g.n * a
        ibuf_cap = cfg.ibuf_bytes * 8 * DOUBLE_BUFFER_FRACTION
        wbuf_cap = cfg.wbuf_bytes * 8 * DOUBLE_BUFFER_FRACTION
        psum_bits = g.m * g.n * PSUM_BITS
        dram_bits = g.groups * (streamed_bits(act_bits, wgt_bits, ibuf_cap, wbuf_cap, psum_bits) + out_bits)
        memory_cycles = dram_bits / cfg.dram_bits_per_cycle

        latency_s = np.maximum(compute_cycles, memory_cycles) / cfg.clock_hz

        # Energy by buffer, at the authors' per-bit costs. Each FU reads its weights from
        # its own WBUF bank once per MAC; activations are read from the IBUF once per
        # column tile and shared along the row; partial sums are read and written in the
        # OBUF once per K tile. Every bit fetched from DRAM is written into a buffer: the
        # weights once into the WBUF, the rest (activations, re-streamed tiles, spilled
        # partial sums) into the IBUF, the dearer write (both are < 1% of the 15 pJ DRAM
        # bit); the outputs leave through the OBUF.
        out_dram_bits = g.groups * out_bits
        wgt_dram_bits = g.groups * wgt_bits
        buffer_j = (
            g.macs * w * cfg.e_wbuf_read_bit_j
            + g.groups * g.m * g.k * a * n_tiles * cfg.e_ibuf_read_bit_j
            + g.groups * g.m * g.n * k_tiles * PSUM_BITS * (cfg.e_obuf_read_bit_j + cfg.e_obuf_write_bit_j)
            + wgt_dram_bits * cfg.e_wbuf_write_bit_j
            + (dram_bits - out_dram_bits - wgt_dram_bits) * cfg.e_ibuf_write_bit_j
            + out_dram_bits * cfg.e_obuf_read_bit_j
        )
        energy_j = (
            compute_cycles * cfg.e_core_cycle_j
            + buffer_j
            + dram_bits * cfg.e_dram_bit_j
            + cfg.static_power_w * latency_s
        )
        return latency_s, energy_j


_DESCRIPTION = "BitFusion (ISCA 2018): 16x32 fusible 2-bit BitBrick array, 500 MHz, 45 nm, batch 16"


@register_cost_model("bitfusion", _DESCRIPTION, natural_bits=NATURAL_BITS)
def bitfusion(**overrides) -> BitFusionCostModel:
    """Build the model; keyword arguments override fields of its ``BitFusionConfig``."""
    known = {f.name for f in dataclasses.fields(BitFusionConfig)}
    unknown = sorted(set(overrides) - known)
    if unknown:
        raise ValueError(
            f"bitfusion: unknown option(s) {', '.join(unknown)}: choose between {', '.join(sorted(known))}"
        )
    return BitFusionCostModel(name="bitfusion", description=_DESCRIPTION,
                              config=dataclasses.replace(BITFUSION, **overrides))
