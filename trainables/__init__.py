"""Models, data, quantization and the Ray Tune trial function."""

from .data import DatasetOptions, DataSplits, load_dataset
from .models import (
    DEMO,
    BuiltModel,
    DemoNet,
    UnknownModelError,
    WeightsError,
    build_model,
    load_weights,
)
from .quantize import QuantLayer, quantize_activation, quantize_model, quantize_weight
from .training import (
    DivergedError,
    ReferenceSettings,
    TrainSettings,
    evaluate,
    pick_device,
    reference_model,
    train,
    train_reference,
)
from .trial import TrialContext, evaluate_on_test, finetune_policy, quantize_and_finetune

__all__ = [
    "DEMO",
    "BuiltModel",
    "DataSplits",
    "DatasetOptions",
    "DemoNet",
    "DivergedError",
    "QuantLayer",
    "ReferenceSettings",
    "TrainSettings",
    "TrialContext",
    "UnknownModelError",
    "WeightsError",
    "build_model",
    "evaluate",
    "evaluate_on_test",
    "finetune_policy",
    "load_dataset",
    "load_weights",
    "pick_device",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "quantize_and_finetune",
    "reference_model",
    "train",
    "train_reference",
]
