"""The fixed-bitwidth baseline as a Ray Tune searcher: ``uniform``.

Suggests every uniform policy once, in order, then ``Searcher.FINISHED``:

- default: ``k/k`` for k = max_bits down to min_bits (8/8, 7/7, ..., 1/1); with bit
  sets, for each allowed k (highest first) the largest allowed w <= k and a <= k,
  e.g. ``w: [4, 8], a: [8]`` gives 8/8 and 4/8;
- ``bits=[8, 6, 4]``: those k/k policies;
- ``w_bits=[8, 4], a_bits=[8, 8]``: the pairs 8/8 and 4/8 (lists of equal length).

Only widths allowed on every layer that has a choice can be used (``problem.allowed``);
a fixed layer (e.g. ``fix_first_last``) keeps its own width in every policy, so
"uniform 4-bit" means 4/4 on every searched layer. Duplicates are suggested once. Each suggestion is the raw uniform policy; the trial
projects it to the budget like every searcher's, so under a tight budget the high
k/k policies come back lowered (no longer uniform) and the largest k whose own
cost fits is the honest "uniform k-bit under budget" baseline.

How Ray Tune ends the experiment. ``SearchGenerator`` marks itself finished the
first time ``suggest`` returns ``FINISHED``; Tune then runs the trials already
created to completion and stops, even if ``num_samples`` is larger (8 policies
and ``--num-trials 12`` give 8 trials; the summary's ``num_trials`` says 8). With
fewer ``num_samples`` than policies, Tune stops at ``num_samples`` as usual
(``--num-trials 3`` gives 8/8, 7/7 and 6/6).

Checkpoint (``save``/``restore``): JSON, written atomically (temp file + rename),
with the policies, the position, pending trials, metric/mode and the space
(restore refuses a different space). Unknown trial ids are ignored.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from ray.tune.search import Searcher

from search_spaces import config_from_policy, format_widths

from ..config import atomic_write_text
from ._base import SearchProblem, SearchPropertiesMixin, check_checkpoint, space_state
from ._registry import register_searcher

_CHECKPOINT_VERSION = 1


def _bit_list(label: str, values, allowed: tuple[int, ...]) -> list[int]:
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise ValueError(f"{label}: expected a list of bitwidths, got {values!r}")
    out = []
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int | np.integer):
            raise ValueError(f"{label}: expected integer bitwidths, got {v!r}")
        if int(v) not in allowed:
            raise ValueError(
                f"{label}: expected bits allowed on every searched layer ({format_widths(allowed)}), "
                f"got {int(v)}"
            )
        out.append(int(v))
    if not out:
        raise ValueError(f"{label}: expected at least one bitwidth, got an empty list")
    return out


def uniform_pairs(problem: SearchProblem, *, bits=None, w_bits=None, a_bits=None) -> list[tuple[int, int]]:
    """The (w, a) pairs the searcher suggests, in order, without duplicates."""
    if bits is not None and (w_bits is not None or a_bits is not None):
        raise ValueError("uniform: expected either bits or w_bits/a_bits, got both")
    if (w_bits is None) != (a_bits is None):
        raise ValueError("uniform: expected w_bits and a_bits together (pairs), got only one")
    common_w, common_a = problem.allowed.common()
    if not common_w or not common_a:
        raise ValueError(
            f"uniform: expected a weight and an activation width allowed on every searched layer, "
            f"got allowed bits {problem.allowed.describe()}"
        )
    if w_bits is not None:
        ws, as_ = _bit_list("w_bits", w_bits, common_w), _bit_list("a_bits", a_bits, common_a)
        if len(ws) != len(as_):
            raise ValueError(f"w_bits/a_bits: expected lists of equal length, got {len(ws)} and {len(as_)}")
        pairs = list(zip(ws, as_, strict=True))
    elif bits is not None:
        both = tuple(sorted(set(common_w) & set(common_a)))
        pairs = [(k, k) for k in _bit_list("bits", bits, both)]
    else:
        pairs = problem.allowed.uniform_pairs()
    return list(dict.fromkeys(pairs))


class UniformSearcher(SearchPropertiesMixin, Searcher):
    """Every uniform (w, a) policy once, then ``FINISHED`` (see the module docstring)."""

    def __init__(self, problem: SearchProblem, *, bits=None, w_bits=None, a_bits=None) -> None:
        super().__init__(metric=problem.metric, mode=problem.mode)
        self.problem = problem
        self.pairs = uniform_pairs(problem, bits=bits, w_bits=w_bits, a_bits=a_bits)
        self.next_index = 0
        self._pending: dict[str, int] = {}  # trial id -> index into pairs
        self.completed: dict[str, int] = {}

    def _config(self, index: int) -> dict:
        return config_from_policy(self.problem.allowed.uniform(*self.pairs[index]))  # fixed layers: their width

    def suggest(self, trial_id: str):
        if trial_id in self._pending:  # asked twice: same answer
            return self._config(self._pending[trial_id])
        if self.next_index >= len(self.pairs):
            return Searcher.FINISHED
        index = self.next_index
        self.next_index += 1
        self._pending[trial_id] = index
        return self._config(index)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        index = self._pending.pop(trial_id, None)
        if index is not None:  # unknown ids are ignored
            self.completed[trial_id] = index

    def save(self, checkpoint_path: str) -> None:
        state = {
            "version": _CHECKPOINT_VERSION, "metric": self._metric, "mode": self._mode,
            "space": space_state(self.problem), "pairs": self.pairs, "next_index": self.next_index,
            "pending": self._pending, "completed": self.completed,
        }
        atomic_write_text(Path(checkpoint_path), json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        check_checkpoint("uniform", checkpoint_path, state, _CHECKPOINT_VERSION, self.problem)
        self._metric, self._mode = state["metric"], state["mode"]
        self.pairs = [(int(w), int(a)) for w, a in state["pairs"]]
        self.next_index = int(state["next_index"])
        self._pending = {k: int(v) for k, v in state["pending"].items()}
        self.completed = {k: int(v) for k, v in state["completed"].items()}


@register_searcher(
    "uniform",
    description="every uniform k/k policy once (k = the allowed widths, highest first, or bits=[..] / "
    "w_bits+a_bits pairs), then FINISHED",
)
def _uniform(problem: SearchProblem, *, bits=None, w_bits=None, a_bits=None) -> UniformSearcher:
    """The fixed-bitwidth baseline; ``bits``/``w_bits``/``a_bits`` as in the module docstring."""
    return UniformSearcher(problem, bits=bits, w_bits=w_bits, a_bits=a_bits)
