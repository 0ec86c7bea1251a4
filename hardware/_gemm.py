"""Shared pieces of the analytic models: per-layer GEMM shapes and energy constants.

Every analytic model views a layer as ``groups`` independent GEMMs after im2col
(DESIGN.md, "Hardware models"): per group ``M = out_h * out_w * batch`` rows,
``K = (in_ch / groups) * kh * kw`` reduction length and ``N = out_ch / groups``
columns. Shapes are built once per call as ``[L, 1, ..., 1]`` float64 arrays so
they broadcast against bit arrays of any shape; all further math is numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._layers import LayerSpec

# --- Energy per bit moved, by level of the memory hierarchy -------------------------------
# Eyeriss (Chen, Emer, Sze, ISCA 2016, Fig. 1 / Table IV) normalizes one access at each level
# to the energy of a MAC: register file 1x, global buffer (~100 KB) 6x, DRAM 200x. We anchor the
# DRAM end at 20 pJ/bit: Horowitz (ISSCC 2014, "Computing's energy problem", 45 nm) gives
# 1.3-2.6 nJ per 64-bit DRAM access, i.e. 20-41 pJ/bit; we take the low end (DDR3).
E_DRAM_BIT_J = 20e-12
E_SRAM_BIT_J = E_DRAM_BIT_J * 6 / 200  # 0.6 pJ/bit for a ~100 KB buffer (Eyeriss ratio)
E_REG_BIT_J = E_DRAM_BIT_J / 200  # 0.1 pJ/bit for a register file / scratchpad access
# Horowitz (ISSCC 2014, 45 nm, 0.9 V): 8-bit integer add 0.03 pJ.
E_ADD8_J = 0.03e-12

BITS_PER_BYTE = 8


@dataclass(frozen=True)
class GemmShapes:
    """Per-layer GEMM dimensions as float64 arrays of shape ``[L, 1, ..., 1]``.

    ``m`` already includes the batch. ``input_elems`` is the number of input feature-map
    elements per group (whole batch): what a model that forms im2col patches on chip
    reads from DRAM, instead of the ``m * k`` lowered matrix.
    """

    m: np.ndarray
    k: np.ndarray
    n: np.ndarray
    groups: np.ndarray
    input_elems: np.ndarray  # per group, whole batch
    macs: np.ndarray  # whole layer, whole batch


def gemm_shapes(specs: Sequence[LayerSpec], batch: int, bit_ndim: int) -> GemmShapes:
    """GEMM view of ``specs`` at ``batch``, shaped to broadcast over ``bit_ndim`` bit axes."""
    if len(specs) == 0:
        raise ValueError("specs: expected at least one LayerSpec, got none")
    rows = np.array(
        [(s.gemm_m, s.gemm_k, s.gemm_n, s.groups, s.input_elements) for s in specs],
        dtype=np.float64,
    )
    shape = (len(specs),) + (1,) * bit_ndim
    m, k, n, groups, inputs = (rows[:, i].reshape(shape) for i in range(5))
    m = m * batch
    return GemmShapes(
        m=m, k=k, n=n, groups=groups,
        input_elems=inputs * batch / groups,
        macs=groups * m * k * n,
    )


def bit_arrays(w_bits, a_bits) -> tuple[np.ndarray, np.ndarray, int]:
    """``w_bits``/``a_bits`` as float64 arrays with a leading layer axis, and their bit ndim."""
    w = np.asarray(w_bits, dtype=np.float64)
    a = np.asarray(a_bits, dtype=np.float64)
    ndim = len(np.broadcast_shapes(w.shape, a.shape))
    return w.reshape((1,) + (1,) * (ndim - w.ndim) + w.shape), \
        a.reshape((1,) + (1,) * (ndim - a.ndim) + a.shape), ndim


def ceil_div(x: np.ndarray, y) -> np.ndarray:
    return np.ceil(x / y)


def streamed_bits(lhs_bits: np.ndarray, rhs_bits: np.ndarray, lhs_cap_bits: float,
                  rhs_cap_bits: float, psum_bits: np.ndarray) -> np.ndarray:
    """DRAM bits moved to multiply two operands with on-chip buffers of limited size.

    If both operands fit their buffers, each is read once. Otherwise the scheduler
    picks the cheapest of three standard tilings:

    - keep a tile of the RHS resident, re-stream the whole LHS once per RHS tile;
    - keep a tile of the LHS resident, re-stream the whole RHS once per LHS tile;
    - split the reduction (K) into slices small enough for one operand's buffer, keep
      that slice resident while the other operand's slice streams past once, and
      spill/reload the partial sums (``psum_bits`` per pass) between slices.

    Non-decreasing in both operand sizes, as it must be for costs to fall when bits fall.
    """
    rhs_tiles = np.maximum(1.0, np.ceil(rhs_bits / rhs_cap_bits))
    lhs_tiles = np.maximum(1.0, np.ceil(lhs_bits / lhs_cap_bits))
    k_slices = np.minimum(lhs_tiles, rhs_tiles)
    return np.minimum(
        np.minimum(rhs_bits + lhs_bits * rhs_tiles, lhs_bits + rhs_bits * lhs_tiles),
        lhs_bits + rhs_bits + 2 * (k_slices - 1) * psum_bits,
    )
