"""Searchers: every one a ``ray.tune.search.Searcher`` built by name from the registry.

    from orchestrator.searchers import make_searcher
    searcher = make_searcher("tpe", layers=layers, table=table, budget=budget, seed=0)
"""

# Importing a searcher module registers it.
from . import _optuna, aqgan, haq, sensitivity_dp, uniform  # noqa: F401
from ._base import SEARCHER_ARTIFACTS_DIR, SearchProblem
from ._registry import (
    SearcherInfo,
    UnknownSearcherError,
    list_searchers,
    make_searcher,
    register_searcher,
    searcher_info,
)

__all__ = [
    "SEARCHER_ARTIFACTS_DIR",
    "SearchProblem",
    "SearcherInfo",
    "UnknownSearcherError",
    "list_searchers",
    "make_searcher",
    "register_searcher",
    "searcher_info",
]
