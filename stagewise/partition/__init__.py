"""Cutting a list of layers into stages: balancing methods, exact solvers, the partition table.

Everything here is torch-free except `stagewise.partition.profile` (import it for `profile_layers`).
"""

from stagewise.partition.costs import LayerProfile, ParamCounter
from stagewise.partition.memory import Footprint, by_memory, inflight_per_stage
from stagewise.partition.methods import METHODS, by_parameters, by_time, by_type, resolve_balance
from stagewise.partition.planner import Planner, Prediction, auto
from stagewise.partition.solver import (
    PartitionError,
    check_balance,
    min_max_balance,
    min_max_partition,
    min_sum_partition,
    uniform,
)
from stagewise.partition.table import PartitionTable, StageRecord

__all__ = [
    "METHODS", "Footprint", "LayerProfile", "ParamCounter", "PartitionError", "PartitionTable", "Planner",
    "Prediction", "StageRecord", "auto", "by_memory", "by_parameters", "by_time", "by_type", "check_balance",
    "inflight_per_stage", "min_max_balance", "min_max_partition", "min_sum_partition",
    "resolve_balance", "uniform",
]
