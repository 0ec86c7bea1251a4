"""Models, data, quantization and the Ray Tune trial function."""

from .data import DataSplits, load_dataset
from .models import DEMO, BuiltModel, DemoNet, UnknownModelError, build_model
from .quantize import QuantLayer, QuantOptions, quantize_activation, quantize_model, quantize_weight
from .training import DivergedError, TrainSettings, evaluate, pick_device, train, train_reference
from .trial import TrialContext, evaluate_on_test, finetune_policy, quantize_and_finetune

__all__ = [
    "DEMO",
    "BuiltModel",
    "DataSplits",
    "DemoNet",
    "DivergedError",
    "QuantLayer",
    "QuantOptions",
    "TrainSettings",
    "TrialContext",
    "UnknownModelError",
    "build_model",
    "evaluate",
    "evaluate_on_test",
    "finetune_policy",
    "load_dataset",
    "pick_device",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "quantize_and_finetune",
    "train",
    "train_reference",
]
