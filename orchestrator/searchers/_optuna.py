"""Optuna samplers through Ray Tune's ``OptunaSearch`` on the flat ``w_i``/``a_i`` space.

The sampler sees the bits it suggested; the trial projects them to the budget and
reports the accuracy of the projected policy, exactly as for every other searcher.

Encoding: each ``w_i``/``a_i`` is an integer index into that layer's allowed widths
(ascending), which the searcher turns into bits before Tune sees the config. Every
sampler handles integers (CMA-ES and QMC do not handle categorical parameters), the
order of the widths is kept (index 1 of {2, 4, 8} lies between 2 and 8), and only
allowed widths can come out. A layer with one allowed width (a fixed layer) is a
single-valued distribution, which Optuna does not sample.
"""

from __future__ import annotations

from ray.tune.search.optuna import OptunaSearch

from search_spaces import a_key, w_key

from ._base import SearchProblem
from ._registry import register_searcher


def allowed_widths(problem: SearchProblem) -> dict[str, tuple[int, ...]]:
    """Each config key's allowed widths, ascending (the index encoding's lookup)."""
    allowed = problem.allowed
    return {key: widths for i in range(problem.num_layers)
            for key, widths in ((w_key(i), allowed.w[i]), (a_key(i), allowed.a[i]))}


def optuna_space(problem: SearchProblem) -> dict:
    """``w_i``/``a_i`` -> ``IntDistribution`` over the indices of the allowed widths."""
    from optuna.distributions import IntDistribution

    return {k: IntDistribution(0, len(widths) - 1) for k, widths in allowed_widths(problem).items()}


