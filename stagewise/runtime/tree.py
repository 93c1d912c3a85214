"""Nested stage I/O: a tensor, or tuples, lists and dicts of tensors; other values ride along."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

# A spec is the structure with every tensor replaced by TensorSlot(index).


class TensorSlot(tuple):
    """Placeholder for the i-th tensor of a flattened structure: (index, shape, dtype, requires_grad)."""

    __slots__ = ()

    @property
    def index(self) -> int:
        return self[0]


def flatten(tree: Any) -> tuple[list[torch.Tensor], Any]:
    """Tensors of `tree` in a fixed order, and a spec to rebuild it."""
    tensors: list[torch.Tensor] = []

    def walk(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            tensors.append(x)
            return TensorSlot((len(tensors) - 1, tuple(x.shape), x.dtype, x.requires_grad))
        if isinstance(x, tuple) and not hasattr(x, "_fields"):
            return tuple(walk(v) for v in x)
        if isinstance(x, list):
            return [walk(v) for v in x]
        if isinstance(x, dict):
            return {k: walk(v) for k, v in x.items()}
        return x

    return tensors, walk(tree)


def unflatten(spec: Any, tensors: list[torch.Tensor]) -> Any:
    """Rebuild the structure described by `spec` from `tensors`."""
    if isinstance(spec, TensorSlot):
        return tensors[spec[0]]
    if isinstance(spec, tuple):
        return tuple(unflatten(v, tensors) for v in spec)
    if isinstance(spec, list):
        return [unflatten(v, tensors) for v in spec]
    if isinstance(spec, dict):
        return {k: unflatten(v, tensors) for k, v in spec.items()}
    return spec


def map_tensors(tree: Any, fn: Callable[[torch.Tensor], Any]) -> Any:
    tensors, spec = flatten(tree)
    return unflatten(spec, [fn(t) for t in tensors])


def slots(spec: Any) -> list[TensorSlot]:
    """The tensor slots of a spec in flatten order."""
    out: list[TensorSlot] = []

    def walk(x: Any) -> None:
        if isinstance(x, TensorSlot):
            out.append(x)
        elif isinstance(x, (tuple, list)):
            for v in x:
                walk(v)
        elif isinstance(x, dict):
            for v in x.values():
                walk(v)

    walk(spec)
    return out


def describe(spec: Any) -> str:
    """Human-readable shapes and dtypes of a spec, for error messages."""
    parts = [f"{list(s[1])}:{str(s[2]).replace('torch.', '')}" for s in slots(spec)]
    return "(" + ", ".join(parts) + ")" if len(parts) != 1 else parts[0]
