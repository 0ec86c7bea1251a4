"""Per-layer bitwidth search spaces, policy encoding, budgets and their projection."""

from ._allowed import AllowedBits, check_bit_range, check_bit_set, format_widths
from ._budget import (
    BUDGET_METRICS,
    Budget,
    InfeasibleBudgetError,
    check_feasible,
    policy_cost,
    project,
    widest_uniform,
)
from ._space import (
    a_key,
    bitwidth_space,
    config_from_policy,
    format_policy,
    parse_policy,
    policy_from_config,
    policy_keys,
    w_key,
)
from .knapsack import solve_mckp
from .surrogate import SurrogateObjective

__all__ = [
    "AllowedBits",
    "BUDGET_METRICS",
    "Budget",
    "InfeasibleBudgetError",
    "SurrogateObjective",
    "a_key",
    "bitwidth_space",
    "check_bit_range",
    "check_bit_set",
    "check_feasible",
    "config_from_policy",
    "format_policy",
    "format_widths",
    "parse_policy",
    "policy_cost",
    "policy_from_config",
    "policy_keys",
    "project",
    "solve_mckp",
    "w_key",
    "widest_uniform",
]
