"""Measure per-layer sensitivity once, solve the budget exactly: ``sensitivity-dp``.

Beyond HAQ and AQGAN, which both learn the accuracy/cost trade-off from whole
trials, this searcher spends a fixed, small number of cheap evaluations up front
and then proposes the policies an additive accuracy model says are best:

1. **Sensitivity** (lazily, on the first ``suggest``). With ``problem.accuracy_oracle``
   (validation accuracy with ONE layer quantized, every other layer in full
   precision, calibrated, no fine-tune; see ``trainables.sensitivity``):

   - the reference ``acc_ref = oracle(None, max, max)`` (nothing quantized): 1 call;
   - weight drops ``dw[l, w] = acc_ref - oracle(l, w, max)`` for the layer's allowed
     weight widths w < max;
   - activation drops ``da[l, a] = acc_ref - oracle(l, max, a)`` likewise;
   - ``dw[l, max] = da[l, max] = 0`` (the max/max point is shared, not measured), and a
     layer with one allowed width (a fixed layer) is not measured: its drop is the same
     in every policy, so it cannot change the choice.

   With every width in [min, max] that is exactly ``1 + 2 * L * (max_bits - min_bits)``
   oracle calls (169 for the 12-layer demo at 1..8 bits, 743 for MobileNetV2's 53
   layers), instead of the ``L * 64`` a full per-layer (w, a) grid would cost; bit
   sets and fixed layers cost less (``num_oracle_calls``). The measurements are part
   of the searcher's checkpoint, so a resumed search never repeats them.

2. **Model.** Drops add up across layers and between a layer's weights and
   activations: ``drop(policy) = sum_l dw[l, w_l] + da[l, a_l]``. Exact for an
   additive, separable objective (the benchmark's ``SurrogateObjective``, up to its
   tiny 8-bit penalty); an approximation for a real network, where quantization
   noise of different layers interacts and fine-tuning recovers part of the drop.

3. **Exact budgeted choice.** Maximizing ``-drop`` under the budget is a
   multiple-choice knapsack over each layer's allowed (w, a) pairs (64 at 1..8 bits;
   the others are forbidden options, ``-inf``), with each pair's cost from the search's ``CostTable`` for the budget's
   metric: ``search_spaces.solve_mckp`` (costs rounded up to ``resolution`` bins of
   the limit, so every solution is feasible; the optimum is found up to a
   ``L / resolution`` relative tightening of the budget). Before solving, options
   that are dominated within their layer (another pair costs no more and is
   predicted no worse) are dropped: they can never be in an optimum, and a
   solution using one is a strictly worse copy of another candidate.

4. **Trials.** The ``top_k`` best distinct solutions (default ``min(num_trials,
   10)``; ``solve_mckp(..., top_k=top_k)``) are proposed as real trials, best first.
   After them come the next-best solutions of the same rounded problem, one at a
   time, in exact order of predicted accuracy (``mckp_solutions``: Lawler's k-best
   partitioning over a top-1 suffix DP, O(L * K) per solution, where asking
   ``solve_mckp`` for ever more solutions would cost O(L * K * resolution * k)),
   until ``max_proposals`` (default: no limit) or until every feasible solution
   has been proposed, then ``Searcher.FINISHED``. Trial results do not change the
   proposals: the searcher is a deterministic function of the measurements.

Without a budget the cost is ``problem.cost_metric`` and nothing limits it: the
first solution is the predicted-best policy (usually all max bits), the next ones
trade predicted accuracy for cost along the pruned front. Without a cost table
every option costs nothing, so only the single predicted-best policy is proposed.

**No oracle** (e.g. a ``SearchProblem`` built by hand, or the contract test
suite): a documented proxy replaces the measurements, with no evaluation at all:
``dw[l, w] = share_w[l] * noise(w)`` and ``da[l, a] = share_a[l] * noise(a)`` where
``noise(b) = 4**-(b - 1) - 4**-(max - 1)`` is the relative quantization noise power
of a uniform b-bit quantizer (each bit halves the step: the high-resolution
approximation of the MSE of quantizing a unit Gaussian), and ``share_w``/``share_a``
are the layer's fraction of the network's weights / input activations (a layer
with more values adds more noise). ``sensitivity_source`` says which was used.

Checkpoint (``save``/``restore``): JSON, atomic (temp file + rename), with the
measurements, the queue of computed solutions, what was proposed, pending trials,
metric/mode and the space. Unknown trial ids are ignored.
"""

