"""Counting saved activations: the bytes autograd keeps for the backward, per stage and micro-batch."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.autograd.graph import saved_tensors_hooks


class SavedBytes:
    """Counts the bytes autograd saves for the backward inside `with counter.hooks():`, each storage once,
    the given parameters' storages excluded (they are weights, not activations). `.total` is the count."""

    def __init__(self, params: Iterable[torch.Tensor]):
        self.params = {p.untyped_storage().data_ptr() for p in params}
        self.seen: set[int] = set()
        self.total = 0

    @torch.compiler.disable  # called by autograd inside compiled stages: never traced
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
