"""AQGAN (Kao, Ramamurthy, Krishna, arXiv 2006.03968) as a Ray Tune searcher: ``aqgan``.

A conditional GAN, conditioned on a target accuracy, learns the distribution of
evaluated quantization policies; hardware tuning is then generate-and-select: sample
many policies at the target, project them to the budget, keep the best. The networks
and their training are in ``_aqgan.py``; this module maps them onto a search:

- **Data** = (evaluated policy, val_acc) of every completed trial: the projected
  policy the trial reports (``policy``), so the GAN learns what was measured. Extra
  ``history`` (pairs from earlier searches of the same model, dataset and fine-tune
  settings, whatever their searcher and hardware: accuracy does not depend on the
  hardware) is added to the data before the first trial.
- **Warm-up.** Until the data holds ``warmup`` policies (default ``min(10, max(4,
  num_trials // 4))``), suggestions are diverse on purpose so the condition covers the
  accuracy range: first the uniform ``max_bits`` policy (projected: the most accurate
  region of the budget), then policies whose per-entry bits scatter (normal, sigma
  ``warmup_spread``) around a level that walks the bit range by a van der Corput
  sequence (low-discrepancy: levels 4.5, 2.75, 6.25, ... for bits 1..8).
- **Training.** A first round once the warm-up data exists, then one every
  ``retrain_every`` completed trials, each warm-starting from the last networks.
- **Suggest.** Target = ``target_acc`` if given, else best seen + ``margin``.
  ``num_candidates`` policies are generated at the target, deduplicated, projected to
  the budget (``problem.project``, the rule every searcher goes through), re-scored
  by the selection predictor (ridge on the bits, refitted on all data after every
  completed trial; see ``_aqgan.py``: the projection changed some of them), and
  the cheapest (``cost_metric``) unseen one predicted at or above the target is
  proposed; when none is, the unseen one with the highest predicted accuracy. When
  every candidate was seen already, a warm-up style policy explores instead.
- **Generator artifact.** ``export_generator()`` is what ``haqtune generate`` loads:
  the networks, the accuracy scale and the training data. Tune calls ``save_to_dir``
  on the search directory at every trial completion; there it is also written to
  ``searcher_artifacts/aqgan_generator.pt``, which the search logs to its MLflow
  parent run at the end.
- **Determinism / checkpoint.** One seeded ``np.random.Generator`` (warm-up,
  exploration) and the GAN's ``torch.Generator``; ``save``/``restore`` carry the
  networks, optimizers, data, pending trials and both RNG states (atomic write).
  Failed or metric-less completions and unknown trial ids are ignored.
"""

from __future__ import annotations

import math
import os
import tempfile
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch
from ray.tune.search import Searcher

from search_spaces import config_from_policy, parse_policy

from ._aqgan import AQGAN, EXPORT_VERSION, GAN_OPTIONS, GANConfig, _check_float, _check_int
from ._base import (
    SEARCHER_ARTIFACTS_DIR,
    SearchProblem,
    SearchPropertiesMixin,
    check_checkpoint,
    evaluated_policy,
    space_state,
)
from ._registry import register_searcher

GENERATOR_FILE = "aqgan_generator.pt"
_CHECKPOINT_VERSION = 1
DEFAULT_MAX_WARMUP = 10


def van_der_corput(index: int, base: int = 2) -> float:
    """The ``index``-th (1-based) point of the base-``base`` van der Corput sequence in (0, 1)."""
    value, denom = 0.0, 1.0
    while index:
        index, digit = divmod(index, base)
        denom *= base
        value += digit / denom
    return value


@dataclass(frozen=True, kw_only=True)
class SearchOptions:
    """How the GAN is used in a search (the networks' options are ``GANConfig``'s)."""

    warmup: int | None = None  # data points before the first training; None: see module doc
    warmup_spread: float = 1.5  # bits: per-entry scatter of warm-up policies around their level
    retrain_every: int = 4  # completed trials between training rounds
    num_candidates: int = 256
    margin: float = 0.005  # default target = best val_acc seen + margin
    target_acc: float | None = None  # a fixed target instead

    def __post_init__(self) -> None:
        _check_int("warmup", self.warmup, 2, optional=True)
        _check_float("warmup_spread", self.warmup_spread, 0.0, 8.0)
        _check_int("retrain_every", self.retrain_every, 1)
        _check_int("num_candidates", self.num_candidates, 1)
        _check_float("margin", self.margin, -1.0, 1.0)
        _check_float("target_acc", self.target_acc, 0.0, 1.0, optional=True)


SEARCH_OPTIONS = frozenset(f.name for f in fields(SearchOptions))
# Constructor-only: ((policy "w/a ..." or [L, 2], val_acc), ...) from earlier searches; it
# becomes training data at once, so the checkpoint holds it as data, not as an option.
HISTORY = "history"


