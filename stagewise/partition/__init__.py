"""Planning, torch-free: cutting a list of layers into stages (balancing methods, exact solvers, the partition
table), the one cost model (step time and memory of a balance under a schedule), and the planner's search over
schedule x micro-batches x virtual stages x balance x recompute.

| module | what it is |
| --- | --- |
| `solver` | exact min-max / min-sum solvers over contiguous stages |
| `balances` | the space of balances: compositions, neighbours, steepest descent |
| `layers` | what is known about a layer (`LayerProfile`), parameters counted with ties (`ParamCounter`) |
| `units` | bytes, counts and seconds as text; bytes from text |
| `profiles` | layer profiles at one (`SizeProfile`) and several (`ProfileSet`) micro-batch sizes |
| `memory` | the memory model: what a device holds along its actions, `Footprint`, `by_memory` |
| `cost_model` | the cost model (`CostModel`): simulated step, optimizer steps, tie syncs, memory, bounds |
| `methods` | the balancing methods and `resolve_balance`, their one entry point |
| `auto_balance` | `auto`, the balance with the shortest simulated step of one schedule, and `Planner` |
| `table` | the partition table |
| `plan_search`, `plan_results`, `plan_ties` | the planner: its search, its results (`Plan`), its tie rule |

What feeds it, measured with torch, is `stagewise.measure` (`stagewise.measure.layers.profile_layers`).
"""

from stagewise.partition.auto_balance import Planner, Prediction, auto
from stagewise.partition.cost_model import CostModel, Estimate
from stagewise.partition.layers import LayerProfile, ParamCounter
from stagewise.partition.memory import Footprint, by_memory, inflight_per_stage
from stagewise.partition.methods import METHODS, by_parameters, by_time, by_type, resolve_balance
from stagewise.partition.plan_results import Candidate, Plan
from stagewise.partition.plan_search import predict, search
from stagewise.partition.profiles import ProfileSet, SizeProfile
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
    "METHODS", "Candidate", "CostModel", "Estimate", "Footprint", "LayerProfile", "ParamCounter", "PartitionError",
    "PartitionTable", "Plan", "Planner", "Prediction", "ProfileSet", "SizeProfile", "StageRecord", "auto",
    "by_memory", "by_parameters", "by_time", "by_type", "check_balance", "inflight_per_stage", "min_max_balance",
    "min_max_partition", "min_sum_partition", "predict", "resolve_balance", "search", "uniform",
]
