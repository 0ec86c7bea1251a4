"""Per-layer allowed bit widths: the one description of what a search may choose.

A search's space is, per layer, a set of weight widths and a set of activation
widths. ``min_bits``/``max_bits`` give every layer the same range; ``bits: {w: [2, 4,
8], a: [4, 8]}`` restricts it to the widths a target really supports; HAQ's
convention (``fix_first_last``) leaves the first layer and the classifier a single
choice, their highest width (8/8). All three are the same thing, an ``AllowedBits``,
and every consumer reads only it: the projection (``project`` steps down through
allowed widths, ``check_feasible`` prices each layer at its lowest allowed one),
Ray Tune's ``bitwidth_space`` and every searcher's encoding.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from hardware import MAX_BITS, MIN_BITS, NUM_BITS, check_policies

_KINDS = ("w", "a")  # column 0 = weights, column 1 = activations, as in a policy


def check_bit_range(min_bits: int, max_bits: int) -> None:
    if not (MIN_BITS <= min_bits <= max_bits <= MAX_BITS):
        raise ValueError(
            f"bits: expected {MIN_BITS} <= min_bits <= max_bits <= {MAX_BITS}, "
            f"got min_bits={min_bits}, max_bits={max_bits}"
        )


def check_bit_set(label: str, widths, low: int = MIN_BITS, high: int = MAX_BITS) -> tuple[int, ...]:
    """A user's list of widths as a sorted tuple; ValueError unless a non-empty list in [low, high]."""
    if isinstance(widths, str | bytes) or not isinstance(widths, Iterable):
        raise ValueError(f"{label}: expected a list of bit widths in [{low}, {high}], got {widths!r}")
    out = set()
    for value in widths:
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise ValueError(f"{label}: expected integer bit widths in [{low}, {high}], got {value!r}")
        if not low <= value <= high:
            raise ValueError(f"{label}: expected bit widths in [{low}, {high}], got {int(value)}")
        out.add(int(value))
    if not out:
        raise ValueError(f"{label}: expected at least one bit width in [{low}, {high}], got an empty list")
    return tuple(sorted(out))


def format_widths(widths: Iterable[int]) -> str:
    """``1-8`` for a run of consecutive widths, ``2,4,8`` otherwise."""
    ws = sorted(widths)
    if len(ws) > 2 and ws[-1] - ws[0] == len(ws) - 1:
        return f"{ws[0]}-{ws[-1]}"
    return ",".join(map(str, ws))


def _at_most(widths: tuple[int, ...], k: int) -> int:
    """The largest of ``widths`` (ascending) <= k, or the smallest if none is."""
    below = [w for w in widths if w <= k]
    return below[-1] if below else widths[0]


@functools.lru_cache(maxsize=64)
def _full(cls, num_layers: int, min_bits: int, max_bits: int):
    widths = tuple(range(min_bits, max_bits + 1))
    return cls((widths,) * num_layers, (widths,) * num_layers)


