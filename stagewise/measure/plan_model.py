"""Plan a model from its measurements: `plan_model` profiles the layers (`planner_profiles.measure`) and searches
(`stagewise.partition.plan_search.search`); `plan_if_auto` is what `Pipeline` runs when its schedule or m is "auto".

Neither starts a process: the link speeds are given, measured by `Pipeline` on its own world (its threads or
processes, `links.measure_links`), or free. Only the command line (`stagewise plan`) times links between new gloo
processes on this machine (`links.local_links`) before calling `plan_model`.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stagewise.measure.layers import describe_layers
from stagewise.measure.links import measure_links
from stagewise.measure.planner_profiles import measure, unique_params
from stagewise.partition.methods import resolve_balance
from stagewise.partition.plan_results import Plan
from stagewise.partition.plan_search import MAX_MICROBATCHES, default_microbatches, search
from stagewise.partition.profiles import ProfileSet
from stagewise.partition.sharding import bytes_per_param
from stagewise.partition.units import parse_bytes
from stagewise.runtime.microbatch import batch_size, split_sizes
from stagewise.schedules.recompute import MODES
from stagewise.tree import tensors_of

AUTO = "auto"
MESSAGE_BYTES = 1 << 20  # the buffer the link between stages is timed with (see `links`)


def stage_gradient_bytes(layers: Sequence[nn.Module], devices: int) -> float:
    """About one stage's float32 gradient bytes: the buffer a data-parallel reduction is timed with."""
    return 4.0 * unique_params(layers) / devices


