"""Measure what the balancing methods need, layer by layer on one micro-batch: time, parameters (ties counted once),
activation bytes; and what is known without running the layers (`describe_layers`)."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from stagewise.measure.timing import nbytes, sync
from stagewise.partition.layers import LayerProfile
from stagewise.runtime.activations import SavedBytes
from stagewise.runtime.loss import mean_of
from stagewise.runtime.microbatch import scatter
from stagewise.runtime.precision import Precision
from stagewise.runtime.ties import TIE_ATTR  # parameters built apart (by factories) with one key are one tie
from stagewise.tree import cut, describe, flatten, map_tensors, tensors_of


def _param_key(p: nn.Parameter) -> tuple[str, object]:
    tie = getattr(p, TIE_ATTR, None)
    return ("tie", str(tie)) if tie is not None else ("id", id(p))


def count_params(mods: list[nn.Module]) -> list[tuple[int, int, dict[int, int]]]:
    """Per layer: (elements, bytes) of the parameters it is the first to use, and {key: elements} of shared ones.

    A parameter used by several layers (the same object, or the same `stagewise_tie` key) is
    counted at the first of them; every user lists it in its shared dict under one key (the
    parameter's position in first-use order), so a stage without that first layer can be
    charged for its own copy.
    """
    users: dict[tuple[str, object], list[int]] = {}
    size: dict[tuple[str, object], tuple[int, int]] = {}
    for i, m in enumerate(mods):
        for p in m.parameters():
            who = users.setdefault(_param_key(p), [])
            if not who or who[-1] != i:
                who.append(i)
            size[_param_key(p)] = (p.numel(), p.numel() * p.element_size())
    number = {k: n for n, k in enumerate(users)}
    out = []
    for i in range(len(mods)):
        own = [size[k] for k, who in users.items() if who[0] == i]
        shared = {number[k]: size[k][0] for k, who in users.items() if len(who) > 1 and i in who}
        out.append((sum(n for n, _ in own), sum(b for _, b in own), shared))
    return out


def profile_layers(layers: nn.Sequential | Sequence[nn.Module], sample_input: Any,
                   device: torch.device | str | None = None, repeats: int = 5,
                   loss_fn: Callable[[Any, Any], torch.Tensor] | None = None, labels: Any = None
                   ) -> list[LayerProfile]:
    """Run every layer on the previous layer's output and measure it, as a pipeline stage would run it.

    `sample_input` is one micro-batch for the first layer: a tensor, or a tuple, list or dict
    of tensors (passed as the single argument, as nn.Sequential chains layers). Each layer's
    input is cut from the previous layer's graph, so its backward time covers that layer
    alone (input gradient included, as for a stage that receives its input from another);
    `input_grad` times the input gradient alone (what a split schedule's I computes).
    Times are the fastest of `repeats` runs after one warm-up, in seconds: other work on a shared
    machine only ever adds time, so the minimum is the steadiest estimate of what a layer costs. Saved-activation
    bytes count, with `saved_tensors_hooks`, every storage autograd keeps for the backward
    once, parameters' storages excluded. Tied parameters (one nn.Parameter in two layers, or
    equal `stagewise_tie` keys) count once, at their first layer; see `LayerProfile.shared`.

    With `loss_fn`, the last layer is measured together with `loss_fn(output, labels)`, as the
    last stage runs it (a large-vocabulary cross-entropy is a good part of that stage).
    With `device` the layers are moved there in place (`module.to`) and so is the input.
    Parameters' `.grad` and the random number generators are left as they were.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    mods = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
    if device is not None:
        dev = torch.device(device)
        for m in mods:
            m.to(dev)
        sample_input = map_tensors(sample_input, lambda t: t.to(dev))
        if labels is not None:
            labels = map_tensors(labels, lambda t: t.to(dev))
    else:
        first = next((p for m in mods for p in m.parameters()), None)
        dev = first.device if first is not None else next(
            (t.device for t in tensors_of(sample_input)), torch.device("cpu"))
    counts = count_params(mods)
    grads = [(p, p.grad) for m in mods for p in m.parameters()]
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    profiles = []
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            x = sample_input
            for i, m in enumerate(mods):
                inp = x if i == 0 else cut(x)
                run = _WithLoss(m, loss_fn, labels) if loss_fn is not None and i == len(mods) - 1 else m
                try:
                    x, forward, backward, saved = _measure(run, inp, dev, repeats)
                except Exception as err:  # name the layer: the error alone (a shape mismatch) does not
                    raise ValueError(f"measuring the layers on the sample: layer {i} ({type(m).__name__}) failed on "
                                     f"its input {describe(flatten(inp)[1])}: {type(err).__name__}: {err}. Give a "
                                     "sample shaped like the batches the model trains on") from err
                params, param_bytes, shared = counts[i]
                backward_s = min(backward)
                profiles.append(LayerProfile(
                    index=i, name=type(m).__name__, forward=min(forward),
                    backward=backward_s, params=params, param_bytes=param_bytes,
                    output_bytes=nbytes(x), saved_bytes=saved, shared=shared, input_bytes=nbytes(inp),
                    input_grad=min(_measure_input_grad(run, inp, dev, repeats), backward_s)))
    finally:
        for p, g in grads:
            p.grad = g
    return profiles


def _measure(m: nn.Module, inp: Any, dev: torch.device, repeats: int) -> tuple[Any, list[float], list[float], int]:
    """(output, forward seconds, backward seconds, saved bytes) of one layer; the warm-up counts the saved bytes."""
    counter = SavedBytes(m.parameters())
    forward, backward = [], []
    out: Any = None
    for r in range(repeats + 1):
        sync(dev)
        t0 = time.perf_counter()
        if r == 0:  # hooks slow the forward down, so only the untimed warm-up counts bytes
            with counter.hooks():
                out = m(inp)
        else:
            out = m(inp)
        sync(dev)
        t1 = time.perf_counter()
        roots = [t for t in tensors_of(out) if t.requires_grad]
        seeds = [torch.ones_like(t) for t in roots]
        sync(dev)
        t2 = time.perf_counter()
        if roots:
            torch.autograd.backward(roots, seeds)
        sync(dev)
        t3 = time.perf_counter()
        if r > 0:
            forward.append(t1 - t0)
            backward.append(t3 - t2)
    return out, forward, backward, counter.total


class _WithLoss(nn.Module):
    """A layer followed by the loss, to measure the last stage as it runs."""

    def __init__(self, layer: nn.Module, loss_fn: Callable[[Any, Any], torch.Tensor], labels: Any):
        super().__init__()
        self.layer, self.loss_fn, self.labels = layer, loss_fn, labels

    def forward(self, x: Any) -> torch.Tensor:
        return mean_of(self.loss_fn(self.layer(x), self.labels))


def _measure_input_grad(m: nn.Module, inp: Any, dev: torch.device, repeats: int) -> float:
    """Fewest seconds of the backward to the layer's inputs alone (no weight gradients); 0 without such inputs."""
    inputs = [t for t in tensors_of(inp) if t.requires_grad]
    if not inputs:
        return 0.0
    times = []
    for _ in range(repeats):
        out = m(inp)
        roots = [t for t in tensors_of(out) if t.requires_grad]
        if not roots:
            return 0.0
        seeds = [torch.ones_like(t) for t in roots]
        sync(dev)
        t0 = time.perf_counter()
        torch.autograd.grad(roots, inputs, seeds, allow_unused=True)
        sync(dev)
        times.append(time.perf_counter() - t0)
    return min(times)


def describe_layers(layers: nn.Sequential | Sequence[nn.Module]) -> list[LayerProfile]:
    """What is known about each layer without running it: class name and parameters (tied ones once)."""
    mods = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
    return [LayerProfile(index=i, name=type(m).__name__, params=p, param_bytes=b, shared=shared)
            for i, (m, (p, b, shared)) in enumerate(zip(mods, count_params(mods)))]


MEASURED = ("time", "memory", "auto")  # the partition methods that run the layers


def layer_facts(layers: Sequence[Any], partition: str | Sequence[int], sample: tuple[Any, Any] | None,
                microbatches: int, loss_fn: Callable[[Any, Any], torch.Tensor] | None,
                device: torch.device, precision: str = "fp32") -> list[LayerProfile] | None:
    """What the partitioner needs to know about `layers` for `partition`: names and parameters, measured
    times and memory (on one micro-batch of `sample`, under the pipeline's `precision`, so that saved bytes and
    times are those of the run) when the method needs them, None for layer factories."""
    if not all(isinstance(layer, nn.Module) for layer in layers):
        if isinstance(partition, str) and partition != "uniform":
            raise ValueError(f"partition={partition!r} needs the layers themselves; with layer factories "
                             "use 'uniform' or an explicit balance list")
        return None
    if partition not in MEASURED:
        return describe_layers(layers)
    if sample is None:
        raise ValueError(f"partition={partition!r} measures every layer: pass sample=(inputs, labels), a batch "
                         "like the ones you will train on")
    micro = scatter(sample[0], microbatches)[0][0]
    labels = scatter(sample[1], microbatches)[0][0] if loss_fn is not None else None
    with Precision(precision).autocast(device):
        return profile_layers(layers, micro, device=device, loss_fn=loss_fn, labels=labels)