from __future__ import annotations

import heapq
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from ray.tune.search import Searcher

from hardware import MIN_BITS, NUM_BITS
from search_spaces import AllowedBits, config_from_policy, format_policy, parse_policy, solve_mckp

from ..config import atomic_write_text
from ._base import SearchProblem, SearchPropertiesMixin, check_checkpoint, space_state
from ._registry import register_searcher

_CHECKPOINT_VERSION = 1
DEFAULT_TOP_K = 10
DEFAULT_RESOLUTION = 10_000
# Aim a hair under the limit, as ``project`` does, so float sums never spill over it.
_LIMIT_SLACK = 1e-7


def _measured(allowed: AllowedBits, max_bits: int) -> np.ndarray:
    """``[L, 2, 8]`` bool: the (layer, w|a, bits) points the sensitivity measurement evaluates."""
    has_choice = allowed.mask.sum(axis=2) > 1  # [L, 2]
    return allowed.mask & has_choice[:, :, None] & (np.arange(MIN_BITS, MIN_BITS + NUM_BITS) < max_bits)


def num_oracle_calls(problem: SearchProblem) -> int:
    """Oracle evaluations the sensitivity measurement costs: 1 + one per measured point
    (``1 + 2 L (max - min)`` when every layer allows all of [min, max])."""
    return 1 + int(_measured(problem.allowed, problem.max_bits).sum())


def measure_sensitivity(oracle, allowed: AllowedBits, max_bits: int):
    """(acc_ref, dw [L, 8], da [L, 8]) from ``oracle``; column ``b - 1`` is b bits.

    Only the points of ``_measured`` are evaluated; other columns stay 0 (max bits:
    assumed lossless; widths a layer cannot use or cannot choose between: irrelevant).
    """
    where = list(zip(*np.nonzero(_measured(allowed, max_bits)), strict=True))
    points = [(None, max_bits, max_bits)]
    for layer, col, index in where:
        bits = int(index) + MIN_BITS
        points.append((int(layer), bits, max_bits) if col == 0 else (int(layer), max_bits, bits))
    # One batch when the oracle takes batches (the search's oracle evaluates them in
    # parallel on workers), else one call per point.
    many = getattr(oracle, "evaluate_many", None)
    accs = [float(a) for a in (many(points) if many is not None else (oracle(*p) for p in points))]
    acc_ref = accs[0]
    drops = np.zeros((allowed.num_layers, 2, NUM_BITS))
    for (layer, col, index), acc in zip(where, accs[1:], strict=True):
        drops[layer, col, index] = acc_ref - acc
    return acc_ref, drops[:, 0], drops[:, 1]


def proxy_sensitivity(problem: SearchProblem):
    """The no-oracle proxy (module docstring): (None, dw [L, 8], da [L, 8])."""
    bits = np.arange(MIN_BITS, MIN_BITS + NUM_BITS)
    noise = np.clip(4.0 ** -(bits - 1) - 4.0 ** -(problem.max_bits - 1), 0.0, None)
    weights = np.array([spec.weights for spec in problem.layers], dtype=np.float64)
    inputs = np.array([spec.input_elements for spec in problem.layers], dtype=np.float64)
    share_w = weights / max(weights.sum(), 1.0)
    share_a = inputs / max(inputs.sum(), 1.0)
    return None, share_w[:, None] * noise[None, :], share_a[:, None] * noise[None, :]


def pair_costs(problem: SearchProblem, metric: str) -> np.ndarray:
    """``[L, 64]`` cost of every (w, a) pair per layer (index (w - 1) * 8 + (a - 1))."""
    num_layers = problem.num_layers
    if problem.table is None:
        return np.zeros((num_layers, NUM_BITS * NUM_BITS))
    column = {"latency_ms": 0, "energy_mj": 1, "size_mb": 2}[metric]
    costs = np.empty((num_layers, NUM_BITS, NUM_BITS))
    for w in range(NUM_BITS):
        for a in range(NUM_BITS):
            # One uniform policy gives every layer's cost at (w, a): exact float64,
            # the same numbers a trial's reported cost is summed from.
            costs[:, w, a] = problem.table.layer_costs(problem.table.uniform(w + MIN_BITS, a + MIN_BITS))[column]
    return costs.reshape(num_layers, -1)


