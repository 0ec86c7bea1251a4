"""The cost-model contract: ``CostModel``, ``CostTable`` and ``Costs``.

Every cost a searcher, a budget or a trial needs comes from one ``CostTable``,
built once per search: per layer, the latency and energy of every (w_bits,
a_bits) pair, so evaluating a policy is a gather and a sum, never a simulator
call in a hot path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from ._layers import LayerSpec

MIN_BITS = 1
MAX_BITS = 8
NUM_BITS = MAX_BITS - MIN_BITS + 1
BITS = np.arange(MIN_BITS, MAX_BITS + 1)
# Model size is reported in MiB (2**20 bytes), as HAQ's code does.
BYTES_PER_MB = 1024 * 1024
SECONDS_PER_MS = 1e-3
JOULES_PER_MJ = 1e-3

# Policies are scored in chunks so every intermediate array stays in L2 cache.
_EVAL_CHUNK = 2048
# Two layers share one gather: a pair table has 64 x 64 (w, a, w', a') entries.
_PAIR = 2


@dataclass(frozen=True)
class Costs:
    """Costs of N policies, each an ``[N]`` float64 array."""

    latency_ms: np.ndarray
    energy_mj: np.ndarray
    size_mb: np.ndarray

    def metric(self, name: str) -> np.ndarray:
        return getattr(self, name)


def check_policies(policies, num_layers: int) -> np.ndarray:
    """Return ``policies`` as an int array ``[N, L, 2]``; raise ValueError if malformed."""
    arr = np.asarray(policies)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3 or arr.shape[1:] != (num_layers, 2):
        raise ValueError(
            f"policies: expected shape [N, {num_layers}, 2] (w_bits, a_bits per layer), "
            f"got {list(np.shape(policies))}"
        )
    if not np.issubdtype(arr.dtype, np.integer):
        if not np.all(np.equal(np.mod(arr, 1), 0)):
            raise ValueError("policies: bits must be integers")
        arr = arr.astype(np.int64)
    if arr.size and (arr.min() < MIN_BITS or arr.max() > MAX_BITS):
        raise ValueError(
            f"policies: bits must be in [{MIN_BITS}, {MAX_BITS}], got values in "
            f"[{arr.min()}, {arr.max()}]"
        )
    return arr


class CostTable:
    """Latency and energy of every layer at every (w_bits, a_bits), plus weight counts.

    ``latency_s[l, w - 1, a - 1]`` is layer ``l``'s latency in seconds at ``w``
    weight bits and ``a`` activation bits (same for ``energy_j``); ``weights[l]``
    its weight count. ``evaluate`` scores many policies with one gather + sum.
    """

    def __init__(
        self,
        latency_s: np.ndarray,
        energy_j: np.ndarray,
        weights: np.ndarray,
        *,
        layer_names: Sequence[str] | None = None,
        hardware: str = "",
        batch: int = 1,
    ) -> None:
        latency_s = np.asarray(latency_s, dtype=np.float64)
        energy_j = np.asarray(energy_j, dtype=np.float64)
        weights = np.asarray(weights, dtype=np.int64)
        num_layers = weights.shape[0]
        expected = (num_layers, NUM_BITS, NUM_BITS)
        for label, arr in (("latency_s", latency_s), ("energy_j", energy_j)):
            if arr.shape != expected:
                raise ValueError(f"{label}: expected shape {list(expected)}, got {list(arr.shape)}")
            if not np.all(np.isfinite(arr)) or np.any(arr < 0):
                raise ValueError(f"{label}: expected finite non-negative values")
        if weights.ndim != 1 or num_layers == 0 or np.any(weights < 0):
            raise ValueError("weights: expected a non-empty 1-D array of non-negative counts")
        self.latency_s = latency_s
        self.energy_j = energy_j
        self.weights = weights
        self.layer_names = list(layer_names) if layer_names is not None else [
            f"layer{i}" for i in range(num_layers)
        ]
        self.hardware = hardware
        self.batch = batch
        self._mb_per_weight_bit = weights.astype(np.float64) / 8.0 / BYTES_PER_MB
        self._fast: _PairTables | None = None  # built on first evaluate(), never pickled

    def __getstate__(self) -> dict:
        # The evaluate() tables are derived data (~1 MB for MobileNetV2): rebuild, don't ship.
        return {**self.__dict__, "_fast": None}

    @property
    def num_layers(self) -> int:
        return int(self.weights.shape[0])

    def evaluate(self, policies) -> Costs:
        """Costs of ``policies`` (``[N, L, 2]`` or ``[L, 2]`` ints in [1, 8]).

        Vectorized over policies in cache-sized chunks; ``uint8`` input is the fastest
        (no conversion). Sums are float32 (within ~1e-6 relative of ``layer_costs``).
        """
        pol = np.asarray(policies)
        if pol.ndim == 2:
            pol = pol[None]
        if pol.ndim != 3 or pol.shape[1:] != (self.num_layers, 2):
            raise ValueError(
                f"policies: expected shape [N, {self.num_layers}, 2] (w_bits, a_bits per layer), "
                f"got {list(np.shape(policies))}"
            )
        if not np.issubdtype(pol.dtype, np.integer):
            pol = check_policies(pol, self.num_layers)  # floats: integral and in range
        if self._fast is None:
            self._fast = _PairTables(self)
        return self._fast.evaluate(pol)

    def layer_costs(self, policy) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-layer (latency_ms, energy_mj, size_mb) of one policy ``[L, 2]``, float64."""
        pol = check_policies(policy, self.num_layers)[0]
        rows = np.arange(self.num_layers)
        w, a = pol[:, 0] - MIN_BITS, pol[:, 1] - MIN_BITS
        return (
            self.latency_s[rows, w, a] / SECONDS_PER_MS,
            self.energy_j[rows, w, a] / JOULES_PER_MJ,
            self._mb_per_weight_bit * pol[:, 0],
        )

    def uniform(self, w_bits: int, a_bits: int | None = None) -> np.ndarray:
        """The policy with every layer at ``w_bits`` / ``a_bits`` (default: same)."""
        a_bits = w_bits if a_bits is None else a_bits
        pol = np.empty((self.num_layers, 2), dtype=np.int64)
        pol[:, 0], pol[:, 1] = w_bits, a_bits
        return pol


