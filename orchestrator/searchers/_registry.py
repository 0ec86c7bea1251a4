"""Searcher registry: name -> factory returning a ``ray.tune.search.Searcher``."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ._base import SearchProblem

OBJECTIVES = ("single", "multi")


class UnknownSearcherError(ValueError):
    pass


@dataclass(frozen=True)
class SearcherInfo:
    name: str
    description: str
    objective: str  # "single" (maximize val_acc inside the budget) or "multi" (Pareto front)
    factory: Callable


_REGISTRY: dict[str, SearcherInfo] = {}


def register_searcher(name: str, *, description: str, objective: str = "single"):
    """Decorator: ``factory(problem: SearchProblem, **options) -> Searcher`` under ``name``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: choose between {OBJECTIVES}, got {objective!r}")

    def wrap(factory):
        if name in _REGISTRY:
            raise ValueError(f"searcher {name!r} is already registered")
        _REGISTRY[name] = SearcherInfo(name, description, objective, factory)
        return factory

    return wrap


def searcher_info(name: str) -> SearcherInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise UnknownSearcherError(
            f"unknown searcher {name!r}: choose between {', '.join(sorted(_REGISTRY))}"
        ) from None


def list_searchers() -> dict[str, SearcherInfo]:
    return dict(sorted(_REGISTRY.items()))


def make_searcher(name: str, problem: SearchProblem | None = None, /, **kwargs):
    """Build the searcher registered as ``name``.

    Either pass a ``SearchProblem`` or its fields as keywords
    (``make_searcher("tpe", layers=layers, table=table, seed=0)``); keywords that are
    not ``SearchProblem`` fields are the searcher's own options.
    """
    info = searcher_info(name)
    if problem is None:
        fields = SearchProblem.__dataclass_fields__
        problem = SearchProblem(**{k: kwargs.pop(k) for k in list(kwargs) if k in fields})
    return info.factory(problem, **kwargs)
