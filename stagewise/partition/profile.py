"""Measure what the balancing methods need, layer by layer: time, parameters, activation bytes."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

from stagewise.partition.costs import LayerProfile

__all__ = ["LayerProfile", "profile_layers"]

# Same attribute as stagewise.runtime.ties.TIE_ATTR (partition may not import runtime): parameters
# built separately (by factories) but carrying the same key are one tied parameter.
TIE_ATTR = "stagewise_tie"


def _tensors(x: Any) -> list[torch.Tensor]:
    """The tensors of a tensor, or of nested tuples, lists and dicts; other values are skipped."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _map(x: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """`x` with `fn` applied to every tensor, structure (and namedtuples) kept."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(_map(v, fn) for v in x))
    if isinstance(x, (tuple, list)):
        return type(x)(_map(v, fn) for v in x)
    if isinstance(x, dict):
        return {k: _map(v, fn) for k, v in x.items()}
    return x


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """The input of a layer cut from the previous layer's graph, wanting a gradient as a stage input would."""
    leaf = t.detach()
    if t.requires_grad and t.is_floating_point():
        leaf.requires_grad_(True)
    return leaf


def _nbytes(x: Any) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(x))


def _param_key(p: nn.Parameter) -> tuple[str, object]:
    tie = getattr(p, TIE_ATTR, None)
    return ("tie", str(tie)) if tie is not None else ("id", id(p))


def _count_params(mods: list[nn.Module]) -> list[tuple[int, int, dict[int, int]]]:
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
        sample_input = _map(sample_input, lambda t: t.to(dev))
        if labels is not None:
            labels = _map(labels, lambda t: t.to(dev))
    else:
        first = next((p for m in mods for p in m.parameters()), None)
        dev = first.device if first is not None else next(
            (t.device for t in _tensors(sample_input)), torch.device("cpu"))
    counts = _count_params(mods)
    grads = [(p, p.grad) for m in mods for p in m.parameters()]
    cuda = [dev.index if dev.index is not None else torch.cuda.current_device()] if dev.type == "cuda" else []
    profiles = []
    try:
        with torch.random.fork_rng(devices=cuda), torch.enable_grad():
            x = sample_input
            for i, m in enumerate(mods):
                inp = x if i == 0 else _map(x, _leaf)
                run = _WithLoss(m, loss_fn, labels) if loss_fn is not None and i == len(mods) - 1 else m
                x, forward, backward, saved = _measure(run, inp, dev, repeats)
                params, param_bytes, shared = counts[i]
                backward_s = min(backward)
                profiles.append(LayerProfile(
                    index=i, name=type(m).__name__, forward=min(forward),
                    backward=backward_s, params=params, param_bytes=param_bytes,
                    output_bytes=_nbytes(x), saved_bytes=saved, shared=shared,
                    input_grad=min(_measure_input_grad(run, inp, dev, repeats), backward_s)))
    finally:
        for p, g in grads:
            p.grad = g
    return profiles


class SavedBytes:
    """Counts the bytes autograd saves for the backward inside `with counter.hooks():`, each storage once,
    the given parameters' storages excluded (they are weights, not activations). `.total` is the count."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.total = 0

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        # Detached: a saved output returned as itself would point back (grad_fn) at the node saving it, a
        # C++/Python cycle no collector breaks; a graph kept by retain_graph (the split backward's I, whose
        # nodes W does not run again) would then leak its saved tensors every micro-batch.
        return t.detach()

    def hooks(self) -> saved_tensors_hooks:
        return saved_tensors_hooks(self._pack, lambda t: t)


def _measure(m: nn.Module, inp: Any, dev: torch.device, repeats: int) -> tuple[Any, list[float], list[float], int]:
    """(output, forward seconds, backward seconds, saved bytes) of one layer; the warm-up counts the saved bytes."""
    counter = SavedBytes(m.parameters())
    forward, backward = [], []
    out: Any = None
    for r in range(repeats + 1):
        _sync(dev)
        t0 = time.perf_counter()
        if r == 0:  # hooks slow the forward down, so only the untimed warm-up counts bytes
            with counter.hooks():
                out = m(inp)
        else:
            out = m(inp)
        _sync(dev)
        t1 = time.perf_counter()
        roots = [t for t in _tensors(out) if t.requires_grad]
        seeds = [torch.ones_like(t) for t in roots]
        _sync(dev)
        t2 = time.perf_counter()
        if roots:
            torch.autograd.backward(roots, seeds)
        _sync(dev)
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
        return self.loss_fn(self.layer(x), self.labels)


def _measure_input_grad(m: nn.Module, inp: Any, dev: torch.device, repeats: int) -> float:
    """Fewest seconds of the backward to the layer's inputs alone (no weight gradients); 0 without such inputs."""
    inputs = [t for t in _tensors(inp) if t.requires_grad]
    if not inputs:
        return 0.0
    times = []
    for _ in range(repeats):
        out = m(inp)
        roots = [t for t in _tensors(out) if t.requires_grad]
        if not roots:
            return 0.0
        seeds = [torch.ones_like(t) for t in roots]
        _sync(dev)
        t0 = time.perf_counter()
        torch.autograd.grad(roots, inputs, seeds, allow_unused=True)
        _sync(dev)
        times.append(time.perf_counter() - t0)
    return min(times)


def describe_layers(layers: nn.Sequential | Sequence[nn.Module]) -> list[LayerProfile]:
    """What is known about each layer without running it: class name and parameters (tied ones once)."""
    mods = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
    return [LayerProfile(index=i, name=type(m).__name__, params=p, param_bytes=b, shared=shared)
            for i, (m, (p, b, shared)) in enumerate(zip(mods, _count_params(mods)))]
