"""Models, data, quantization and the Ray Tune trial function."""

from .data import DataSplits, load_dataset
from .export import (
    IntegerQuantLayer,
    ModelIdentity,
    load_quantized,
    policy_report,
    save_quantized,
    to_integer_model,
    to_onnx,
    verify_onnx,
)
from .models import DEMO, BuiltModel, DemoNet, UnknownModelError, build_model
from .quantize import QuantLayer, quantize_activation, quantize_model, quantize_weight
from .training import DivergedError, TrainSettings, evaluate, pick_device, train, train_reference
from .trial import (
    TrialContext,
    evaluate_checkpoint,
    evaluate_on_test,
    finetune_policy,
    load_quantized_checkpoint,
    quantize_and_finetune,
)

__all__ = [
    "DEMO",
    "BuiltModel",
    "DataSplits",
    "DemoNet",
    "DivergedError",
    "IntegerQuantLayer",
    "ModelIdentity",
    "QuantLayer",
    "TrainSettings",
    "TrialContext",
    "UnknownModelError",
    "build_model",
    "evaluate",
    "evaluate_checkpoint",
    "evaluate_on_test",
    "finetune_policy",
    "load_dataset",
    "load_quantized",
    "load_quantized_checkpoint",
    "policy_report",
    "pick_device",
    "save_quantized",
    "to_integer_model",
    "to_onnx",
    "verify_onnx",
    "quantize_activation",
    "quantize_model",
    "quantize_weight",
    "quantize_and_finetune",
    "train",
    "train_reference",
]
