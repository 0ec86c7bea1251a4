"""What every searcher is built from: the ``SearchProblem``."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from hardware import MAX_BITS, MIN_BITS, CostTable, LayerSpec
from search_spaces import AllowedBits, Budget, check_bit_range, parse_policy, policy_keys, project
from search_spaces import metrics as M

# A searcher may leave files for the record in ``<search dir>/searcher_artifacts/``
# (written from its ``save_to_dir``, which Tune calls on the search directory);
# the search logs every file there to its MLflow parent run at the end.
SEARCHER_ARTIFACTS_DIR = "searcher_artifacts"


@dataclass(frozen=True)
class SearchProblem:
    """The search as a searcher sees it: layers, cost table, budget, allowed bits, objective.

    ``allowed`` is each layer's set of weight and activation widths (``AllowedBits``:
    a target's bit sets, HAQ's fixed first/last layers); left out, it is every width
    in [min_bits, max_bits] for every layer. Given, it must lie inside [min_bits,
    max_bits], which stay the envelope of the space. Every searcher suggests only
    allowed widths, and ``project`` enforces them.

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
    allowed: AllowedBits | None = None

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
        if self.allowed is None:
            object.__setattr__(self, "allowed", AllowedBits.full(len(self.layers), self.min_bits, self.max_bits))
        elif self.allowed.num_layers != len(self.layers):
            raise ValueError(f"allowed: expected {len(self.layers)} layers, got {self.allowed.num_layers}")
        elif self.allowed.lowest.min() < self.min_bits or self.allowed.highest.max() > self.max_bits:
            raise ValueError(
                f"allowed: expected widths in [{self.min_bits}, {self.max_bits}], "
                f"got {self.allowed.describe()}"
            )

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def keys(self) -> list[str]:
        return policy_keys(self.num_layers)

    def project(self, policy) -> np.ndarray:
        """Snap to the allowed widths and enforce the budget (if a table is known)."""
        if self.table is None:
            return self.allowed.snap(policy)
        return project(policy, self.table, self.budget, allowed=self.allowed)


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


def evaluated_policy(result: dict, suggested: np.ndarray) -> np.ndarray:
    """The policy a trial really evaluated: its result's ``policy`` text (after the budget
    projection), or ``suggested`` when the result has none of that shape."""
    text = result.get(M.POLICY)
    if isinstance(text, str):
        try:
            policy = parse_policy(text)
        except ValueError:
            return suggested
        if policy.shape == np.shape(suggested):
            return policy
    return suggested


def space_state(problem: SearchProblem) -> dict:
    """What a checkpoint must match to be restored into a searcher for ``problem``."""
    return {"keys": problem.keys, "min_bits": problem.min_bits, "max_bits": problem.max_bits,
            "allowed": problem.allowed.to_state()}


def check_checkpoint(name: str, path, state: dict, version: int, problem: SearchProblem) -> None:
    """A searcher checkpoint's format ``version`` and search space, checked against this
    search's (``name`` says whose checkpoint in the message)."""
    if state.get("version") != version:
        raise ValueError(f"{name} checkpoint {path}: expected version {version}, got {state.get('version')!r}")
    check_space(name, path, {**state["space"], "keys": list(state["space"]["keys"])}, problem)


def check_space(name: str, path, saved: dict, problem: SearchProblem) -> None:
    mine = space_state(problem)
    saved = dict(saved)
    if "allowed" not in saved and len(saved["keys"]) == 2 * problem.num_layers:
        # Written before bit sets existed: every layer had [min_bits, max_bits].
        saved["allowed"] = AllowedBits.full(problem.num_layers, saved["min_bits"], saved["max_bits"]).to_state()
    if saved != mine:
        theirs = AllowedBits.from_state(saved["allowed"]).describe() if "allowed" in saved else (
            f"{saved['min_bits']}-{saved['max_bits']}")
        raise ValueError(
            f"{name} checkpoint {path}: expected a search over {problem.num_layers} layers with "
            f"bits {problem.allowed.describe()}, got {len(saved['keys']) // 2} layers "
            f"with bits {theirs}"
        )


def check_int_option(name: str, value, low: int, *, optional: bool = False) -> None:
    """A searcher option that must be an integer >= ``low`` (``None`` too when ``optional``)."""
    if optional and value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
        none = " or None" if optional else ""
        raise ValueError(f"{name}: expected an integer >= {low}{none}, got {value!r}")


def check_float_option(name: str, value, low: float, high: float, *, optional: bool = False,
                       low_open: bool = False) -> None:
    """A searcher option that must be a finite number in [low, high] ((low, high] when ``low_open``)."""
    if optional and value is None:
        return
    ok = isinstance(value, int | float | np.floating) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and (value > low if low_open else value >= low) and value <= high
    if not ok:
        none = " or None" if optional else ""
        raise ValueError(f"{name}: expected a number in {'(' if low_open else '['}{low}, {high}]{none}, "
                         f"got {value!r}")
