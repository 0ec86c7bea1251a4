"""Optuna samplers through Ray Tune's ``OptunaSearch`` on the flat ``w_i``/``a_i`` space.

The sampler sees the bits it suggested; the trial projects them to the budget and
reports the accuracy of the projected policy, exactly as for every other searcher.
"""

from __future__ import annotations

from ._base import SearchProblem
from ._registry import register_searcher


def optuna_space(problem: SearchProblem) -> dict:
    from optuna.distributions import IntDistribution

    return {k: IntDistribution(problem.min_bits, problem.max_bits) for k in problem.keys}


def optuna_searcher(problem: SearchProblem, sampler, *, metric=None, mode=None, **kwargs):
    """``OptunaSearch`` over the problem's space with ``sampler`` (already seeded)."""
    from ray.tune.search.optuna import OptunaSearch

    return OptunaSearch(
        space=optuna_space(problem),
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
