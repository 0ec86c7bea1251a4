"""Policy encoding: an ``[L, 2]`` int array <-> flat Ray Tune config keys ``w_i``/``a_i``.

Every searcher, Optuna's included, sees the same flat integer space, so a policy
suggested by any of them means the same thing.
"""

from __future__ import annotations

import numpy as np

from hardware import MAX_BITS, MIN_BITS

from ._allowed import AllowedBits


def w_key(i: int) -> str:
    return f"w_{i}"


def a_key(i: int) -> str:
    return f"a_{i}"


def policy_keys(num_layers: int) -> list[str]:
    """Keys in policy order: ``w_0, a_0, w_1, a_1, ...`` (HAQ's step order)."""
    return [k for i in range(num_layers) for k in (w_key(i), a_key(i))]


def bitwidth_space(layers, *, allowed: AllowedBits | None = None,
                   min_bits: int = MIN_BITS, max_bits: int = MAX_BITS) -> dict:
    """Ray Tune ``param_space`` over the allowed widths (``allowed``, or [min_bits, max_bits]
    for every layer): ``tune.randint`` for a run of consecutive widths, ``tune.choice``
    for any other set, the width itself for a layer with one choice (a fixed layer).

    ``layers`` is the layer list from ``extract_layers`` (one ``w_i``/``a_i`` pair per
    entry) or a layer count.
    """
    from ray import tune

    if isinstance(layers, bool) or not isinstance(layers, int):
        try:
            layers = len(layers)
        except TypeError:
            raise TypeError(
                f"layers: expected a layer list (extract_layers) or a layer count, got {type(layers).__name__}"
            ) from None
    if layers < 1:
        raise ValueError(f"layers: expected at least one layer, got {layers}")
    allowed = AllowedBits.resolve(layers, allowed, min_bits, max_bits)
    space = {}
    for i in range(layers):
        for key, widths in ((w_key(i), allowed.w[i]), (a_key(i), allowed.a[i])):
            if len(widths) == 1:
                space[key] = widths[0]
            elif widths[-1] - widths[0] == len(widths) - 1:
                space[key] = tune.randint(widths[0], widths[-1] + 1)
            else:
                space[key] = tune.choice(list(widths))
    return space


def policy_from_config(config: dict, num_layers: int) -> np.ndarray:
    """The ``[L, 2]`` policy in a trial config; KeyError names a missing key."""
    pol = np.empty((num_layers, 2), dtype=np.int64)
    for i in range(num_layers):
        pol[i, 0] = int(round(float(config[w_key(i)])))
        pol[i, 1] = int(round(float(config[a_key(i)])))
    return pol


def config_from_policy(policy) -> dict[str, int]:
    pol = np.asarray(policy)
    return {k: int(v) for i in range(pol.shape[0]) for k, v in ((w_key(i), pol[i, 0]), (a_key(i), pol[i, 1]))}


def format_policy(policy) -> str:
    """Compact text form, ``w/a`` per layer: ``8/8 4/6 2/3``."""
    return " ".join(f"{int(w)}/{int(a)}" for w, a in np.asarray(policy))


def parse_policy(text: str) -> np.ndarray:
    """Inverse of ``format_policy``."""
    pairs = [tok.split("/") for tok in str(text).split()]
    return np.array([[int(w), int(a)] for w, a in pairs], dtype=np.int64)
