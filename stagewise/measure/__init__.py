"""Measuring for the planner, above the runtime: what `stagewise.partition` (torch-free) is fed.

| module | what it measures |
| --- | --- |
| `layers` | layers one by one on one micro-batch (`profile_layers`; `describe_layers` without running them) |
| `planner_profiles` | layers as one-layer stages at every micro-batch size, in runs; the optimizer (`measure`) |
| `links` | how fast the run's ranks talk: messages between stages, the data-parallel all-reduce |
| `trace_costs` | a measured step's trace: per-stage costs, per-device STEP and busy seconds, saved-activation peaks |
| `plan_model` | measure a model, then search (`plan_model`); `Pipeline`'s planning, in-process (`plan_if_auto`) |
| `timing` | the device clock (`sync`) and the bytes of a tensor tree |

`trace_costs` is the one place that turns a measured timeline into costs; `stagewise train`, the planner's
prediction check and the benchmarks use it.
"""

from stagewise.measure.layers import describe_layers, profile_layers
from stagewise.measure.links import Links, local_links, measure_links
from stagewise.measure.plan_model import plan_if_auto, plan_model
from stagewise.measure.planner_profiles import measure
from stagewise.measure.trace_costs import StepCosts, compare, format_comparison, step_costs

__all__ = ["Links", "StepCosts", "compare", "describe_layers", "format_comparison", "local_links", "measure",
           "measure_links", "plan_if_auto", "plan_model", "profile_layers", "step_costs"]