def microbatch_sizes(batch: int, devices: int, data_parallel: int, microbatches: Sequence[int] | None) -> list[int]:
    """The micro-batch sizes (the largest of each split) the search will need."""
    per_replica = -(-batch // data_parallel)
    ms = list(microbatches) if microbatches else default_microbatches(per_replica, devices)
    return sorted({split_sizes(per_replica, m)[0] for m in ms if 1 <= m <= per_replica})


def default_cores(device: torch.device) -> int | None:
    """Ranks on CPU share this machine's cores (`stagewise train` and threads start them here); None on GPUs."""
    return os.cpu_count() if device.type == "cpu" else None


def plan_model(layers: Sequence[nn.Module], loss_fn: Callable[[Any, Any], torch.Tensor] | None,
               sample: tuple[Any, Any], devices: int, *, data_parallel: int = 1, schedule: str | Sequence[str] = AUTO,
               microbatches: int | Sequence[int] | str | None = AUTO, partition: str | Sequence[int] = AUTO,
               virtual_stages: int | None = None, memory_limit: float | str | None = None,
               device: torch.device | None = None,
               threads: int | None = None, runs: int = 3, repeats: int = 3, recompute: str | Sequence[str] = "never",
               cores: int | None | str = AUTO, tokens_per_sample: int | None = None, top: int = 5,
               max_microbatches: int | None = None, precision: str = "fp32", latency: float | None = None,
               bandwidth: float | None = None, reduce_bandwidth: float | None = None,
               shard: str = "none") -> tuple[Plan, ProfileSet]:
    """Measure `layers` on `sample` and search: the `Plan` and the profiles it used.

    What is not "auto" is held fixed or narrowed: a schedule name (or a list to choose from), m (an int or a
    list), a partition method or balance (then evaluated, not searched, for every configuration), `virtual_stages`.
    `recompute` is a recompute mode, or "auto" (every mode), or a list of modes to try.
    `sample` is a whole batch like the ones to train on (its size is the batch). `tokens_per_sample`
    defaults to the length of dim 1 of an integer input (token ids), else throughput is in samples/s.
    `precision`: the layers are profiled under it (see `measure`). `latency` (s) and `bandwidth` (bytes/s) of
    a message between devices (and of a tied parameter's all-reduce), `reduce_bandwidth` (bytes/s, ring units) of
    the data-parallel gradient reduction: as measured by the caller (`links`), or None: free. `shard`: what the
    `data_parallel` replicas split (`stagewise.partition.sharding.bytes_per_param` prices it). Starts no process.
    """
    device = torch.device(device) if device is not None else torch.device("cpu")
    batch = batch_size(sample[0])
    P = devices
    per_replica = -(-batch // data_parallel)
    if microbatches in (AUTO, None):
        ms = default_microbatches(per_replica, P, max_microbatches or MAX_MICROBATCHES)
    else:
        ms = [int(microbatches)] if isinstance(microbatches, int) else [int(m) for m in microbatches]
    names = None if schedule == AUTO else [schedule] if isinstance(schedule, str) else list(schedule)
    balance_fn = None
    if partition != AUTO:
        described = describe_layers(layers)

        def balance_fn(sc: Any) -> list[int]:
            return resolve_balance(partition, len(described), sc.num_stages, layers=described)

        if isinstance(partition, str) and partition in ("time", "memory"):
            raise ValueError(f"partition={partition!r} with a planned schedule or m: use partition='auto' (the "
                             "planner balances by simulated step time under the memory limit) or a fixed method")
    sizes = microbatch_sizes(batch, P, data_parallel, ms)
    profiles = measure(layers, sample, loss_fn, sizes, runs=runs, repeats=repeats, device=device, threads=threads,
                       precision=precision)
    if tokens_per_sample is None:
        ids = next(iter(tensors_of(sample[0])), None)
        integer = ids is not None and not ids.is_floating_point() and ids.dim() >= 2
        tokens_per_sample = int(math.prod(ids.shape[1:])) if integer else None
    modes = MODES if recompute == AUTO else [recompute] if isinstance(recompute, str) else list(recompute)
    plan = search(profiles, P, batch, data_parallel=data_parallel, schedules=names, microbatches=ms,
                  virtual_stages=[virtual_stages] if virtual_stages else None, recompute=modes,
                  memory_limit=parse_bytes(memory_limit),
                  balance=balance_fn, cores=default_cores(device) if cores == AUTO else cores,
                  tokens_per_sample=tokens_per_sample, top=top,
                  latency=latency or 0.0, bandwidth=math.inf if bandwidth is None else float(bandwidth),
                  reduce_bandwidth=math.inf if reduce_bandwidth is None else float(reduce_bandwidth),
                  bytes_per_param=bytes_per_param(shard, data_parallel))
    plan.stats["profile_s"] = profiles.seconds
    plan.settings["precision"], plan.settings["shard"] = precision, shard
    return plan, profiles


def plan_if_auto(layers: Sequence[Any], loss_fn: Any, sample: tuple[Any, Any] | None, world: Any, schedule: Any,
                 microbatches: Any, partition: Any, virtual_stages: int | None, memory_limit: Any,
                 recompute: str | int, options: dict | None, precision: str = "fp32") -> Plan | None:
    """For `Pipeline`: the plan when its schedule or m is "auto" (computed by one process, handed to all), else
    None. `recompute` "auto" lets the planner choose the mode; another mode is held. `options`
    go to `plan_model` (runs, repeats, cores, max_microbatches, top, latency, bandwidth, reduce_bandwidth), and
    `measure_links` (default: on GPUs) times messages between devices. The layers are profiled in `precision`; what
    links are measured is measured on `world`, by every rank, in-process (see `links.measure_links`): no process is
    started here, whatever the options."""
    if schedule != AUTO and microbatches != AUTO:
        return None
    if sample is None:
        raise ValueError("schedule='auto' or microbatches='auto' measures the layers: pass sample=(inputs, labels), "
                         "a batch like the ones you will train on")
    if isinstance(recompute, int) or recompute not in (AUTO, *MODES):
        raise ValueError(f"the planner models the recompute modes {', '.join(MODES)} (or 'auto' to "
                         f"choose among them), not {recompute!r}")
    if not all(isinstance(x, nn.Module) for x in layers):
        raise ValueError("the planner measures the layers themselves; with layer factories give the schedule, "
                         "microbatches and partition explicitly")
    device = world.device(world.local_ranks[0])
    threads = None if device.type != "cpu" else torch.get_num_threads()
    grid = world.grid
    options = dict(options or {})
    links = options.pop("measure_links", None)
    messages = (device.type == "cuda" if links is None else bool(links)) and grid.pipeline > 1 and (
        options.get("latency") is None or options.get("bandwidth") is None)
    reductions = grid.data > 1 and options.get("reduce_bandwidth") is None
    if messages or reductions:
        # every rank takes part: messages and reductions are timed on this run's own ranks and backend
        measured = measure_links(world, MESSAGE_BYTES, stage_gradient_bytes(layers, grid.pipeline), messages,
                                 reductions)
        for key in (("latency", "bandwidth") if messages else ()) + (("reduce_bandwidth",) if reductions else ()):
            if options.get(key) is None:
                options[key] = getattr(measured, key)
    def run() -> Plan:
        return plan_model(layers, loss_fn, sample, grid.pipeline, data_parallel=grid.data, schedule=schedule,
                          microbatches=microbatches, partition=partition, virtual_stages=virtual_stages,
                          memory_limit=memory_limit,
                          device=device, threads=threads, recompute=recompute, precision=precision,
                          **options)[0]

    return world.compute_once(run)