class HaqtuneOptunaSearch(OptunaSearch):
    """``OptunaSearch`` that keeps the searcher contract where Ray's does not: trial ids
    it never suggested are ignored (Ray's raises ``KeyError``), and a multi-objective
    result missing one of the metrics counts as "no result" (Ray's would hand Optuna a
    ``None`` objective, which Optuna rejects). Module level, so Tune can pickle it.

    ``widths`` maps each key to its allowed widths: Optuna samples indices (see the
    module docstring) and ``suggest`` returns bits. It is saved with the searcher."""

    def __init__(self, *args, widths: dict[str, tuple[int, ...]], **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._widths = widths

    def suggest(self, trial_id: str):
        config = super().suggest(trial_id)
        # A searcher pickled before the index encoding has no ``_widths``: its study samples bits.
        widths = getattr(self, "_widths", None)
        if not isinstance(config, dict) or widths is None:
            return config  # None or FINISHED
        return {k: widths[k][int(v)] if k in widths else v for k, v in config.items()}

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id not in self._ot_trials:
            return
        if result and isinstance(self.metric, list) and any(result.get(m) is None for m in self.metric):
            result = None
        super().on_trial_complete(trial_id, result, error)


def optuna_searcher(problem: SearchProblem, sampler, *, metric=None, mode=None, **kwargs):
    """``OptunaSearch`` over the problem's space with ``sampler`` (already seeded)."""
    return HaqtuneOptunaSearch(
        space=optuna_space(problem),
        widths=allowed_widths(problem),
        metric=problem.metric if metric is None else metric,
        mode=problem.mode if mode is None else mode,
        sampler=sampler,
        **kwargs,
    )


@register_searcher("random", description="Optuna RandomSampler: uniform random bits per layer")
def _random(problem: SearchProblem):
    import optuna

    return optuna_searcher(problem, optuna.samplers.RandomSampler(seed=problem.seed))


@register_searcher(
    "tpe",
    description="Optuna TPESampler (multivariate, 10 random start-up trials): Bayesian optimization with Parzen estimators",
)
def _tpe(problem: SearchProblem, *, n_startup_trials: int = 10, multivariate: bool = True):
    import optuna

    # multivariate TPE models bits jointly: layers interact through the shared budget.
    sampler = optuna.samplers.TPESampler(
        seed=problem.seed, n_startup_trials=n_startup_trials, multivariate=multivariate
    )
    return optuna_searcher(problem, sampler)


def _quiet_experimental(build):
    """Build an Optuna sampler without its ``ExperimentalWarning`` (an API-stability note
    for library authors, not something a search user can act on)."""
    import warnings

    import optuna

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return build()


@register_searcher(
    "gp",
    description="Optuna GPSampler: Gaussian-process Bayesian optimization (log EI), 10 random start-up trials",
)
def _gp(problem: SearchProblem, *, n_startup_trials: int = 10, deterministic_objective: bool = False):
    """True Bayesian optimization: a GP (Matern 5/2, ARD) over the 2L integer bits,
    log expected improvement optimized per suggestion.

    ``deterministic_objective=False`` (default) fits a noise term: a fine-tuned trial's
    accuracy varies with its seed. The first ``n_startup_trials`` are uniform random.
    Fitting costs O(n^3) in the number of finished trials, so ``gp`` is meant for
    short searches (tens to a few hundred trials).
    """
    import optuna

    sampler = optuna.samplers.GPSampler(
        seed=problem.seed,
        n_startup_trials=n_startup_trials,
        deterministic_objective=deterministic_objective,
    )
    return optuna_searcher(problem, sampler)


@register_searcher(
    "cmaes",
    description="Optuna CmaEsSampler with margin (CMA-ES for integer spaces), start at the box centre, default population",
)
def _cmaes(problem: SearchProblem, *, popsize: int | None = None, sigma0: float | None = None,
           with_margin: bool = True):
    """CMA-ES with margin (Hamano et al., GECCO 2022): keeps integer variables from
    collapsing onto one value, which plain CMA-ES does on a discrete space.

    ``popsize`` defaults to CMA-ES's 4 + floor(3 ln(2L)) (13 for the 12-layer demo);
    ``sigma0`` to a sixth of the bit range. Optuna 4.4+ dropped IPOP/BIPOP restarts
    (``restart_strategy`` falls back to none), so none is used.
    """
    import optuna

    sampler = _quiet_experimental(lambda: optuna.samplers.CmaEsSampler(
        seed=problem.seed,
        popsize=popsize,
        sigma0=sigma0,
        with_margin=with_margin,
        warn_independent_sampling=False,
    ))
    return optuna_searcher(problem, sampler)


@register_searcher(
    "qmc",
    description="Optuna QMCSampler: scrambled Sobol quasi-random sequence (space-filling random search)",
)
def _qmc(problem: SearchProblem, *, qmc_type: str = "sobol", scramble: bool = True):
    """Low-discrepancy sampling: like ``random``, but the 2L-dimensional box is covered
    evenly. Scrambling (seeded by ``problem.seed``) makes seeds differ; ``qmc_type`` is
    ``sobol`` (default) or ``halton``."""
    import optuna

    if qmc_type not in ("sobol", "halton"):
        raise ValueError(f"qmc_type: choose between 'sobol', 'halton', got {qmc_type!r}")
    sampler = _quiet_experimental(lambda: optuna.samplers.QMCSampler(
        qmc_type=qmc_type, scramble=scramble, seed=problem.seed,
        warn_asynchronous_seeding=False, warn_independent_sampling=False,
    ))
    return optuna_searcher(problem, sampler)


def nsga2_population_size(num_trials: int | None) -> int:
    """A fifth of the trials, clipped to [8, 20]: several generations even in short searches."""
    if num_trials is None:
        return 16
    return int(min(max(num_trials // 5, 8), 20))


@register_searcher(
    "nsga2",
    description="Optuna NSGAIISampler: Pareto front of val_acc (max) x the cost metric (min); "
    "population max(8, min(20, trials/5)); meant for --budget none",
    objective="multi",
)
def _nsga2(problem: SearchProblem, *, population_size: int | None = None):
    """Multi-objective: maximize ``problem.metric`` and minimize ``problem.cost_metric``
    (the budget's metric, ``latency_ms`` without a budget).

    The budget does not enter the sampler: NSGA-II trades accuracy against cost
    itself, so run it with ``--budget none`` to get the whole front. With a budget
    it still works (every trial projects its policy to the budget, as for all
    searchers), but the cost objective then mostly sits at the limit. The search
    summary reports the Pareto front of the finished trials (``pareto_front``).
    """
    import optuna

    size = nsga2_population_size(problem.num_trials) if population_size is None else population_size
    sampler = optuna.samplers.NSGAIISampler(population_size=size, seed=problem.seed)
    return optuna_searcher(problem, sampler, metric=[problem.metric, problem.cost_metric],
                           mode=[problem.mode, "min"])
