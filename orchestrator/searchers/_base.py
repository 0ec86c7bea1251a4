"""What every searcher is built from: the ``SearchProblem``."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hardware import MAX_BITS, MIN_BITS, CostTable, LayerSpec
from search_spaces import Budget, check_bit_range, policy_keys, project
from search_spaces import metrics as M

# A searcher may leave files for the record in ``<search dir>/searcher_artifacts/``
# (written from its ``save_to_dir``, which Tune calls on the search directory);
# the search logs every file there to its MLflow parent run at the end.
SEARCHER_ARTIFACTS_DIR = "searcher_artifacts"


@dataclass(frozen=True)
class SearchProblem:
    """The search as a searcher sees it: layers, cost table, budget, bounds, objective.

    ``metric``/``mode`` are what the searcher optimizes (``val_acc``/``max`` by default);
    ``cost_metric`` is the hardware cost multi-objective searchers trade against.

    ``accuracy_oracle(layer, w_bits, a_bits) -> val_acc`` is an optional cheap accuracy
    estimate used by sensitivity-based searchers (``sensitivity-dp``): the validation
    accuracy of the network with only layer ``layer`` quantized to ``(w_bits, a_bits)``
    (every other layer in full precision), calibrated but not fine-tuned;
    ``layer=None`` quantizes nothing (the full-precision reference).
    """

    layers: Sequence[LayerSpec]
    table: CostTable | None = None
    budget: Budget | None = None
    min_bits: int = MIN_BITS
    max_bits: int = MAX_BITS
    metric: str = M.VAL_ACC
    mode: str = "max"
    cost_metric: str = M.LATENCY_MS
    seed: int = 0
    num_trials: int | None = None
    max_concurrent: int = 1
    extra: dict = field(default_factory=dict)
    accuracy_oracle: Callable[[int | None, int, int], float] | None = None

    def __post_init__(self) -> None:
        check_bit_range(self.min_bits, self.max_bits)
        if self.mode not in ("min", "max"):
            raise ValueError(f"mode: choose between 'min', 'max', got {self.mode!r}")
        if not self.layers:
            raise ValueError("layers: expected at least one quantizable layer")
        if self.table is not None and self.table.num_layers != len(self.layers):
            raise ValueError(
                f"table: expected {len(self.layers)} layers, got {self.table.num_layers}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def keys(self) -> list[str]:
        return policy_keys(self.num_layers)

    def project(self, policy) -> np.ndarray:
        """Clip to [min_bits, max_bits] and enforce the budget (if a table is known)."""
        if self.table is None:
            return np.clip(np.asarray(policy, dtype=np.int64), self.min_bits, self.max_bits)
        return project(policy, self.table, self.budget,
                       min_bits=self.min_bits, max_bits=self.max_bits)


class SearchPropertiesMixin:
    """``set_search_properties`` for custom searchers that take their space from a
    ``SearchProblem``: Tune may still override metric and mode; the space stays."""

    def set_search_properties(self, metric, mode, config, **spec) -> bool:
        if mode is not None and mode not in ("min", "max"):
            raise ValueError(f"mode: choose between 'min', 'max', got {mode!r}")
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True