def prune_dominated(values: np.ndarray, costs: np.ndarray) -> np.ndarray:
    """``values`` with options dominated within their row set to ``-inf``.

    Option j is dominated by option i when i costs no more and is worth no less,
    and is strictly better in one of them (exact ties: the lower index is kept).
    """
    allowed = values > -np.inf
    index = np.arange(values.shape[1])
    c_le = costs[:, :, None] <= costs[:, None, :]  # [L, i, j]
    v_ge = values[:, :, None] >= values[:, None, :]
    strict = (costs[:, :, None] < costs[:, None, :]) | (values[:, :, None] > values[:, None, :])
    strict |= (index[:, None] < index[None, :])[None]
    dominated = (c_le & v_ge & strict & allowed[:, :, None]).any(axis=1)
    return np.where(dominated, -np.inf, values)


def mckp_solutions(values: np.ndarray, costs: np.ndarray, limit: float, *,
                   resolution: int = DEFAULT_RESOLUTION) -> Iterator[tuple[float, np.ndarray]]:
    """Every feasible choice of one option per row, best total value first: ``(value, [L])``.

    The same problem as ``solve_mckp`` (costs rounded up to ``resolution`` bins of
    ``limit``, ``-inf`` forbids an option), enumerated lazily by Lawler's k-best
    scheme: a top-1 DP over row suffixes (``suffix[i, c]``: best value of rows
    i..L-1 within c bins) answers "best completion of a fixed prefix" in O(1), so
    each subproblem (prefix fixed up to row j, some options of row j forbidden,
    rows after j free) is solved in O(K). Popping the best subproblem yields the
    next solution and splits the rest of its subproblem into disjoint children.
    """
    values = np.asarray(values, dtype=np.float64)
    bins = np.ceil(np.asarray(costs, dtype=np.float64) * (resolution / limit)).astype(np.int64)
    num_rows, _ = values.shape
    cells = resolution + 1
    usable = (values > -np.inf) & (bins <= resolution)
    suffix = np.full((num_rows + 1, cells), -np.inf)
    suffix[num_rows] = 0.0
    arg = np.zeros((num_rows, cells), dtype=np.int64)
    for row in range(num_rows - 1, -1, -1):
        for opt in np.flatnonzero(usable[row]):
            shift = int(bins[row, opt])
            cand = np.full(cells, -np.inf)
            cand[shift:] = suffix[row + 1, : cells - shift] + values[row, opt]
            better = cand > suffix[row]  # strict: ties keep the lower option, as solve_mckp
            suffix[row, better] = cand[better]
            arg[row, better] = opt

    def best_at(row: int, room: int, forbidden: frozenset):
        """(value, option) of the best solution of rows row.. within ``room`` bins."""
        fits = usable[row] & (bins[row] <= room)
        if forbidden:
            fits[list(forbidden)] = False
        if not fits.any():
            return -np.inf, -1
        cand = np.where(fits, values[row] + suffix[row + 1, np.clip(room - bins[row], 0, None)], -np.inf)
        opt = int(np.argmax(cand))
        return float(cand[opt]), opt

    heap: list = []
    counter = 0

    def push(prefix: np.ndarray, row: int, forbidden: frozenset) -> None:
        nonlocal counter
        room = resolution - int(bins[np.arange(row), prefix].sum())
        value, opt = best_at(row, room, forbidden)
        if value > -np.inf:
            total = float(values[np.arange(row), prefix].sum()) + value
            heapq.heappush(heap, (-total, counter, prefix, row, forbidden, opt))
            counter += 1

    push(np.zeros(0, dtype=np.int64), 0, frozenset())
    while heap:
        neg_total, _, prefix, row, forbidden, opt = heapq.heappop(heap)
        choice = np.empty(num_rows, dtype=np.int64)
        choice[:row], choice[row] = prefix, opt
        room = resolution - int(bins[np.arange(row + 1), choice[: row + 1]].sum())
        for later in range(row + 1, num_rows):  # follow the suffix DP's back-pointers
            choice[later] = arg[later, room]
            room -= int(bins[later, choice[later]])
        yield -neg_total, choice
        # The rest of this subproblem: row ``row`` also avoids ``opt``, or the solution's
        # prefix is kept up to some later row m, whose option must differ.
        push(prefix, row, forbidden | {opt})
        for m in range(row + 1, num_rows):
            push(choice[:m].copy(), m, frozenset({int(choice[m])}))


