"""Base class for analytic cost models whose math is vectorized over layers and bits."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ._cost import BITS, MAX_BITS, MIN_BITS, CostTable
from ._layers import LayerSpec


class AnalyticCostModel:
    """Implements ``CostModel`` from one vectorized method, ``grid_costs``.

    Subclasses compute latency and energy for arrays of layers and bits at once;
    ``table`` and ``layer_cost`` both call it, so they agree exactly.
    """

    name: str = ""
    description: str = ""
    default_batch: int = 1
    # The widths the hardware really distinguishes: any other width costs, in compute,
    # what the next natural width above it costs (memory traffic still scales with
    # every bit). None: every width 1-8 has its own cost (bit-serial hardware).
    natural_bits: tuple[int, ...] | None = None

    def __init__(self, *, name: str, description: str, config) -> None:
        """``config``: the accelerator's frozen parameters (a dataclass with ``default_batch``)."""
        self.name = name
        self.description = description
        self.config = config
        self.default_batch = config.default_batch

    def grid_costs(
        self, specs: Sequence[LayerSpec], w_bits: np.ndarray, a_bits: np.ndarray, batch: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """(latency_s, energy_j) broadcast over ``[L, ...]`` for bits arrays ``w_bits``/``a_bits``.

        ``w_bits`` and ``a_bits`` broadcast against each other; the result has shape
        ``(L, *broadcast_shape)``.
        """
        raise NotImplementedError

    def _batch(self, batch: int | None) -> int:
        batch = self.default_batch if batch is None else int(batch)
        if batch < 1:
            raise ValueError(f"batch: expected a positive integer, got {batch}")
        return batch

    def table(self, specs: Sequence[LayerSpec], batch: int | None = None) -> CostTable:
        batch = self._batch(batch)
        w = BITS[:, None]
        a = BITS[None, :]
        latency_s, energy_j = self.grid_costs(specs, w, a, batch)
        return CostTable(
            latency_s, energy_j, np.array([s.weights for s in specs]),
            layer_names=[s.name for s in specs], hardware=self.name, batch=batch,
        )

    def layer_cost(self, spec: LayerSpec, w_bits: int, a_bits: int, batch: int | None = None):
        for label, bits in (("w_bits", w_bits), ("a_bits", a_bits)):
            if not MIN_BITS <= int(bits) <= MAX_BITS:
                raise ValueError(f"{label}: expected an integer in [{MIN_BITS}, {MAX_BITS}], got {bits}")
        latency_s, energy_j = self.grid_costs(
            [spec], np.array(int(w_bits)), np.array(int(a_bits)), self._batch(batch)
        )
        return float(latency_s[0]), float(energy_j[0])