@runtime_checkable
class CostModel(Protocol):
    """A hardware cost model: per-layer latency and energy at given bitwidths."""

    name: str
    description: str
    default_batch: int

    def layer_cost(self, spec: LayerSpec, w_bits: int, a_bits: int, batch: int) -> tuple[float, float]:
        """(latency_s, energy_j) of one layer for a batch of ``batch`` samples."""
        ...

    def table(self, specs: Sequence[LayerSpec], batch: int | None = None) -> CostTable:
        """The ``CostTable`` of ``specs`` (batch defaults to ``default_batch``)."""
        ...


def _raise_out_of_range(pol: np.ndarray) -> None:
    raise ValueError(
        f"policies: bits must be in [{MIN_BITS}, {MAX_BITS}], got values in [{pol.min()}, {pol.max()}]"
    )


class _PairTables:
    """``CostTable.evaluate``'s fast path: one gather per *pair* of layers.

    Layers are padded to an even count (a zero-cost layer) and paired; pair ``p``
    has a table of 64 x 64 complex64 entries ``latency_ms + 1j * energy_mj`` of both
    layers together, indexed by a 12-bit code built from the four policy bytes with
    integer ops on a ``uint32`` view (no per-layer Python loop, half the gathers of a
    per-layer table). The complex pair sums are reduced with one float32 matmul, and
    the size with another.
    """

    def __init__(self, table: CostTable) -> None:
        num_layers = table.num_layers
        self.num_layers = num_layers
        self.padded = num_layers + num_layers % _PAIR
        self.pairs = self.padded // _PAIR
        cells = NUM_BITS * NUM_BITS
        # Per-layer code c = (w - 1) | (a - 1) << 3; the tables are [w - 1, a - 1], so
        # code order is the transposed (a-major) flattening.
        per_layer = np.zeros((self.padded, cells), dtype=np.complex128)
        per_layer[:num_layers] = (
            table.latency_s / SECONDS_PER_MS + 1j * (table.energy_j / JOULES_PER_MJ)
        ).transpose(0, 2, 1).reshape(num_layers, cells)
        first, second = per_layer[0::_PAIR], per_layer[1::_PAIR]
        # Pair code = c_first | c_second << 6: rows follow c_second, columns c_first.
        pair = second[:, :, None] + first[:, None, :]
        self.table = pair.astype(np.complex64).reshape(-1)
        self.offsets = np.arange(self.pairs, dtype=np.intp) * cells * cells
        # [re, im, re, im, ...] @ select -> (sum of re, sum of im).
        self.select = np.zeros((2 * self.pairs, 2), dtype=np.float32)
        self.select[0::2, 0] = 1.0
        self.select[1::2, 1] = 1.0
        self.mb_per_weight_bit = np.zeros(self.padded, dtype=np.float32)
        self.mb_per_weight_bit[:num_layers] = table._mb_per_weight_bit

    def evaluate(self, pol: np.ndarray) -> Costs:
        n = pol.shape[0]
        latency = np.empty(n, dtype=np.float64)
        energy = np.empty(n, dtype=np.float64)
        size = np.empty(n, dtype=np.float64)
        chunk = min(_EVAL_CHUNK, max(n, 1))
        width = 2 * self.num_layers
        # Scratch buffers reused by every chunk; bytes beyond ``width`` are the padding
        # layer's (1, 1), whose table entries are zero.
        buf = np.ones((chunk, 2 * self.padded), dtype=np.uint8)
        codes = np.empty((chunk, self.pairs), dtype=np.uint32)
        high = np.empty((chunk, self.pairs), dtype=np.uint32)
        idx = np.empty((chunk, self.pairs), dtype=np.intp)
        gathered = np.empty((chunk, self.pairs), dtype=np.complex64)
        sums = np.empty((chunk, 2), dtype=np.float32)
        w_low = np.empty((chunk, self.padded), dtype=np.uint16)
        w_float = np.empty((chunk, self.padded), dtype=np.float32)
        flat = pol.reshape(n, width)
        is_bytes = pol.dtype == np.uint8
        for start in range(0, n, chunk):
            part = flat[start:start + chunk]
            m = part.shape[0]
            if m != chunk:
                buf, codes, high, idx = buf[:m], codes[:m], high[:m], idx[:m]
                gathered, sums, w_low, w_float = gathered[:m], sums[:m], w_low[:m], w_float[:m]
            if not is_bytes and (part.min() < MIN_BITS or part.max() > MAX_BITS):
                _raise_out_of_range(pol)  # checked before the cast below could wrap
            np.copyto(buf[:, :width], part, casting="unsafe")
            # Bytes (w0, a0, w1, a1) of a pair as one little-endian uint32; after
            # subtracting 1 from each byte, fields of 3 bits sit at bits 0, 8, 16, 24.
            quad = buf.view("<u4")
            np.subtract(quad, 0x01010101, out=codes)
            # uint8 input: a byte outside 1..8 leaves a bit set outside its 3-bit field
            # (0 borrows to 0xFF, 9.. sets bit 3); one OR-reduction checks them all.
            if is_bytes and int(np.bitwise_or.reduce(codes, axis=None)) & 0xF8F8F8F8:
                _raise_out_of_range(pol)
            np.right_shift(codes, 5, out=high)
            np.bitwise_or(codes, high, out=codes)  # bits 0-5: c_first, bits 16-21: c_second
            np.right_shift(codes, 10, out=high)
            np.bitwise_and(high, 0x3F << 6, out=high)
            np.bitwise_and(codes, 0x3F, out=codes)
            np.bitwise_or(codes, high, out=codes)
            np.add(self.offsets, codes, out=idx)
            np.take(self.table, idx, out=gathered, mode="clip")  # indices checked above
            np.matmul(gathered.view(np.float32), self.select, out=sums)
            latency[start:start + m] = sums[:, 0]
            energy[start:start + m] = sums[:, 1]
            np.bitwise_and(buf.view("<u2"), 0xFF, out=w_low)
            np.copyto(w_float, w_low)
            size[start:start + m] = w_float @ self.mb_per_weight_bit
        return Costs(latency_ms=latency, energy_mj=energy, size_mb=size)
