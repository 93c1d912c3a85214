"""The planner's profiles (`ProfileSet`): every layer as a one-layer stage at every micro-batch size, several runs.

`measure(layers, sample, loss_fn, sizes)` runs every layer as a one-layer stage through the runtime's own
`Stage` (`profile_as_stages`: forward with the saved-bytes hooks and, after the last layer, the loss as the
executor computes it; the whole backward; the split backward, I then W), so that times and bytes are what
the pipeline will see, not what the bare layers cost. It does so at every micro-batch size the search will
try, `runs` times, interleaving the sizes so that a slow spell of a shared machine touches them all. Each
time is the fastest of all runs (other work only ever adds time); the **noise** of a size is the per-layer
spread between runs, summed over the layers, relative to the total: each run is first scaled to the
fastest run's total (a busier machine slows every layer and every candidate alike, which changes no
ranking), then sum over layers of (largest - smallest scaled time) / sum of the fastest times. The loss's
saved bytes are in the last layer's, as the runtime counts them. The optimizer's cost per parameter is measured,
not estimated from bytes: an AdamW step on one flat float32 tensor of the model's size, the fastest of a few, per
parameter (`optimizer_seconds_per_param`); the cost model charges each device that rate x the parameters it holds.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from stagewise.measure.layers import describe_layers
from stagewise.measure.timing import nbytes, sync
from stagewise.partition.layers import LayerProfile
from stagewise.partition.profiles import ProfileSet, SizeProfile
from stagewise.runtime.loss import mean_of
from stagewise.runtime.microbatch import batch_size
from stagewise.runtime.precision import Precision
from stagewise.runtime.stage import Stage
from stagewise.tree import map_tensors

LossFn = Callable[[Any, Any], torch.Tensor]


def first_samples(tree: Any, n: int) -> Any:
    """The first `n` samples of a batch (dim 0 of every tensor that has one)."""
    return map_tensors(tree, lambda t: t[:n] if t.dim() > 0 else t)


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
                        sync(device)
                        t0 = time.perf_counter()
                        out, pending = stage.forward(x, loss=(lambda o: mean_of(loss_fn(o, labels))) if last else None)
                        sync(device)
                        t1 = time.perf_counter()
                        seeds = None if last else [torch.ones_like(t) for t in pending.roots]
                        if not split:
                            stage.backward(pending, seeds)
                            sync(device)
                            t2 = t3 = time.perf_counter()
                        else:
                            stage.backward_input(pending, seeds)
                            sync(device)
                            t2 = time.perf_counter()
                            stage.backward_weight(pending)
                            sync(device)
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
                                            output_bytes=nbytes(nxt), saved_bytes=stage.peak_bytes,
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
        inputs = {n: nbytes(first_samples(sample[0], n)) for n in sizes}
        out = {n: _combine(n, measured[n], inputs[n]) for n in sizes}
        each = tuple({n: _combine(n, [measured[n][k]], inputs[n]) for n in sizes} for k in range(runs))
        step = optimizer_seconds_per_param(unique_params(mods))
    finally:
        torch.set_num_threads(before)
    return ProfileSet(out, step, runs, repeats, time.perf_counter() - t0,
                      {"threads": threads or before, "precision": precision}, each if runs > 1 else ())


def unique_params(layers: Sequence[nn.Module]) -> int:
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
