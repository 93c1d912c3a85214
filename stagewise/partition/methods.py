"""Balancing methods over per-layer costs, and `resolve_balance`, the one entry point. No torch.

| method | balances | exact? | module |
| --- | --- | --- | --- |
| `uniform` | layer counts | yes | `solver` |
| `by_parameters` | parameters per stage | yes | here |
| `by_type` | layers whose class matches a regex (DeepSpeed's `type:REGEX`) | yes | here |
| `by_time` | forward + backward seconds of the slowest stage | yes | here |
| `by_memory` | peak bytes per device under a schedule | yes with one stage per device or few balances | `memory` |
| `auto` | simulated step time under a memory limit per device | yes for few balances; see `auto` | `auto_balance` |
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

from stagewise.partition.auto_balance import auto
from stagewise.partition.layers import LayerProfile, ParamCounter, Shared
from stagewise.partition.memory import by_memory, check_len
from stagewise.partition.solver import (
    ExactSums,
    PartitionError,
    check_balance,
    check_request,
    exact_integers,
    min_max_balance,
    min_max_partition,
    uniform,
)
from stagewise.partition.units import parse_bytes
from stagewise.schedules import Schedule

METHODS = ("uniform", "parameters", "type:REGEX", "time", "memory", "auto")


def by_parameters(param_counts: Sequence[float], num_stages: int, *, shared: Shared | None = None) -> list[int]:
    """The balance whose largest stage holds the fewest parameters (exact).

    `param_counts[l]` counts each parameter once (a tied one at its first layer); with `shared`
    (see `ParamCounter`) a stage is also charged for its own copy of a tied parameter whose
    first user sits in another stage.
    """
    if not shared or not any(shared):
        return min_max_balance(param_counts, num_stages)
    check_request(len(param_counts), num_stages)
    exact_integers(param_counts)  # rejects negative and non-finite counts
    check_len(shared, len(param_counts), "shared")
    counter = ParamCounter(param_counts, shared)
    return min_max_partition(lambda s, lo, hi: counter.range(lo, hi), len(param_counts), num_stages)


def by_type(class_names: Sequence[str], regex: str, num_stages: int) -> list[int]:
    """DeepSpeed's `partition_method="type:REGEX"`: balance the number of layers whose class name matches.

    A layer matches when `re.search(regex, name, re.IGNORECASE)` finds something; the other
    layers ride with their neighbours. Among the balances with the fewest matching layers in
    the fullest stage, every stage holding at least one, this returns the lexicographically
    largest: each stage runs up to (not including) the next matching layer that would exceed
    the bound, so unmatched layers join the stage before them and leading ones the first stage.
    That is DeepSpeed's greedy cut over the prefix sum of 0/1 weights, so both give the same
    balance (GPT-2 as [pre, 12 blocks, post] on 4 stages: [4, 3, 3, 4]) wherever DeepSpeed's
    has no empty stage; where DeepSpeed's greedy would leave the last stages empty, this still
    gives every stage a matching layer.
    """
    check_request(len(class_names), num_stages)
    try:
        pattern = re.compile(regex, re.IGNORECASE)
    except re.error as e:
        raise PartitionError(f"type:{regex} is not a valid regular expression: {e}") from None
    hits = [1.0 if pattern.search(name) else 0.0 for name in class_names]
    found = int(sum(hits))
    if found == 0:
        names = ", ".join(dict.fromkeys(class_names))
        raise PartitionError(f"type:{regex} matches none of the layer classes ({names})")
    if found < num_stages:
        raise PartitionError(f"type:{regex} matches {found} layers but there are {num_stages} stages; "
                             "every stage needs a matching layer")
    count = ExactSums(hits)
    return min_max_partition(lambda s, lo, hi: count(lo, hi) or math.inf, len(hits), num_stages)


def by_time(layer_times: Sequence[float], num_stages: int, *, comm_times: Sequence[float] | None = None) -> list[int]:
    """The balance whose slowest stage is fastest (exact); times in seconds per micro-batch.

    `comm_times[l]` is what a cut after layer l costs per micro-batch (its output forward and
    its gradient back); it is charged to both stages at the cut, as in PipeDream's planner,
    which assumes communication does not overlap compute.
    """
    if comm_times is None:
        return min_max_balance(layer_times, num_stages)
    L = len(layer_times)
    check_request(L, num_stages)
    check_len(comm_times, L, "comm_times")
    exact_integers(comm_times)  # rejects negative and non-finite times
    t, c = ExactSums(layer_times), [float(x) for x in comm_times]

    def cost(s: int, lo: int, hi: int) -> float:
        return t(lo, hi) + (c[lo - 1] if lo > 0 else 0.0) + (c[hi - 1] if hi < L else 0.0)

    return min_max_partition(cost, L, num_stages)


def resolve_balance(partition: str | Sequence[int], num_layers: int, num_stages: int, *,
            names: Sequence[str] | None = None, params: Sequence[float] | None = None,
            times: Sequence[float] | None = None, layers: Sequence[LayerProfile] | None = None,
            schedule: Schedule | None = None, memory_limit: float | str | None = None, bytes_per_param: float = 16.0,
            latency: float = 0.0, bandwidth: float = math.inf, step_per_param: float = 0.0) -> list[int]:
    """Turn `partition` into a balance (one layer count per stage).

    `partition` is a list of layer counts, or one of "uniform", "parameters" (needs `params`
    or `layers`), "type:REGEX" (needs `names` or `layers`), "time" (needs `times` or
    `layers`), "memory" and "auto" (need `layers`, from `profile_layers`, and `schedule`).
    Profiles also bring tied parameters, counted once per stage that holds them. `memory_limit`: bytes, or
    text such as "2GiB" (`parse_bytes`). `step_per_param`: the optimizer's seconds per parameter, for "auto".
    """
    memory_limit = parse_bytes(memory_limit)
    if not isinstance(partition, str):
        return check_balance(partition, num_layers, num_stages)
    check_request(num_layers, num_stages)
    for given, what in ((names, "names"), (params, "params"), (times, "times"), (layers, "layers")):
        check_len(given, num_layers, what)
    if schedule is not None and schedule.num_stages != num_stages:
        raise PartitionError(f"schedule {schedule.name} has {schedule.num_stages} stages, not {num_stages}")

    def need(what: str, value: object, hint: str) -> None:
        if value is None:
            raise PartitionError(f"partition {partition!r} needs {what}: pass {hint}")

    if partition == "uniform":
        return uniform(num_layers, num_stages)
    if partition == "parameters":
        if params is not None:
            return by_parameters(params, num_stages)
        need("parameter counts", layers, "params= or layers= (profile_layers)")
        return by_parameters([x.params for x in layers], num_stages, shared=[x.shared for x in layers])
    if partition.startswith("type:"):
        if names is None and layers is not None:
            names = [x.name for x in layers]
        need("layer class names", names, "names= or layers=")
        return by_type(names, partition[len("type:"):], num_stages)
    if partition == "time":
        if times is not None:
            return by_time(times, num_stages)
        need("per-layer times", layers, "times= or layers= (profile_layers)")
        comm = None
        if latency > 0 or bandwidth < math.inf:
            comm = [latency + x.output_bytes / bandwidth for x in layers]
        return by_time([x.time for x in layers], num_stages, comm_times=comm)
    if partition in ("memory", "auto"):
        need("layer profiles", layers, "layers= (profile_layers)")
        need("a schedule", schedule, "schedule= (stagewise.schedules.build)")
        if partition == "memory":
            return by_memory([x.params for x in layers], [x.saved_bytes for x in layers], schedule,
                             bytes_per_param=bytes_per_param, shared=[x.shared for x in layers], limit=memory_limit)
        return auto(layers, schedule, memory_limit=memory_limit, bytes_per_param=bytes_per_param,
                    latency=latency, bandwidth=bandwidth, step_per_param=step_per_param)
    raise PartitionError(f"unknown partition method {partition!r}; use one of {', '.join(METHODS)} "
                         "or a list of layer counts")
