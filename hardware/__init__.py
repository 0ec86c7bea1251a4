"""Hardware cost models (accelerator simulators) and the layer shapes they price.

Public API::

    from hardware import extract_layers, get_cost_model
    layers = extract_layers(model, (3, 224, 224))
    table = get_cost_model("bismo-edge").table(layers)   # CostTable, built once
    costs = table.evaluate(policies)                     # [N, L, 2] -> Costs
"""

from ._analytic import AnalyticCostModel
from ._cost import (
    BITS,
    BYTES_PER_MB,
    MAX_BITS,
    MIN_BITS,
    NUM_BITS,
    CostModel,
    Costs,
    CostTable,
    check_policies,
)
from ._layers import LAYER_KINDS, LayerSpec, NoQuantizableLayersError, extract_layers
from ._registry import UnknownHardwareError, get_cost_model, list_cost_models, register_cost_model

__all__ = [
    "BITS",
    "BYTES_PER_MB",
    "LAYER_KINDS",
    "MAX_BITS",
    "MIN_BITS",
    "NUM_BITS",
    "AnalyticCostModel",
    "CostModel",
    "CostTable",
    "Costs",
    "LayerSpec",
    "NoQuantizableLayersError",
    "UnknownHardwareError",
    "check_policies",
    "extract_layers",
    "get_cost_model",
    "list_cost_models",
    "register_cost_model",
]
