"""A synthetic accuracy objective with a known optimum, for benchmarking searchers.

Training a network per trial is far too slow to compare searchers over hundreds of
trials and several seeds. ``SurrogateObjective`` replaces the trial by a cheap
model of how quantization hurts accuracy, built so that the best policy under the
budget can be computed exactly:

    val_acc(policy) = clip(ref_acc - sum_l penalty[l, w_l, a_l], 0, 1)

with additive per-layer penalties (seeded). A layer's penalty is
``s_w[l] * q(w) + s_a[l] * q(a)`` where ``q(b) = 4**-(b - 1)`` is the relative
noise power of a uniform b-bit quantizer (each bit halves the step, quartering the
noise), so dropping a bit costs little at 8 bits and a lot at 1-2 bits. The
sensitivities ``s`` are log-normal per layer; depthwise weights are 3x more
sensitive (few weights per output channel), about 10% of the layers 5x, and the
first and last layers 8x ("some layers much more sensitive", as every
quantization study finds). They are scaled so that the uniform 4/4-bit policy
loses ``drop_at_4bit`` accuracy.

Because the sum is additive over layers and clipping is monotone, the best policy
under the budget is a multiple-choice knapsack over the 64 (w, a) pairs per layer:
``optimum()`` solves it with ``solve_mckp``. Costs are rounded up there, so the
optimum returned is feasible and within the bound documented in ``knapsack``;
``optimum_upper_bound()`` rounds down to bracket the exact optimum from above.

Every policy is scored *after* ``project`` (the budget rule every trial applies),
exactly as a real trial reports the accuracy of the projected policy.

Non-separable variant (``interaction > 0``). Real quantization errors compound:
layer ``l + 1`` multiplies the noise layer ``l`` passes on by its own. With
``interaction = f`` a fraction ``f`` of the 4/4-bit drop comes from neighbouring
pairs instead of single layers:

    val_acc = clip(ref_acc - sum_l penalty[l, w_l, a_l]
                   - sum_l rho_l * n(w_l, a_l) * n(w_{l+1}, a_{l+1}), 0, 1)

with ``n(w, a) = (q(w) + q(a)) / 2`` the layer's relative noise and ``rho_l``
proportional to the geometric mean of the two layers' sensitivities. Lowering two
neighbours together then costs more than the sum of lowering each alone, so an
additive per-layer model (what ``sensitivity-dp`` measures, one layer at a time,
with every other layer at full precision where pair terms vanish) is no longer
exact. The optimum stays computable: the pairs form a chain, solved by
``knapsack.chain_dp`` over (this layer's (w, a), cost so far), at a coarser
resolution than the separable case (bracketed the same way).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hardware import BITS, MAX_BITS, MIN_BITS, NUM_BITS, CostTable, LayerSpec, check_policies

from . import metrics as M
from ._allowed import check_bit_range
from ._budget import Budget, _layer_metric, project
from ._space import format_policy, policy_from_config
from .knapsack import chain_dp, mckp_dp, solve_mckp

DEFAULT_BUDGET = Budget("latency_ms", 0.5, relative=True)
# HAQ's reward scale: reward = 0.1 * (val_acc - ref_acc).
REWARD_FACTOR = 0.1
# Fraction of layers that get an extra sensitivity factor, and the factors.
_HOT_LAYER_FRACTION = 0.1
_HOT_LAYER_FACTOR = 5.0
_DEPTHWISE_WEIGHT_FACTOR = 3.0
_FIRST_LAST_FACTOR = 8.0
# Relative noise power of a uniform b-bit quantizer: 4**-(b - 1), 1 at 1 bit.
_NOISE = 4.0 ** -(BITS - 1)
# ``project`` aims this relative hair under the limit; the optimum must satisfy it too.
_PROJECT_SLACK = 1e-7
# The chain DP costs L * 64^2 * resolution: 4,000 bins keep it to seconds for MobileNetV2.
PAIRWISE_RESOLUTION = 4_000


class SurrogateObjective:
    """Seeded additive accuracy model over a cost table and a budget (see module docstring).

    Args:
        layers: the network's ``LayerSpec``s (depthwise layers are more sensitive).
        table: its ``CostTable`` (e.g. ``get_cost_model("bismo-cloud").table(layers)``).
        budget: the budget policies are projected to; ``None`` = no budget.
        seed: seeds the sensitivities.
        ref_acc: full-precision accuracy (fraction).
        drop_at_4bit: accuracy lost by the uniform 4/4-bit policy (fraction).
        interaction: fraction of that drop due to neighbouring-layer pairs (0 = separable).
    """

    def __init__(
        self,
        layers: Sequence[LayerSpec],
        table: CostTable,
        budget: Budget | None = DEFAULT_BUDGET,
        *,
        seed: int = 0,
        ref_acc: float = 0.72,
        drop_at_4bit: float = 0.02,
        min_bits: int = MIN_BITS,
        max_bits: int = MAX_BITS,
        interaction: float = 0.0,
    ) -> None:
        check_bit_range(min_bits, max_bits)
        if not 0 <= interaction < 1:
            raise ValueError(f"interaction: expected a fraction in [0, 1), got {interaction}")
        if len(layers) != table.num_layers:
            raise ValueError(f"table: expected {len(layers)} layers, got {table.num_layers}")
        if not 0 < ref_acc <= 1:
            raise ValueError(f"ref_acc: expected a fraction in (0, 1], got {ref_acc}")
        if not 0 < drop_at_4bit < ref_acc:
            raise ValueError(f"drop_at_4bit: expected a fraction in (0, ref_acc), got {drop_at_4bit}")
        self.layers = list(layers)
        self.table = table
        self.budget = budget
        self.seed = seed
        self.ref_acc = float(ref_acc)
        self.min_bits, self.max_bits = min_bits, max_bits
        num_layers = len(self.layers)

        rng = np.random.default_rng(seed)
        sens = rng.lognormal(mean=0.0, sigma=0.75, size=(num_layers, 2))  # [:, 0] w, [:, 1] a
        depthwise = np.array([spec.kind == "depthwise" for spec in self.layers])
        sens[depthwise, 0] *= _DEPTHWISE_WEIGHT_FACTOR
        sens[rng.random(num_layers) < _HOT_LAYER_FRACTION] *= _HOT_LAYER_FACTOR
        sens[[0, -1]] *= _FIRST_LAST_FACTOR
        total = sens.sum(axis=1)
        sens *= (1 - interaction) * drop_at_4bit / (sens.sum() * _NOISE[4 - MIN_BITS])
        self.sensitivity = sens
        self.interaction = float(interaction)
        # penalty[l, w - 1, a - 1]: accuracy drop (fraction) of layer l at (w, a).
        self.penalty = sens[:, 0, None, None] * _NOISE[None, :, None] + sens[:, 1, None, None] * _NOISE[None, None, :]
        # pair_penalty[l, (w_l, a_l), (w_{l+1}, a_{l+1})] over the 64 pairs of each layer,
        # row-major (w then a); all zero when separable. At uniform 4/4 the pairs sum to
        # interaction * drop_at_4bit.
        noise = ((_NOISE[:, None] + _NOISE[None, :]) / 2).reshape(-1)  # n(w, a)
        rho = np.sqrt(total[:-1] * total[1:])
        if interaction > 0 and rho.size:
            rho *= interaction * drop_at_4bit / (rho.sum() * _NOISE[4 - MIN_BITS])
        else:
            rho = np.zeros_like(rho)
        self.pair_penalty = rho[:, None, None] * np.sqrt(noise[None, :, None] * noise[None, None, :])
        self._optima: dict[int, tuple[np.ndarray, float]] = {}

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def project(self, policy) -> np.ndarray:
        return project(policy, self.table, self.budget, min_bits=self.min_bits, max_bits=self.max_bits)

    def accuracy(self, policies) -> np.ndarray:
        """``val_acc`` of policies ``[N, L, 2]`` (or one ``[L, 2]``) as given, not projected: ``[N]``."""
        pol = check_policies(policies, self.num_layers)
        rows = np.arange(self.num_layers)
        drop = self.penalty[rows, pol[..., 0] - MIN_BITS, pol[..., 1] - MIN_BITS].sum(axis=-1)
        if self.interaction > 0:
            code = (pol[..., 0] - MIN_BITS) * NUM_BITS + (pol[..., 1] - MIN_BITS)  # [N, L]
            drop = drop + self.pair_penalty[rows[:-1], code[:, :-1], code[:, 1:]].sum(axis=-1)
        return np.clip(self.ref_acc - drop, 0.0, 1.0)

    def single_layer_accuracy(self, layer: int | None, w_bits: int, a_bits: int) -> float:
        """``val_acc`` with only ``layer`` quantized, every other layer at full precision
        (where its noise, and so every pair term, vanishes): a one-layer sensitivity probe."""
        if layer is None:
            return self.ref_acc
        return self.ref_acc - float(self.penalty[layer, w_bits - MIN_BITS, a_bits - MIN_BITS])

    def value(self, policy) -> float:
        """``val_acc`` of ``policy`` after projection to the budget (what a trial would report)."""
        return float(self.accuracy(self.project(policy))[0])

    def result(self, policy_or_config) -> dict:
        """The final result dict a trial reports for a policy ``[L, 2]`` or a ``w_i``/``a_i`` config."""
        if isinstance(policy_or_config, dict):
            policy = policy_from_config(policy_or_config, self.num_layers)
        else:
            policy = np.asarray(policy_or_config)
        projected = self.project(policy)
        val_acc = float(self.accuracy(projected)[0])
        costs = self.table.evaluate(projected)
        return {
            M.VAL_ACC: val_acc,
            M.REF_ACC: self.ref_acc,
            M.ACC_DROP: self.ref_acc - val_acc,
            M.REWARD: REWARD_FACTOR * (val_acc - self.ref_acc),
            M.LATENCY_MS: float(costs.latency_ms[0]),
            M.ENERGY_MJ: float(costs.energy_mj[0]),
            M.SIZE_MB: float(costs.size_mb[0]),
            M.POLICY: format_policy(projected),
            M.DONE: 1,
        }

    # ---- the exact optimum -------------------------------------------------------------

    def _knapsack(self) -> tuple[np.ndarray, np.ndarray, float]:
        """values [L, 64], costs [L, 64] over (w, a) pairs (row-major: w then a), limit."""
        values = -self.penalty.reshape(self.num_layers, NUM_BITS * NUM_BITS).copy()
        in_range = (self.min_bits <= BITS) & (self.max_bits >= BITS)
        allowed = (in_range[:, None] & in_range[None, :]).reshape(-1)
        values[:, ~allowed] = -np.inf
        metric = self.budget.metric if self.budget is not None else M.LATENCY_MS
        costs = np.array(_layer_metric(self.table, metric), dtype=np.float64).reshape(self.num_layers, -1)
        if self.budget is None:
            limit = float(costs[:, allowed].max(axis=1).sum()) + 1.0
        else:
            limit = self.budget.limit_for(self.table) * (1 - _PROJECT_SLACK)
        return values, costs, limit

    def _pairs_to_policy(self, choice: np.ndarray) -> np.ndarray:
        return np.stack([choice // NUM_BITS + MIN_BITS, choice % NUM_BITS + MIN_BITS], axis=1).astype(np.int64)

    def optimum(self, *, resolution: int | None = None) -> tuple[np.ndarray, float]:
        """(policy ``[L, 2]``, val_acc) of the best feasible policy, by ``solve_mckp``
        (separable; default resolution 100,000) or ``chain_dp`` (pairwise; 4,000)."""
        return self._optimum(self._resolution(resolution))

    def _resolution(self, resolution: int | None) -> int:
        if resolution is not None:
            return resolution
        return PAIRWISE_RESOLUTION if self.interaction > 0 else 100_000

    def _optimum(self, resolution: int) -> tuple[np.ndarray, float]:
        if resolution not in self._optima:
            values, costs, limit = self._knapsack()
            if self.interaction > 0:
                bins = np.ceil(costs * (resolution / limit)).astype(np.int64)
                choice, _ = chain_dp(values, -self.pair_penalty, bins, resolution)
            else:
                choice = solve_mckp(values, costs, limit, resolution=resolution)[0]
            policy = self._pairs_to_policy(choice)
            # The optimum is already inside the budget: projection must leave it as is.
            assert np.array_equal(self.project(policy), policy)
            self._optima[resolution] = (policy, float(self.accuracy(policy)[0]))
        policy, acc = self._optima[resolution]
        return policy.copy(), acc

    def optimum_upper_bound(self, *, resolution: int | None = None) -> float:
        """An upper bound on the exact optimum's val_acc (costs rounded DOWN: a relaxation)."""
        resolution = self._resolution(resolution)
        values, costs, limit = self._knapsack()
        bins = np.floor(costs * (resolution / limit)).astype(np.int64)
        if self.interaction > 0:
            total = chain_dp(values, -self.pair_penalty, bins, resolution)[1]
        else:
            total = mckp_dp(values, bins, resolution, 1)[1][0]
        return float(np.clip(self.ref_acc + total, 0.0, 1.0))
