"""The accuracy oracle of sensitivity-based searchers: one layer quantized, no fine-tune.

``make_sensitivity_oracle(context)(layer, w_bits, a_bits)`` is the validation
accuracy of the reference model with only layer ``layer`` quantized to
``(w_bits, a_bits)`` (all other layers in full precision), its activation range
calibrated on a fixed batch of training data, without any fine-tuning;
``layer=None`` evaluates the unquantized reference. It is what
``SearchProblem.accuracy_oracle`` expects and what ``sensitivity-dp`` measures each
layer's sensitivity with.

Cheap to construct: data and model load on the first call, in the calling process
(the search driver). Deterministic: CPU by default, one torch thread during the
call (float reductions depend on the thread count), one calibration batch drawn
with a ``torch.Generator`` seeded by the search seed and shared by every call.
Answers are cached per ``(layer, w_bits, a_bits)``; pickling drops the loaded data
and model (they reload on demand), so the oracle travels cheaply with a searcher.
"""

from __future__ import annotations

import torch

from .models import build_model
from .quantize import quantize_model
from .training import evaluate
from .trial import CALIBRATION_SAMPLES, TrialContext, _cached_dataset


class SensitivityOracle:
    """Callable ``(layer: int | None, w_bits, a_bits) -> val_acc`` (see the module docstring)."""

    def __init__(self, context: TrialContext, *, calibration_samples: int = CALIBRATION_SAMPLES,
                 device: str = "cpu") -> None:
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples: expected >= 1, got {calibration_samples}")
        self.context = context
        self.calibration_samples = calibration_samples
        self.device = torch.device(device)
        self.cache: dict[tuple[int | None, int, int], float] = {}
        self.evaluations = 0  # real evaluations (cache misses)
        self._loaded = None  # (model, val split, calibration batch)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_loaded"] = None
        return state

    def _load(self):
        if self._loaded is None:
            ctx = self.context
            data = _cached_dataset(ctx.dataset, ctx.data_root, ctx.input_size, ctx.dataset_options)
            model = build_model(ctx.model, seed=ctx.seed, **ctx.model_kwargs).model
            model.load_state_dict(ctx.reference_state)
            model.to(self.device).eval()
            generator = torch.Generator().manual_seed(ctx.seed)
            idx = torch.randperm(len(data.train), generator=generator)[: self.calibration_samples]
            calib = torch.stack([data.train[int(i)][0] for i in idx]).to(self.device)
            self._loaded = (model, data.val, calib)
        return self._loaded

    def __call__(self, layer: int | None, w_bits: int, a_bits: int) -> float:
        names = self.context.layer_names
        if layer is not None and not 0 <= int(layer) < len(names):
            raise ValueError(f"layer: expected an index in [0, {len(names)}) or None, got {layer}")
        key = (None if layer is None else int(layer), int(w_bits), int(a_bits))
        if layer is None:
            key = (None, 0, 0)  # nothing is quantized: the bits do not matter
        if key in self.cache:
            return self.cache[key]
        model, val, calib = self._load()
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                if layer is not None:
                    model = quantize_model(model, [names[key[0]]], [(key[1], key[2])], calib,
                                           self.context.quant)
                acc = float(evaluate(model, val, device=self.device))
        finally:
            torch.set_num_threads(threads)
        self.evaluations += 1
        self.cache[key] = acc
        return acc


def make_sensitivity_oracle(context: TrialContext, **options) -> SensitivityOracle:
    """The one-layer-at-a-time accuracy oracle of a search (``SearchProblem.accuracy_oracle``)."""
    return SensitivityOracle(context, **options)
