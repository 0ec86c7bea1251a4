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

# Policies are gathered in chunks so the index and gathered arrays stay in cache.
_EVAL_CHUNK = 4096


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
        # Flat float32 copies in the units we report; row l starts at l * 64. Float32
        # halves the bytes gathered; sums stay within 1e-6 relative of float64.
        self._flat_latency_ms = (latency_s / SECONDS_PER_MS).astype(np.float32).reshape(-1)
        self._flat_energy_mj = (energy_j / JOULES_PER_MJ).astype(np.float32).reshape(-1)
        self._row_offset = (np.arange(num_layers, dtype=np.int32) * NUM_BITS * NUM_BITS)
        self._mb_per_weight_bit = weights.astype(np.float64) / 8.0 / BYTES_PER_MB

    @property
    def num_layers(self) -> int:
        return int(self.weights.shape[0])

    def evaluate(self, policies) -> Costs:
        """Costs of ``policies`` (``[N, L, 2]`` or ``[L, 2]`` ints in [1, 8])."""
        pol = check_policies(policies, self.num_layers)
        n = pol.shape[0]
        latency = np.empty(n, dtype=np.float64)
        energy = np.empty(n, dtype=np.float64)
        for start in range(0, n, _EVAL_CHUNK):
            chunk = pol[start:start + _EVAL_CHUNK]
            w = chunk[..., 0].astype(np.int32)
            a = chunk[..., 1].astype(np.int32)
            idx = self._row_offset + (w - MIN_BITS) * NUM_BITS + (a - MIN_BITS)
            latency[start:start + len(chunk)] = self._flat_latency_ms[idx].sum(axis=1)
            energy[start:start + len(chunk)] = self._flat_energy_mj[idx].sum(axis=1)
        size = pol[..., 0] @ self._mb_per_weight_bit
        return Costs(latency_ms=latency, energy_mj=energy, size_mb=np.asarray(size, dtype=np.float64))

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
