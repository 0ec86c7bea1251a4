"""The accuracy oracle of sensitivity-based searchers: one layer quantized, no fine-tune.

``make_sensitivity_oracle(context)(layer, w_bits, a_bits)`` is the validation
accuracy of the reference model with only layer ``layer`` quantized to
``(w_bits, a_bits)`` (all other layers in full precision), its activation range
calibrated on a fixed batch of training data, without any fine-tuning;
``layer=None`` evaluates the unquantized reference. It is what
``SearchProblem.accuracy_oracle`` expects and what ``sensitivity-dp`` measures each
layer's sensitivity with.

Where it runs: ``SensitivityEvaluator`` loads data and model once and evaluates
points; the oracle hands each batch of uncached points (``evaluate_many``; a plain
call is a batch of one) to its ``runner``. Without a runner the evaluator runs in
the calling process; a search passes ``orchestrator.remote.RemoteSensitivityRunner``,
which runs evaluators as Ray actors with a trial's resources (never on the head).
Deterministic: one torch thread per evaluation (float reductions depend on the
thread count), one calibration batch drawn with a ``torch.Generator`` seeded by the
search seed and shared by every point, so an answer does not depend on the process
or batch that computed it. Answers are cached per ``(layer, w_bits, a_bits)``;
pickling drops a loaded in-process evaluator (it reloads on demand), so the oracle
travels cheaply with a searcher.
"""

from __future__ import annotations

import torch

from .quantize import quantize_model
from .training import evaluate, pick_device
from .trial import CALIBRATION_SAMPLES, TrialContext, _cached_dataset

Point = tuple[int | None, int, int]  # (layer or None, w_bits, a_bits)


class SensitivityEvaluator:
    """Loads the reference model, validation data and calibration batch once, then
    evaluates points (one layer quantized, no fine-tune). Also a Ray actor class."""

    def __init__(self, context: TrialContext, *, calibration_samples: int = CALIBRATION_SAMPLES,
                 gpus: float = 0.0, device: str | None = None) -> None:
        ctx = self.context = context
        self.device = torch.device(device) if device is not None else pick_device(gpus)
        data = _cached_dataset(ctx.dataset, ctx.data_root, ctx.input_size, ctx.dataset_options)
        self.model = ctx.reference_model(self.device).eval()
        self.val = data.val
        generator = torch.Generator().manual_seed(ctx.seed)
        idx = torch.randperm(len(data.train), generator=generator)[:calibration_samples]
        self.calib = torch.stack([data.train[int(i)][0] for i in idx]).to(self.device)

    def evaluate(self, layer: int | None, w_bits: int, a_bits: int) -> float:
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            with torch.no_grad():
                model = self.model
                if layer is not None:
                    model = quantize_model(model, [self.context.layer_names[layer]], [(w_bits, a_bits)],
                                           self.calib, self.context.quant)
                return float(evaluate(model, self.val, device=self.device))
        finally:
            torch.set_num_threads(threads)

    def evaluate_indexed(self, index: int, point: Point) -> tuple[int, float]:
        return index, self.evaluate(*point)

    def node(self) -> dict:
        from .node import node_info

        return node_info()


class SensitivityOracle:
    """Callable ``(layer: int | None, w_bits, a_bits) -> val_acc`` (see the module docstring).

    ``runner(context, points, calibration_samples) -> [val_acc, ...]`` evaluates a
    batch of uncached points somewhere (default: an in-process ``SensitivityEvaluator``).
    """

    def __init__(self, context: TrialContext, *, calibration_samples: int = CALIBRATION_SAMPLES,
                 device: str = "cpu", runner=None) -> None:
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples: expected >= 1, got {calibration_samples}")
        self.context = context
        self.calibration_samples = calibration_samples
        self.device = device
        self.runner = runner
        self.cache: dict[Point, float] = {}
        self.evaluations = 0  # real evaluations (cache misses)
        self._local: SensitivityEvaluator | None = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_local"] = None
        return state

    def _key(self, layer: int | None, w_bits: int, a_bits: int) -> Point:
        names = self.context.layer_names
        if layer is None:
            return (None, 0, 0)  # nothing is quantized: the bits do not matter
        if not 0 <= int(layer) < len(names):
            raise ValueError(f"layer: expected an index in [0, {len(names)}) or None, got {layer}")
        return (int(layer), int(w_bits), int(a_bits))

    def _run_local(self, context, points: list[Point], calibration_samples: int) -> list[float]:
        if self._local is None:
            self._local = SensitivityEvaluator(context, calibration_samples=calibration_samples,
                                               device=self.device)
        return [self._local.evaluate(*point) for point in points]

    def evaluate_many(self, points) -> list[float]:
        """The answers for ``points`` (``(layer, w_bits, a_bits)`` each), in order; the
        uncached ones are evaluated as one batch by the runner."""
        keys = [self._key(*point) for point in points]
        missing = list(dict.fromkeys(k for k in keys if k not in self.cache))
        if missing:
            runner = self.runner or self._run_local
            for key, acc in zip(missing, runner(self.context, missing, self.calibration_samples), strict=True):
                self.cache[key] = float(acc)
            self.evaluations += len(missing)
        return [self.cache[k] for k in keys]

    def __call__(self, layer: int | None, w_bits: int, a_bits: int) -> float:
        return self.evaluate_many([(layer, w_bits, a_bits)])[0]


def make_sensitivity_oracle(context: TrialContext, **options) -> SensitivityOracle:
    """The one-layer-at-a-time accuracy oracle of a search (``SearchProblem.accuracy_oracle``)."""
    return SensitivityOracle(context, **options)
