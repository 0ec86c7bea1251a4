"""Cost-model registry: name -> factory, like Ray Tune's searcher registry."""

from __future__ import annotations

from collections.abc import Callable

from ._cost import CostModel

_FACTORIES: dict[str, Callable[..., CostModel]] = {}
_DESCRIPTIONS: dict[str, str] = {}
_NATURAL_BITS: dict[str, tuple[int, ...]] = {}


class UnknownHardwareError(ValueError):
    pass


def register_cost_model(name: str, description: str, *, natural_bits=None):
    """Class/function decorator: make ``factory(**kwargs)`` available as ``name``.

    ``natural_bits``: the widths the hardware really distinguishes, if not all of 1-8
    (the model's ``natural_bits``), so ``haqtune hardware`` can show them without
    building the model.
    """

    def wrap(factory):
        if name in _FACTORIES:
            raise ValueError(f"cost model {name!r} is already registered")
        _FACTORIES[name] = factory
        _DESCRIPTIONS[name] = description
        if natural_bits is not None:
            _NATURAL_BITS[name] = tuple(natural_bits)
        return factory

    return wrap


def list_cost_models() -> dict[str, str]:
    """Registered cost-model names and their one-line descriptions."""
    return dict(_DESCRIPTIONS)


def cost_model_natural_bits(name: str) -> tuple[int, ...] | None:
    """The registered model's natural bit widths, or None if every width 1-8 costs its own."""
    if name not in _FACTORIES:
        get_cost_model(name)  # raises "unknown hardware ...: choose between ..."
    return _NATURAL_BITS.get(name)


def get_cost_model(name: str, **kwargs) -> CostModel:
    """Build the cost model registered as ``name`` (keyword arguments go to its factory)."""
    try:
        factory = _FACTORIES[name]
    except KeyError:
        raise UnknownHardwareError(
            f"unknown hardware {name!r}: choose between {', '.join(sorted(_FACTORIES))}"
        ) from None
    return factory(**kwargs)
