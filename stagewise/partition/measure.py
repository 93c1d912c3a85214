"""Measure a model for the planner (`ProfileSet`), and plan a `Pipeline` whose schedule, m or balance is "auto".

`measure(layers, sample, loss_fn, sizes)` runs every layer as a one-layer stage through the runtime's own
`Stage` (`profile_as_stages`: forward with the saved-bytes hooks and, after the last layer, the loss as the
executor computes it; the whole backward; the split backward, I then W), so that times and bytes are what
the pipeline will see, not what the bare layers cost. It does so at every micro-batch size the search will
try, `runs` times, interleaving the sizes so that a slow spell of a shared machine touches them all. Each
time is the fastest of all runs (other work only ever adds time); the **noise** of a size is the per-layer
spread between runs, summed over the layers, relative to the total: each run is first scaled to the
fastest run's total (a busier machine slows every layer and every candidate alike, which changes no
ranking), then sum over layers of (largest - smallest scaled time) / sum of the fastest times. The loss's
saved bytes are in the last layer's, as the runtime counts them. The optimizer's cost per parameter is timed
on one flat tensor.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from stagewise.partition.costmodel import ProfileSet, SizeProfile
from stagewise.partition.costs import LayerProfile, parse_bytes
from stagewise.partition.plan import MAX_MICROBATCHES, Plan, default_microbatches, search
from stagewise.partition.profile import describe_layers
from stagewise.runtime.microbatch import batch_size, split_sizes
from stagewise.schedules.recompute import MODES
from stagewise.tree import map_tensors, tensors_of

AUTO = "auto"
MESSAGE_BYTES = 1 << 20  # the buffer the link between stages is timed with (see `link_speed`)


def first_samples(tree: Any, n: int) -> Any:
    """The first `n` samples of a batch (dim 0 of every tensor that has one)."""
    return map_tensors(tree, lambda t: t[:n] if t.dim() > 0 else t)


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in tensors_of(x))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


LossFn = Callable[[Any, Any], torch.Tensor]


def profile_as_stages(layers: Sequence[nn.Module], sample_input: Any, loss_fn: LossFn | None, labels: Any,
                      device: torch.device, repeats: int = 3, precision: str = "fp32"
                      ) -> tuple[list[LayerProfile], list[float], int]:
    """Every layer run as a one-layer pipeline stage, through the runtime's own `Stage`: its forward (with the
    saved-bytes hooks, the loss after the last layer as the executor computes it), whole backward, and split
    backward (I, then W), each the fastest of `repeats` after one warm-up. Returns the profiles (`input_grad`:
    I; `saved_bytes`: what the stage counts, the loss's included after the last layer), the W seconds per
    layer, and 0 (the loss's bytes are in the last layer's). Parameters' `.grad` and the random number
    generators are left as they were. `precision` runs the forwards as the pipeline will (autocast, stage
    outputs in the low dtype, so the next layer's input and the bytes sent are what the run sees)."""
    from stagewise.runtime.loss import mean_of
    from stagewise.runtime.precision import Precision
    from stagewise.runtime.stage import Stage

    counts = describe_layers(layers)
    grads = [(p, p.grad) for m in layers for p in m.parameters()]
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if device.type == "cuda" else []
    out_profiles, weight, loss_bytes = [], [], 0
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            x = sample_input
            for i, layer in enumerate(layers):
                last = i == len(layers) - 1 and loss_fn is not None
                stage = Stage(0 if i == 0 else 1, [layer], i, precision=Precision(precision))
                times: dict[str, list[float]] = {"F": [], "B": [], "I": [], "W": []}
                nxt: Any = None
                for r in range(repeats + 1):
                    for split in (False, True):
                        _sync(device)
                        t0 = time.perf_counter()
                        out, pending = stage.forward(x, loss=(lambda o: mean_of(loss_fn(o, labels))) if last else None)
                        _sync(device)
                        t1 = time.perf_counter()
                        seeds = None if last else [torch.ones_like(t) for t in pending.roots]
                        if not split:
                            stage.backward(pending, seeds)
                            _sync(device)
                            t2 = t3 = time.perf_counter()
                        else:
                            stage.backward_input(pending, seeds)
                            _sync(device)
                            t2 = time.perf_counter()
                            stage.backward_weight(pending)
                            _sync(device)
                            t3 = time.perf_counter()
                        nxt = out
                        if r == 0:
                            continue  # warm-up
                        if split:
                            times["I"].append(t2 - t1)
                            times["W"].append(t3 - t2)
                        else:
                            times["F"].append(t1 - t0)
                            times["B"].append(t2 - t1)
                base = counts[i]
                out_profiles.append(replace(base, forward=min(times["F"]), backward=min(times["B"]),
                                            output_bytes=_nbytes(nxt), saved_bytes=stage.peak_bytes,
                                            input_grad=min(times["I"])))
                weight.append(min(times["W"]))
                x = map_tensors(nxt, lambda t: t.detach().requires_grad_(t.is_floating_point()))
    finally:
        for p, g in grads:
            p.grad = g
    return out_profiles, weight, loss_bytes


def optimizer_seconds_per_param(numel: int, repeats: int = 3) -> float:
    """Seconds an AdamW step takes per parameter (fp32, on one flat tensor of the model's size)."""
    n = max(int(numel), 1 << 16)
    p = nn.Parameter(torch.zeros(n))
    p.grad = torch.full_like(p, 1e-3)
    opt = torch.optim.AdamW([p], lr=1e-3)
    opt.step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        times.append(time.perf_counter() - t0)
    return min(times) / n


def measure(layers: nn.Sequential | Sequence[nn.Module], sample: tuple[Any, Any],
            loss_fn: Callable[[Any, Any], torch.Tensor] | None, sizes: Sequence[int], *, runs: int = 3,
            repeats: int = 3, device: torch.device | str | None = None, threads: int | None = None,
            precision: str = "fp32") -> ProfileSet:
    """Profiles of `layers` at every micro-batch size in `sizes` (samples), each measured `runs` times.

    `sample = (inputs, labels)` is a batch at least max(sizes) samples large; its first n samples make the
    micro-batch of size n. `threads` sets torch's intra-op threads for the measurement (use what each rank
    will have), and restores them after. `precision` ("fp32", "bf16", "fp16") profiles the forwards under the
    autocast the pipeline will use.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    mods = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
    have = batch_size(sample[0])
    sizes = sorted({int(n) for n in sizes})
    if sizes[-1] > have:
        raise ValueError(f"the sample holds {have} samples; the planner needs micro-batches of up to {sizes[-1]}")
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    t0 = time.perf_counter()
    try:
        dev = torch.device(device) if device is not None else next(
            (p.device for m in mods for p in m.parameters()), torch.device("cpu"))
        for m in mods:
            m.to(dev)
        measured: dict[int, list[tuple[list[LayerProfile], list[float], int]]] = {n: [] for n in sizes}
        for _ in range(runs):
            for n in sizes:
                x, y = (map_tensors(first_samples(t, n), lambda t: t.to(dev)) for t in sample)
                measured[n].append(profile_as_stages(mods, x, loss_fn, y, dev, repeats, precision))
        inputs = {n: _nbytes(first_samples(sample[0], n)) for n in sizes}
        out = {n: _combine(n, measured[n], inputs[n]) for n in sizes}
        each = tuple({n: _combine(n, [measured[n][k]], inputs[n]) for n in sizes} for k in range(runs))
        step = optimizer_seconds_per_param(_unique_params(mods))
    finally:
        torch.set_num_threads(before)
    return ProfileSet(out, step, runs, repeats, time.perf_counter() - t0,
                      {"threads": threads or before, "precision": precision}, each if runs > 1 else ())


def _unique_params(layers: Sequence[nn.Module]) -> int:
    """Parameters of `layers`, a tied one counted once."""
    return sum(p.numel() for p in {id(p): p for m in layers for p in m.parameters()}.values())


def _combine(samples: int, measured: list[tuple[list[LayerProfile], list[float], int]], input_bytes: int
             ) -> SizeProfile:
    """The fastest of every run per layer and field, and the noise (see the module docstring)."""
    runs = [m[0] for m in measured]
    layers = []
    for per_run in zip(*runs):
        first = per_run[0]
        grads = [x.input_grad for x in per_run if x.input_grad is not None]
        layers.append(replace(first, forward=min(x.forward for x in per_run),
                              backward=min(x.backward for x in per_run), input_grad=min(grads) if grads else None))
    weight = tuple(min(w) for w in zip(*(m[1] for m in measured)))
    # A run on a busier machine is slower everywhere, which moves every candidate alike and changes no ranking:
    # each run is scaled to the fastest run's total before the per-layer spread is taken.
    totals = [sum(x.time for x in run) for run in runs]
    scale = [min(totals) / t if t > 0 else 1.0 for t in totals]
    spread = sum(max(x.time * k for x, k in zip(per_run, scale)) - min(x.time * k for x, k in zip(per_run, scale))
                 for per_run in zip(*runs))
    total = sum(x.time for x in layers)
    return SizeProfile(samples, tuple(layers), input_bytes, measured[0][2], spread / total if total > 0 else 0.0,
                       weight)


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
               measure_links: bool | None = None) -> tuple[Plan, ProfileSet]:
    """Measure `layers` on `sample` and search: the `Plan` and the profiles it used.

    What is not "auto" is held fixed or narrowed: a schedule name (or a list to choose from), m (an int or a
    list), a partition method or balance (then evaluated, not searched, for every configuration), `virtual_stages`.
    `recompute` is an activation-checkpointing mode, or "auto" (every mode), or a list of modes to try.
    `sample` is a whole batch like the ones to train on (its size is the batch). `tokens_per_sample`
    defaults to the length of dim 1 of an integer input (token ids), else throughput is in samples/s.
    `precision`: the layers are profiled under it (see `measure`). `latency` (s) and `bandwidth` (bytes/s) of
    a message between devices: given, or measured with two gloo processes on this machine when
    `measure_links` (default: on GPUs only, see `link_speed`), else free. `reduce_bandwidth` (bytes/s, ring
    units) of the data-parallel gradient reduction: given, or measured with D gloo processes on this machine.
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
        from stagewise.partition import resolve_balance

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
    if measure_links is None:
        measure_links = device.type == "cuda"
    messages = measure_links and P > 1 and (latency is None or bandwidth is None)
    if messages or (data_parallel > 1 and reduce_bandwidth is None):
        from stagewise.partition.link_speed import local_links

        links = local_links(P if messages else 1,
                            data_parallel if reduce_bandwidth is None else 1, MESSAGE_BYTES,
                            4.0 * _unique_params(layers) / P)
        latency = links.latency if latency is None else latency
        bandwidth = links.bandwidth if bandwidth is None else bandwidth
        reduce_bandwidth = links.reduce_bandwidth if reduce_bandwidth is None else reduce_bandwidth
    modes = MODES if recompute == AUTO else [recompute] if isinstance(recompute, str) else list(recompute)
    plan = search(profiles, P, batch, data_parallel=data_parallel, schedules=names, microbatches=ms,
                  virtual_stages=[virtual_stages] if virtual_stages else None, recompute=modes,
                  memory_limit=parse_bytes(memory_limit),
                  balance=balance_fn, cores=default_cores(device) if cores == AUTO else cores,
                  tokens_per_sample=tokens_per_sample, top=top,
                  latency=latency or 0.0, bandwidth=math.inf if bandwidth is None else float(bandwidth),
                  reduce_bandwidth=math.inf if reduce_bandwidth is None else float(reduce_bandwidth))
    plan.stats["profile_s"] = profiles.seconds
    plan.settings["precision"] = precision
    return plan, profiles


def plan_if_auto(layers: Sequence[Any], loss_fn: Any, sample: tuple[Any, Any] | None, world: Any, schedule: Any,
                 microbatches: Any, partition: Any, virtual_stages: int | None, memory_limit: Any,
                 activation_checkpointing: str | int, options: dict | None, precision: str = "fp32") -> Plan | None:
    """For `Pipeline`: the plan when its schedule or m is "auto" (computed by one process, handed to all), else
    None. `activation_checkpointing` "auto" lets the planner choose the mode; another mode is held. `options`
    go to `plan_model` (runs, repeats, cores, max_microbatches, top, latency, bandwidth, reduce_bandwidth,
    measure_links); the layers are profiled in `precision`, the links measured on `world` (see `link_speed`)."""
    if schedule != AUTO and microbatches != AUTO:
        return None
    if sample is None:
        raise ValueError("schedule='auto' or microbatches='auto' measures the layers: pass sample=(inputs, labels), "
                         "a batch like the ones you will train on")
    if isinstance(activation_checkpointing, int) or activation_checkpointing not in (AUTO, *MODES):
        raise ValueError(f"the planner models the activation-checkpointing modes {', '.join(MODES)} (or 'auto' to "
                         f"choose among them), not {activation_checkpointing!r}")
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
        from stagewise.partition.link_speed import measure_links

        # every rank takes part: messages and reductions are timed on this run's own ranks and backend
        measured = measure_links(world, MESSAGE_BYTES, 4.0 * _unique_params(layers) / grid.pipeline, messages,
                                 reductions)
        for key in (("latency", "bandwidth") if messages else ()) + (("reduce_bandwidth",) if reductions else ()):
            if options.get(key) is None:
                options[key] = getattr(measured, key)
    options["measure_links"] = False  # measured here on the world, or free

    def run() -> Plan:
        return plan_model(layers, loss_fn, sample, grid.pipeline, data_parallel=grid.data, schedule=schedule,
                          microbatches=microbatches, partition=partition, virtual_stages=virtual_stages,
                          memory_limit=memory_limit,
                          device=device, threads=threads, recompute=activation_checkpointing, precision=precision,
                          **options)[0]

    return world.compute_once(run)