def _policy_key(policy: np.ndarray) -> bytes:
    return np.ascontiguousarray(policy, dtype=np.int8).tobytes()


def _finite_number(value) -> bool:
    return (isinstance(value, int | float | np.number) and not isinstance(value, bool)
            and math.isfinite(float(value)))


def _atomic_torch_save(obj, path: str, prefix: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp_path = tempfile.mkstemp(prefix=prefix, suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.unlink(tmp_path)
        raise


def load_generator(path) -> tuple[AQGAN, dict]:
    """(the trained ``AQGAN``, its export dict) from a file written by ``export_generator``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("version") != EXPORT_VERSION:
        got = state.get("version") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"{path}: expected an aqgan generator (version {EXPORT_VERSION}), got {got!r}")
    model = AQGAN.from_state_dict(state["model"], seed=0)
    model.fit_predictor(state["policies"].numpy(), state["accs"].numpy())
    return model, state


@register_searcher(
    "aqgan",
    description="AQGAN's conditional GAN: generate policies at a target accuracy, project, pick the cheapest",
    objective="single",
)
class AQGANSearcher(SearchPropertiesMixin, Searcher):
    """``AQGANSearcher(problem, **options)``: options are the fields of ``SearchOptions``
    and of ``GANConfig`` (see the module docstring)."""

    def __init__(self, problem: SearchProblem, **options) -> None:
        known = SEARCH_OPTIONS | GAN_OPTIONS | {HISTORY}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"aqgan: unknown option {unknown[0]!r}: choose between {', '.join(sorted(known))}")
        super().__init__(metric=problem.metric, mode=problem.mode)
        self.problem = problem
        history = tuple(options.pop(HISTORY, ()))
        search = SearchOptions(**{k: v for k, v in options.items() if k in SEARCH_OPTIONS})
        gan = GANConfig(**{k: v for k, v in options.items() if k in GAN_OPTIONS})
        self._setup(search, gan)
        for policy, acc in history:
            self._add_data(self._parse_history_policy(policy), acc)
        if len(self.accs) >= self.warmup:  # enough history: no warm-up trials at all
            self.train()

    def _parse_history_policy(self, policy) -> np.ndarray:
        pol = parse_policy(policy) if isinstance(policy, str) else np.asarray(policy, dtype=np.int64)
        if pol.shape != (self.problem.num_layers, 2):
            raise ValueError(f"aqgan: history: expected policies of {self.problem.num_layers} layers, "
                             f"got shape {list(pol.shape)}")
        return self.problem.project(pol)

    def _setup(self, search: SearchOptions, gan: GANConfig) -> None:
        problem = self.problem
        self.options, self.gan_config = search, gan
        if search.warmup is not None:
            self.warmup = search.warmup
        else:
            trials = problem.num_trials if problem.num_trials is not None else 4 * DEFAULT_MAX_WARMUP
            self.warmup = min(DEFAULT_MAX_WARMUP, max(4, trials // 4))
        self.model = AQGAN(num_layers=problem.num_layers, min_bits=problem.min_bits,
                           max_bits=problem.max_bits, config=gan, seed=problem.seed)
        self._rng = np.random.default_rng(problem.seed)
        self.policies: list[np.ndarray] = []  # training data: evaluated policies ...
        self.accs: list[float] = []  # ... and their val_acc
        self._seen: set[bytes] = set()  # every policy suggested or in the data
        self._pending: dict[str, np.ndarray] = {}
        self.num_suggested = 0
        self.num_completed = 0
        self.since_training = 0

    # -- Tune API ------------------------------------------------------------------------

    def suggest(self, trial_id: str) -> dict | None:
        if trial_id in self._pending:  # asked twice: same answer
            return config_from_policy(self._pending[trial_id])
        if self.model.trained:
            policy = self._generate_and_select()
        else:
            policy = self._warmup_policy(self.num_suggested)
        if policy is None:
            policy = self._explore()
        self.num_suggested += 1
        self._pending[trial_id] = policy
        self._seen.add(_policy_key(policy))
        return config_from_policy(policy)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        suggested = self._pending.pop(trial_id, None)
        if suggested is None or error or not result:
            return
        value = result.get(self._metric)
        if not _finite_number(value):
            return
        policy = evaluated_policy(result, suggested)
        # The GAN is conditioned on accuracy, "higher is better": a minimized metric is negated.
        self._add_data(policy, float(value) if self._mode == "max" else -float(value))
        self.num_completed += 1
        self.since_training += 1
        if len(self.accs) >= self.warmup and (not self.model.trained
                                              or self.since_training >= self.options.retrain_every):
            self.train()
        elif self.model.trained:  # the selection predictor (closed form, ms) always sees all data
            self.model.fit_predictor(np.stack(self.policies), np.array(self.accs))

    # -- data and training ---------------------------------------------------------------

    def _add_data(self, policy: np.ndarray, acc) -> None:
        if not _finite_number(acc):
            raise ValueError(f"aqgan: expected a finite accuracy, got {acc!r}")
        policy = np.asarray(policy, dtype=np.int64).copy()
        self.policies.append(policy)
        self.accs.append(float(acc))
        self._seen.add(_policy_key(policy))

    def train(self, steps: int | None = None) -> None:
        """One training round on all data (needs two distinct accuracies to scale them)."""
        if len(set(self.accs)) < 2:
            return
        self.model.fit(np.stack(self.policies), np.array(self.accs), steps)
        self.since_training = 0

    # -- proposing -----------------------------------------------------------------------

    def target(self) -> float:
        if self.options.target_acc is not None:
            return float(self.options.target_acc)
        return max(self.accs) + self.options.margin

    def _warmup_policy(self, index: int) -> np.ndarray:
        lo, hi = self.problem.min_bits, self.problem.max_bits
        if index == 0:
            return self.problem.project(np.full((self.problem.num_layers, 2), hi))
        level = lo - 0.5 + van_der_corput(index) * (hi - lo + 1)
        bits = level + self.options.warmup_spread * self._rng.standard_normal((self.problem.num_layers, 2))
        return self.problem.project(np.clip(np.rint(bits), lo, hi).astype(np.int64))

    def _explore(self) -> np.ndarray:
        """A warm-up style policy at a random level (when everything generated was seen)."""
        return self._warmup_policy(int(self._rng.integers(1, 1 << 20)))

    def candidates(self, target_acc: float, num: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(unique projected policies ``[N, L, 2]``, predicted val_acc ``[N]``, cost ``[N]``)
        generated at ``target_acc``."""
        num = self.options.num_candidates if num is None else num
        raw = np.unique(self.model.generate(num, target_acc), axis=0)
        projected = project_many(self.problem, raw)
        cost = policy_costs(self.problem, projected)
        return projected, self.model.predict(projected), cost

    def _generate_and_select(self) -> np.ndarray | None:
        target = self.target()
        projected, predicted, cost = self.candidates(target)
        unseen = np.array([_policy_key(p) not in self._seen for p in projected], dtype=bool)
        if not unseen.any():
            return None
        projected, predicted, cost = projected[unseen], predicted[unseen], cost[unseen]
        above = predicted >= target
        if above.any():
            index = np.flatnonzero(above)[np.argmin(cost[above])]
        else:
            index = int(np.argmax(predicted))
        return projected[index]

    # -- the generator artifact ----------------------------------------------------------

    def export_generator(self) -> dict | None:
        """What ``haqtune generate`` needs: networks (no optimizers), scale, training data."""
        if not self.model.trained:
            return None
        model = {k: v for k, v in self.model.state_dict().items() if k not in ("opt_g", "opt_d")}
        return {
            "version": EXPORT_VERSION, "model": model,
            "policies": torch.from_numpy(np.stack(self.policies)),
            "accs": torch.tensor(self.accs, dtype=torch.float64),
            "metric": self._metric, "mode": self._mode,
        }

    def save_to_dir(self, checkpoint_dir: str, session_str: str = "default") -> None:
        super().save_to_dir(checkpoint_dir, session_str)
        exported = self.export_generator()
        if exported is not None:
            path = os.path.join(checkpoint_dir, SEARCHER_ARTIFACTS_DIR, GENERATOR_FILE)
            _atomic_torch_save(exported, path, ".aqgan-generator-")

    # -- checkpointing -------------------------------------------------------------------

    def _state(self) -> dict:
        def stack(policies: list) -> torch.Tensor:
            if not policies:
                return torch.zeros((0, self.problem.num_layers, 2), dtype=torch.int64)
            return torch.from_numpy(np.stack(policies))

        return {
            "version": _CHECKPOINT_VERSION,
            "options": asdict(self.options),
            "gan_config": asdict(self.gan_config),
            "metric": self._metric, "mode": self._mode,
            "space": space_state(self.problem),  # the allowed bits too (fixed first/last layers)
            "warmup": self.warmup,
            "model": self.model.state_dict(),
            "policies": stack(self.policies),
            "accs": torch.tensor(self.accs, dtype=torch.float64),
            "seen": stack([np.frombuffer(k, dtype=np.int8).reshape(-1, 2).astype(np.int64)
                           for k in sorted(self._seen)]),
            "pending": {tid: torch.from_numpy(p.copy()) for tid, p in self._pending.items()},
            "counters": (self.num_suggested, self.num_completed, self.since_training),
            "np_rng": self._rng.bit_generator.state,
        }

    def save(self, checkpoint_path: str) -> None:
        """Write the full searcher state atomically (temp file in the same directory + rename)."""
        _atomic_torch_save(self._state(), checkpoint_path, ".aqgan-")

    def restore(self, checkpoint_path: str) -> None:
        """Load a state written by ``save`` into this searcher (built for the same problem)."""
        state = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
        check_checkpoint("aqgan", checkpoint_path, state, _CHECKPOINT_VERSION, self.problem)
        self._setup(SearchOptions(**state["options"]), GANConfig(**state["gan_config"]))
        self._metric, self._mode = state["metric"], state["mode"]
        self.warmup = state["warmup"]
        self.model.load_state_dict(state["model"])
        self.policies = [p.copy() for p in state["policies"].numpy()]
        self.accs = [float(a) for a in state["accs"].numpy()]
        if self.model.trained:  # a deterministic function of the data: refitted, not stored
            self.model.fit_predictor(np.stack(self.policies), np.array(self.accs))
        self._seen = {_policy_key(p) for p in state["seen"].numpy()}
        self._pending = {tid: p.numpy().copy() for tid, p in state["pending"].items()}
        self.num_suggested, self.num_completed, self.since_training = state["counters"]
        self._rng.bit_generator.state = state["np_rng"]


def project_many(problem: SearchProblem, policies: np.ndarray) -> np.ndarray:
    """``problem.project`` of each policy ``[N, L, 2]``; only those over the budget are
    projected one by one (the others are only clipped), duplicates after projection dropped."""
    lo, hi = problem.min_bits, problem.max_bits
    pol = np.clip(np.asarray(policies, dtype=np.int64), lo, hi)
    if problem.table is None or problem.budget is None or len(pol) == 0:
        return np.unique(pol, axis=0) if len(pol) else pol
    limit = problem.budget.limit_for(problem.table)
    cost = getattr(problem.table.evaluate(pol), problem.budget.metric)
    # float32 sums in ``evaluate``: anything near the limit goes through the exact rule.
    over = np.flatnonzero(cost > limit * (1 - 1e-5))
    for i in over:
        pol[i] = problem.project(pol[i])
    return np.unique(pol, axis=0)


def policy_costs(problem: SearchProblem, policies: np.ndarray) -> np.ndarray:
    """The ``cost_metric`` of each policy (mean bits when there is no cost table)."""
    if len(policies) == 0:
        return np.zeros(0)
    if problem.table is None:
        return policies.reshape(len(policies), -1).mean(axis=1).astype(np.float64)
    return np.asarray(getattr(problem.table.evaluate(policies), problem.cost_metric), dtype=np.float64)



def generate_policies(model: AQGAN, problem: SearchProblem, target_acc: float, num: int, *,
                      pool: int = 256, measured: tuple[np.ndarray, np.ndarray] | None = None,
                      spread: float = 0.0) -> list[dict]:
    """``haqtune generate``'s selection: ``pool`` policies sampled at ``target_acc``, projected
    to ``problem``'s budget (any hardware: its table), deduplicated, re-scored by the
    model's selection predictor (``AQGAN.predict``: the ridge); the ``num`` predicted
    closest to the target (ties: cheapest first). ``spread`` widens the sampled
    conditions (``AQGAN.generate``; 0 by default: 0.1 and 0.25 changed the surrogate's
    target error by at most 0.05 points).
    ``measured`` = (policies ``[M, L, 2]``, val_acc ``[M]``) already evaluated (the
    generator's training data): a candidate among them is scored by its measured
    accuracy instead of the estimate (trials are deterministic per policy).

    Each row: ``policy`` ``[L, 2]``, ``predicted`` val_acc, ``cost`` (``cost_metric``),
    ``as_generated`` (True when the sample was inside the budget before projection: the
    paper's filter; False when the projection changed it), ``measured`` (True when
    ``predicted`` is a measurement).
    """
    if not 0 < num <= pool:
        raise ValueError(f"num: expected 1 <= num <= pool ({pool}), got {num}")
    raw = np.unique(model.generate(pool, target_acc, spread=spread), axis=0)
    raw_keys = {_policy_key(p) for p in raw}
    projected = project_many(problem, raw)
    predicted = model.predict(projected)
    known = {} if measured is None else {
        _policy_key(p): float(a) for p, a in zip(measured[0], measured[1], strict=True)}
    is_known = np.array([_policy_key(p) in known for p in projected], dtype=bool)
    for i in np.flatnonzero(is_known):
        predicted[i] = known[_policy_key(projected[i])]
    cost = policy_costs(problem, projected)
    order = np.lexsort((cost, np.abs(predicted - target_acc)))[:num]
    return [{"policy": projected[i], "predicted": float(predicted[i]), "cost": float(cost[i]),
             "as_generated": _policy_key(projected[i]) in raw_keys, "measured": bool(is_known[i])}
            for i in order]