@dataclass(frozen=True)
class AllowedBits:
    """Allowed weight (``w``) and activation (``a``) widths of each layer, ascending.

    ``w[l]``/``a[l]`` are non-empty sorted tuples of widths in [1, 8]. Hashable and
    comparable (the projection caches per table and ``AllowedBits``); derived arrays
    (``mask``, ``lowest``, ...) are computed once per instance.
    """

    w: tuple[tuple[int, ...], ...]
    a: tuple[tuple[int, ...], ...]

    def __post_init__(self) -> None:
        if len(self.w) != len(self.a) or not self.w:
            raise ValueError(
                f"allowed bits: expected the same non-zero number of layers for w and a, "
                f"got {len(self.w)} and {len(self.a)}"
            )
        for kind in _KINDS:
            sets = tuple(check_bit_set(f"allowed {kind} bits of layer {i}", s)
                         for i, s in enumerate(getattr(self, kind)))
            object.__setattr__(self, kind, sets)

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def full(cls, num_layers: int, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> AllowedBits:
        """Every width in [min_bits, max_bits] for every layer (one shared instance per
        argument tuple, so its derived arrays are computed once)."""
        check_bit_range(min_bits, max_bits)
        return _full(cls, int(num_layers), int(min_bits), int(max_bits))

    @classmethod
    def build(cls, num_layers: int, *, min_bits: int = MIN_BITS, max_bits: int = MAX_BITS,
              w_bits=None, a_bits=None, fix_first_last: bool = False) -> AllowedBits:
        """The space of a search: ``w_bits``/``a_bits`` (None = all of [min_bits, max_bits])
        for every layer, except that ``fix_first_last`` leaves the first and the last
        layer only their highest width (8/8 unless the sets or ``max_bits`` exclude 8).
        """
        check_bit_range(min_bits, max_bits)
        if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
            raise ValueError(f"num_layers: expected an integer >= 1, got {num_layers!r}")
        full = tuple(range(min_bits, max_bits + 1))
        ws = full if w_bits is None else check_bit_set("bits.w", w_bits, min_bits, max_bits)
        as_ = full if a_bits is None else check_bit_set("bits.a", a_bits, min_bits, max_bits)
        w, a = [ws] * num_layers, [as_] * num_layers
        if fix_first_last:
            for layer in {0, num_layers - 1}:
                w[layer], a[layer] = (ws[-1],), (as_[-1],)
        return cls(tuple(w), tuple(a))

    @classmethod
    def resolve(cls, num_layers: int, allowed: AllowedBits | None,
                min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> AllowedBits:
        """``allowed`` checked against ``num_layers``, or ``full(num_layers, min_bits, max_bits)``."""
        if allowed is None:
            return cls.full(num_layers, min_bits, max_bits)
        if (min_bits, max_bits) != (MIN_BITS, MAX_BITS):
            raise ValueError("expected either allowed bits or min_bits/max_bits, got both")
        if allowed.num_layers != num_layers:
            raise ValueError(f"allowed bits: expected {num_layers} layers, got {allowed.num_layers}")
        return allowed

    def to_state(self) -> dict:
        """JSON-friendly form (searcher checkpoints)."""
        return {"w": [list(s) for s in self.w], "a": [list(s) for s in self.a]}

    @classmethod
    def from_state(cls, state: dict) -> AllowedBits:
        return cls(tuple(map(tuple, state["w"])), tuple(map(tuple, state["a"])))

    # ---- derived arrays --------------------------------------------------------------

    @property
    def num_layers(self) -> int:
        return len(self.w)

    @functools.cached_property
    def mask(self) -> np.ndarray:
        """``[L, 2, 8]`` bool: ``mask[l, c, b - 1]`` is True if width ``b`` is allowed in
        layer ``l``'s weights (``c = 0``) or activations (``c = 1``). Read-only."""
        mask = np.zeros((self.num_layers, 2, NUM_BITS), dtype=bool)
        for col, kind in enumerate(_KINDS):
            for layer, widths in enumerate(getattr(self, kind)):
                mask[layer, col, np.asarray(widths) - MIN_BITS] = True
        mask.flags.writeable = False
        return mask

    @functools.cached_property
    def lowest(self) -> np.ndarray:
        """``[L, 2]`` int64: each layer's lowest allowed (w, a), the cheapest policy."""
        return self._frozen([[w[0], a[0]] for w, a in zip(self.w, self.a, strict=True)])

    @functools.cached_property
    def highest(self) -> np.ndarray:
        """``[L, 2]`` int64: each layer's highest allowed (w, a)."""
        return self._frozen([[w[-1], a[-1]] for w, a in zip(self.w, self.a, strict=True)])

    @functools.cached_property
    def fixed(self) -> np.ndarray:
        """``[L]`` bool: layers with a single allowed (w, a), nothing to choose."""
        out = self.mask.sum(axis=2).max(axis=1) == 1
        out.flags.writeable = False
        return out

    @functools.cached_property
    def _snap_table(self) -> np.ndarray:
        """``[L, 2, 9]``: for bits ``b`` in 1..8, the largest allowed width <= b, else the lowest."""
        bits = np.arange(MIN_BITS, MAX_BITS + 1)
        allowed_bits = np.where(self.mask, bits, 0)  # [L, 2, 8]
        # Largest allowed width <= b: running maximum over the widths in ascending order.
        below = np.maximum.accumulate(allowed_bits, axis=2)
        table = np.zeros((self.num_layers, 2, MAX_BITS + 1), dtype=np.int64)
        table[:, :, MIN_BITS:] = np.where(below > 0, below, self.lowest[:, :, None])
        return self._frozen(table)

    @functools.cached_property
    def step_down(self) -> np.ndarray:
        """``[L, 2, 9]``: for bits ``b``, the next lower allowed width, or ``b`` if there is none.

        One projection step: the budget rule lowers a width to the next allowed one.
        """
        table = np.arange(MAX_BITS + 1)[None, None, :].repeat(self.num_layers, 0).repeat(2, 1)
        below = self._snap_table[:, :, : MAX_BITS]  # largest allowed <= b - 1, for b = 1..8
        has_lower = np.zeros_like(self.mask)
        has_lower[:, :, 1:] = np.logical_or.accumulate(self.mask, axis=2)[:, :, :-1]
        table[:, :, MIN_BITS:] = np.where(has_lower, below, table[:, :, MIN_BITS:])
        return self._frozen(table)

    @staticmethod
    def _frozen(values) -> np.ndarray:
        arr = np.asarray(values, dtype=np.int64)
        arr.flags.writeable = False
        return arr

    # ---- policies --------------------------------------------------------------------

    def snap(self, policy) -> np.ndarray:
        """``policy`` (``[L, 2]`` ints in [1, 8]) with every width replaced by the largest
        allowed width <= it, or the layer's lowest if none is (clipping to [min, max]
        for a range; a fixed layer always gets its width). A new int64 array."""
        pol = check_policies(policy, self.num_layers)[0]
        rows = np.arange(self.num_layers)[:, None]
        return self._snap_table[rows, np.arange(2)[None, :], pol].copy()

    def contains(self, policy) -> bool:
        """True if every width of ``policy`` is allowed for its layer."""
        pol = np.asarray(policy, dtype=np.int64)
        if pol.shape != (self.num_layers, 2) or pol.min() < MIN_BITS or pol.max() > MAX_BITS:
            return False
        rows = np.arange(self.num_layers)[:, None]
        return bool(self.mask[rows, np.arange(2)[None, :], pol - MIN_BITS].all())

    def common(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(w widths, a widths) allowed on every layer that has a choice (every layer if
        none has): the widths a uniform policy can use."""
        rows = np.flatnonzero(~self.fixed) if not self.fixed.all() else np.arange(self.num_layers)
        both = self.mask[rows].all(axis=0)  # [2, 8]
        bits = np.arange(MIN_BITS, MAX_BITS + 1)
        return tuple(bits[both[0]].tolist()), tuple(bits[both[1]].tolist())

    def uniform_pairs(self) -> list[tuple[int, int]]:
        """The space's uniform (w, a) pairs, widest first, without duplicates: for each
        width k of ``common()`` (highest first) the largest common w <= k and a <= k, so
        ``w 4,8 a 8`` gives 8/8 and 4/8. Empty when no width is common to every searched layer.
        Both columns fall with k, so the first pair inside a budget is the widest one that is."""
        common_w, common_a = self.common()
        if not common_w or not common_a:
            return []
        widths = sorted(set(common_w) | set(common_a), reverse=True)
        return list(dict.fromkeys((_at_most(common_w, k), _at_most(common_a, k)) for k in widths))

    def uniform(self, w_bits: int, a_bits: int) -> np.ndarray:
        """``[L, 2]``: every layer at (w_bits, a_bits) where allowed; a fixed layer (e.g.
        ``fix_first_last``) keeps its own width, so "uniform 4-bit" is 4/4 on every searched layer."""
        pol = np.empty((self.num_layers, 2), dtype=np.int64)
        pol[:, 0], pol[:, 1] = w_bits, a_bits
        return self.snap(pol)

    def describe(self) -> str:
        """Short text for messages: ``w 2,4,8 a 4,8 (layers 1-10); w 8 a 8 (layers 0, 11)``."""
        groups: dict[tuple, list[int]] = {}
        for layer, pair in enumerate(zip(self.w, self.a, strict=True)):
            groups.setdefault(pair, []).append(layer)
        parts = []
        for (w, a), layers in groups.items():
            text = f"w {format_widths(w)} a {format_widths(a)}"
            if len(groups) > 1:
                run = len(layers) > 2 and layers[-1] - layers[0] == len(layers) - 1
                where = f"{layers[0]}-{layers[-1]}" if run else ", ".join(map(str, layers))
                text += f" (layer{'s' if len(layers) > 1 else ''} {where})"
            parts.append(text)
        return "; ".join(parts)
