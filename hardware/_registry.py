"""Cost-model registry: name -> factory, like Ray Tune's searcher registry."""

from __future__ import annotations

from collections.abc import Callable

from ._cost import CostModel

_FACTORIES: dict[str, Callable[..., CostModel]] = {}
_DESCRIPTIONS: dict[str, str] = {}


class UnknownHardwareError(ValueError):
    pass


def register_cost_model(name: str, description: str):
    """Class/function decorator: make ``factory(**kwargs)`` available as ``name``."""

    def wrap(factory):
        if name in _FACTORIES:
            raise ValueError(f"cost model {name!r} is already registered")
        _FACTORIES[name] = factory
        _DESCRIPTIONS[name] = description
        return factory

    return wrap


def list_cost_models() -> dict[str, str]:
    """Registered cost-model names and their one-line descriptions."""
    return dict(_DESCRIPTIONS)


def get_cost_model(name: str, **kwargs) -> CostModel:
    """Build the cost model registered as ``name`` (keyword arguments go to its factory)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownHardwareError(
            f"unknown hardware {name!r}: choose between {', '.join(sorted(_FACTORIES))}"
        ) from None
    return factory(**kwargs)
