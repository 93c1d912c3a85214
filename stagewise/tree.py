"""The tensor tree: nested stage inputs and outputs, on `torch.utils._pytree`.

A stage may take and return a tensor, or tuples, lists, dicts and namedtuples of them (and
dataclasses registered with `register_dataclass`); other values (strings, numbers, None)
ride along unchanged. Everything that walks stage I/O (the runtime's transports, the
micro-batch split, the stage's cut from the previous stage's graph, the profiler) goes
through this one module, so a structure crosses a stage boundary exactly as it left.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.utils._pytree as pytree


class TensorSlot(NamedTuple):
    """Where the i-th tensor of a flattened structure sits, and what it was."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype
    requires_grad: bool


class Spec(NamedTuple):
    """A structure with its tensors taken out: the pytree spec, and every leaf (a `TensorSlot` for
    each tensor, the value itself for anything else)."""

    treespec: pytree.TreeSpec
    leaves: tuple[Any, ...]


def register_dataclass(cls: type) -> type:
    """Let instances of the dataclass `cls` cross stage boundaries (its fields are walked); returns `cls`,
    so it works as a decorator. Namedtuples, tuples, lists and dicts need no registration."""
    pytree.register_dataclass(cls)
    return cls


def flatten(tree: Any) -> tuple[list[torch.Tensor], Spec]:
    """The tensors of `tree` in a fixed order, and the spec that rebuilds it."""
    leaves, treespec = pytree.tree_flatten(tree)
    tensors: list[torch.Tensor] = []
    out = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            out.append(TensorSlot(len(tensors), tuple(leaf.shape), leaf.dtype, leaf.requires_grad))
            tensors.append(leaf)
        else:
            out.append(leaf)
    return tensors, Spec(treespec, tuple(out))


def unflatten(spec: Spec, tensors: list[torch.Tensor]) -> Any:
    """Rebuild the structure `spec` describes, with `tensors` in its tensor slots."""
    leaves = [tensors[x.index] if isinstance(x, TensorSlot) else x for x in spec.leaves]
    return pytree.tree_unflatten(leaves, spec.treespec)


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    """`tree` with `fn` applied to every tensor, the structure (and every other value) kept."""
    return pytree.tree_map_only(torch.Tensor, fn, tree)


def tensors_of(tree: Any) -> list[torch.Tensor]:
    """The tensors of `tree`, in flatten order."""
    return [x for x in pytree.tree_leaves(tree) if isinstance(x, torch.Tensor)]


def slots(spec: Spec) -> list[TensorSlot]:
    """The tensor slots of a spec, in flatten order."""
    return [x for x in spec.leaves if isinstance(x, TensorSlot)]


def shape_key(spec: Spec) -> list[tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor's shape without its first (batch) dimension, and its dtype: what must agree
    between the micro-batches of one step."""
    return [(tuple(s.shape[1:]), s.dtype) for s in slots(spec)]


def describe(spec: Spec) -> str:
    """Shapes and dtypes of a spec's tensors for error messages, such as `[2, 5, 6]:float64`."""
    parts = [f"{list(s.shape)}:{str(s.dtype).replace('torch.', '')}" for s in slots(spec)]
    return "(" + ", ".join(parts) + ")" if len(parts) != 1 else parts[0]


def concat(trees: list[Any]) -> Any:
    """Structures of one shape (the outputs of a batch's micro-batches, in order) joined as one structure over the
    whole batch: every tensor concatenated along dim 0; other values taken from the first. A 0-dim tensor has no
    batch dimension to join along: those are stacked, one value per structure (a forward of the whole batch would
    give one value, but how it reduces, a mean or a sum, is the model's own business). Structures that differ
    (in their nesting, their non-tensor values' places, or a tensor's shape past dim 0) raise a ValueError."""
    if not trees:
        raise ValueError("nothing to join: no structures given")
    flat = [flatten(t) for t in trees]
    spec = flat[0][1]
    for k, (_, other) in enumerate(flat[1:], 1):
        if other.treespec != spec.treespec or shape_key(other) != shape_key(spec) or \
                [len(s.shape) for s in slots(other)] != [len(s.shape) for s in slots(spec)]:
            raise ValueError(f"cannot join the outputs of the micro-batches: number {k} is {describe(other)} "
                             f"{other.treespec} but number 0 is {describe(spec)} {spec.treespec}")
    joined = [torch.stack(ts) if ts[0].dim() == 0 else torch.cat(ts) for ts in zip(*(t for t, _ in flat))]
    return unflatten(spec, joined)


def cut(tree: Any, keep_grad: bool = True) -> Any:
    """A stage's input cut from the graph that produced it: every tensor detached; floating-point ones
    that required a gradient become leaves that record their own (when `keep_grad`)."""

    def leaf(t: torch.Tensor) -> torch.Tensor:
        x = t.detach()
        if keep_grad and t.requires_grad and t.is_floating_point():
            x.requires_grad_(True)
        return x

    return map_tensors(tree, leaf)


def dumps(spec: Spec) -> bytes:
    """A spec as bytes (equal structures give equal bytes), for sending it to another process."""
    with warnings.catch_warnings():  # pickling a TreeSpec warns about a deprecated isinstance check inside torch
        warnings.simplefilter("ignore", FutureWarning)
        return pickle.dumps(spec)


def loads(raw: bytes) -> Spec:
    """The spec `dumps` wrote."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        return pickle.loads(raw)
