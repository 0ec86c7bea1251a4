"""Hardware cost models (accelerator simulators) and the layer shapes they price.

Public API::

    from hardware import extract_layers, get_cost_model
    layers = extract_layers(model, (3, 224, 224))
    table = get_cost_model("bismo-edge").table(layers)   # CostTable, built once
    costs = table.evaluate(policies)                     # [N, L, 2] -> Costs

Registered models (``list_cost_models()``): ``bismo-edge`` and ``bismo-cloud`` (the
BISMO bit-serial overlay on a Zynq-7020 / a VU9P, as in HAQ), ``bitfusion``
(BitFusion, ISCA 2018), ``table`` (your own measurements, ``path=...``) and
``haq-cloud-mobilenetv2`` (HAQ's released BISMO-cloud table for MobileNetV2, a preset of
``table``).
"""

from ._analytic import AnalyticCostModel
from ._bismo import (
    BISMO_CLOUD,
    BISMO_CLOUD_NATIVE,
    BISMO_EDGE,
    BISMO_EDGE_NATIVE,
    BismoConfig,
    BismoCostModel,
)
from ._bitfusion import BITFUSION, BitFusionConfig, BitFusionCostModel
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
from ._registry import (
    UnknownHardwareError,
    cost_model_natural_bits,
    get_cost_model,
    list_cost_models,
    register_cost_model,
)
from ._table import TableCostModel, haq_cloud_table_path, load_table

__all__ = [
    "BISMO_CLOUD",
    "BISMO_CLOUD_NATIVE",
    "BISMO_EDGE",
    "BISMO_EDGE_NATIVE",
    "BITFUSION",
    "BITS",
    "BYTES_PER_MB",
    "LAYER_KINDS",
    "MAX_BITS",
    "MIN_BITS",
    "NUM_BITS",
    "AnalyticCostModel",
    "BismoConfig",
    "BismoCostModel",
    "BitFusionConfig",
    "BitFusionCostModel",
    "CostModel",
    "CostTable",
    "Costs",
    "LayerSpec",
    "NoQuantizableLayersError",
    "TableCostModel",
    "UnknownHardwareError",
    "check_policies",
    "cost_model_natural_bits",
    "extract_layers",
    "get_cost_model",
    "haq_cloud_table_path",
    "list_cost_models",
    "load_table",
    "register_cost_model",
]