class SensitivityDPSearcher(SearchPropertiesMixin, Searcher):
    """Sensitivity measurement + exact knapsack DP (see the module docstring)."""

    def __init__(self, problem: SearchProblem, *, top_k: int | None = None,
                 max_proposals: int | None = None, resolution: int = DEFAULT_RESOLUTION) -> None:
        for label, value in (("top_k", top_k), ("max_proposals", max_proposals)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{label}: expected an integer >= 1, got {value!r}")
        if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
            raise ValueError(f"resolution: expected an integer >= 1, got {resolution!r}")
        super().__init__(metric=problem.metric, mode=problem.mode)
        self.problem = problem
        if top_k is None:
            top_k = min(problem.num_trials, DEFAULT_TOP_K) if problem.num_trials else DEFAULT_TOP_K
        self.top_k = top_k
        self.max_proposals = max_proposals
        self.resolution = resolution
        self.cost_metric = problem.budget.metric if problem.budget is not None else problem.cost_metric
        # Measurements (None until the first suggest).
        self.sensitivity_source: str | None = None  # "oracle" | "proxy"
        self.oracle_calls = 0
        self.acc_ref: float | None = None
        self.drop_w: np.ndarray | None = None
        self.drop_a: np.ndarray | None = None
        # DP state.
        self.first_batch_done = False
        self.exhausted = False
        self._solutions: Iterator[str] | None = None  # the continuation (rebuilt after restore)
        self._queue: list[str] = []  # formatted policies, best first, not yet proposed
        self.proposed: list[str] = []  # formatted policies in the order they were proposed
        self._pending: dict[str, str] = {}  # trial id -> formatted policy
        self.results: dict[str, float] = {}  # trial id -> metric, for reports

    # -- measurement and DP ----------------------------------------------------------------

    def _measure(self) -> None:
        p = self.problem
        if p.accuracy_oracle is None:
            self.acc_ref, self.drop_w, self.drop_a = proxy_sensitivity(p)
            self.sensitivity_source = "proxy"
            return
        self.acc_ref, self.drop_w, self.drop_a = measure_sensitivity(p.accuracy_oracle, p.allowed, p.max_bits)
        self.oracle_calls = num_oracle_calls(p)  # one per measured point (measure_sensitivity)
        self.sensitivity_source = "oracle"

    def predicted_drop(self, policy) -> float:
        """The additive model's accuracy drop of ``policy`` (after measuring)."""
        pol = np.asarray(policy, dtype=np.int64)
        rows = np.arange(pol.shape[0])
        return float(self.drop_w[rows, pol[:, 0] - MIN_BITS].sum() + self.drop_a[rows, pol[:, 1] - MIN_BITS].sum())

    def knapsack(self) -> tuple[np.ndarray, np.ndarray, float]:
        """(values [L, 64], costs [L, 64], limit) of the budgeted choice, pruned."""
        p = self.problem
        values = -(self.drop_w[:, :, None] + self.drop_a[:, None, :]).reshape(p.num_layers, -1)
        mask = p.allowed.mask  # only each layer's allowed (w, a) pairs can be chosen
        values = np.where((mask[:, 0, :, None] & mask[:, 1, None, :]).reshape(p.num_layers, -1), values, -np.inf)
        costs = pair_costs(p, self.cost_metric)
        if p.budget is not None and p.table is not None:
            limit = p.budget.limit_for(p.table) * (1 - _LIMIT_SLACK)
        else:  # nothing limits the cost: a limit every combination fits under
            limit = float(costs.max(axis=1).sum()) + 1.0
        return prune_dominated(values, costs), costs, limit

    def _policy_text(self, choice: np.ndarray) -> str:
        pol = np.stack([choice // NUM_BITS + MIN_BITS, choice % NUM_BITS + MIN_BITS], axis=-1)
        # DP solutions are inside the budget already; projecting is the shared rule.
        return format_policy(self.problem.project(pol))

    def _first_batch(self) -> list[str]:
        values, costs, limit = self.knapsack()
        choices = solve_mckp(values, costs, limit, top_k=self.top_k, resolution=self.resolution)
        if len(choices) < self.top_k:
            self.exhausted = True  # every feasible (pruned) solution is in this list
        return list(dict.fromkeys(self._policy_text(c) for c in choices))

    def _continuation(self) -> Iterator[str]:
        values, costs, limit = self.knapsack()
        for _, choice in mckp_solutions(values, costs, limit, resolution=self.resolution):
            yield self._policy_text(choice)

    def _next_policy(self) -> str | None:
        if self.drop_w is None:
            self._measure()
        if self.max_proposals is not None and len(self.proposed) >= self.max_proposals:
            return None
        seen = set(self.proposed)
        if not self.first_batch_done:
            self._queue = [t for t in self._first_batch() if t not in seen]
            self.first_batch_done = True
        while not self._queue and not self.exhausted:
            if self._solutions is None:
                self._solutions = self._continuation()
            text = next(self._solutions, None)
            if text is None:
                self.exhausted = True
            elif text not in seen:
                self._queue.append(text)
        return self._queue.pop(0) if self._queue else None

    # -- Tune API --------------------------------------------------------------------------

    def suggest(self, trial_id: str):
        if trial_id in self._pending:  # asked twice: same answer
            return config_from_policy(parse_policy(self._pending[trial_id]))
        text = self._next_policy()
        if text is None:
            return Searcher.FINISHED
        self.proposed.append(text)
        self._pending[trial_id] = text
        return config_from_policy(parse_policy(text))

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._pending.pop(trial_id, None) is None:
            return  # unknown id
        value = (result or {}).get(self._metric)
        if not error and isinstance(value, int | float) and not isinstance(value, bool):
            self.results[trial_id] = float(value)

    # -- checkpointing ---------------------------------------------------------------------

    def save(self, checkpoint_path: str) -> None:
        measured = self.drop_w is not None
        state = {
            "version": _CHECKPOINT_VERSION, "metric": self._metric, "mode": self._mode,
            "space": space_state(self.problem),
            "options": {"top_k": self.top_k, "max_proposals": self.max_proposals,
                        "resolution": self.resolution, "cost_metric": self.cost_metric},
            "sensitivity_source": self.sensitivity_source, "oracle_calls": self.oracle_calls,
            "acc_ref": self.acc_ref,
            "drop_w": self.drop_w.tolist() if measured else None,
            "drop_a": self.drop_a.tolist() if measured else None,
            "first_batch_done": self.first_batch_done, "exhausted": self.exhausted, "queue": self._queue,
            "proposed": self.proposed, "pending": self._pending, "results": self.results,
        }
        atomic_write_text(Path(checkpoint_path), json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        check_checkpoint("sensitivity-dp", checkpoint_path, state, _CHECKPOINT_VERSION, self.problem)
        self._metric, self._mode = state["metric"], state["mode"]
        opts = state["options"]
        self.top_k, self.max_proposals = opts["top_k"], opts["max_proposals"]
        self.resolution, self.cost_metric = opts["resolution"], opts["cost_metric"]
        self.sensitivity_source, self.oracle_calls = state["sensitivity_source"], state["oracle_calls"]
        self.acc_ref = state["acc_ref"]
        measured = state["drop_w"] is not None
        self.drop_w = np.array(state["drop_w"], dtype=np.float64) if measured else None
        self.drop_a = np.array(state["drop_a"], dtype=np.float64) if measured else None
        self.first_batch_done, self.exhausted = state["first_batch_done"], state["exhausted"]
        self._solutions = None  # re-enumerated on demand, skipping what was proposed
        self._queue, self.proposed = list(state["queue"]), list(state["proposed"])
        self._pending, self.results = dict(state["pending"]), dict(state["results"])


@register_searcher(
    "sensitivity-dp",
    description="per-layer accuracy drop at each allowed W and A bitwidth (1+2L(max-min) one-layer evals, "
    "no fine-tune), additive model, exact budgeted knapsack DP; proposes the top_k "
    "(default min(trials,10)) best, then next-best",
)
def _sensitivity_dp(problem: SearchProblem, *, top_k: int | None = None, max_proposals: int | None = None,
                    resolution: int = DEFAULT_RESOLUTION) -> SensitivityDPSearcher:
    """Options: ``top_k`` (first DP batch), ``max_proposals`` (FINISHED after that many),
    ``resolution`` (cost bins of the DP)."""
    return SensitivityDPSearcher(problem, top_k=top_k, max_proposals=max_proposals, resolution=resolution)
