"""Parameters shared between stages (GPT-2's embedding and LM head): keep the copies identical.

A tie is found by identity (the same nn.Parameter object in two layers of the list) or
by an attribute `stagewise_tie = "key"` on the parameter (for layers built by factories,
where each rank creates its own object). Copies on different ranks start from the
lowest rank's value; before every optimizer step their gradients are summed, so the
step is the one a single process would take on the one shared parameter.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import nn

TIE_ATTR = "stagewise_tie"


def canonical_names(layers: Sequence[nn.Module | object]) -> dict[int, str]:
    """id(parameter) -> its name in `nn.Sequential(*layers)` (first occurrence), for the modules given."""
    names: dict[int, str] = {}
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Module):
            for name, p in layer.named_parameters(remove_duplicate=False):
                names.setdefault(id(p), f"{i}.{name}")
    return names


def shared_ids(layers: Sequence[nn.Module | object]) -> set[int]:
    """Parameters that appear in more than one layer."""
    seen: dict[int, int] = {}
    shared: set[int] = set()
    for i, layer in enumerate(layers):
        if isinstance(layer, nn.Module):
            for p in layer.parameters():
                if seen.setdefault(id(p), i) != i:
                    shared.add(id(p))
    return shared


def tie_key(p: nn.Parameter, names: dict[int, str], shared: set[int]) -> str | None:
    key = getattr(p, TIE_ATTR, None)
    if key is not None:
        return str(key)
    return f"shared:{names[id(p)]}" if id(p) in shared else None


class DistTies:
    """Ties across ranks: one gloo/nccl group per tied parameter, gradients all-reduced before a step."""

    def __init__(self, local: dict[str, nn.Parameter], rank: int, world: int):
        gathered: list[list[str]] = [[] for _ in range(world)]
        dist.all_gather_object(gathered, sorted(local))
        holders: dict[str, list[int]] = {}
        for r, keys in enumerate(gathered):
            for k in keys:
                holders.setdefault(k, []).append(r)
        self.groups: list[tuple[nn.Parameter, object]] = []
        for key in sorted(holders):  # every rank creates the groups in the same order
            ranks = holders[key]
            if len(ranks) < 2:
                continue
            group = dist.new_group(ranks)
            if key in local:
                with torch.no_grad():
                    dist.broadcast(local[key].data, src=ranks[0], group=group)
                self.groups.append((local[key], group))

    def sync_grads(self) -> None:
        for p, group in self.groups:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            dist.all_reduce(p.grad, group=group)


class LocalTies:
    """Ties among devices that are threads of one process: a barrier, then copies share summed gradients."""

    def __init__(self, per_device: dict[int, dict[str, nn.Parameter]], timeout: float):
        self.timeout = timeout
        by_key: dict[str, list[nn.Parameter]] = {}
        for params in per_device.values():
            for key, p in params.items():
                if all(q is not p for q in by_key.setdefault(key, [])):
                    by_key[key].append(p)
        self.copies = [ps for ps in by_key.values() if len(ps) > 1]
        with torch.no_grad():
            for ps in self.copies:
                for q in ps[1:]:
                    q.copy_(ps[0])
        devices = [d for d, params in per_device.items() if params]
        self.barrier = threading.Barrier(len(devices)) if len(devices) > 1 else None
        self.devices = set(devices)
        self._lock = threading.Lock()

    def sync_grads(self, device: int) -> None:
        if self.barrier is None or device not in self.devices:
            return
        if self.barrier.wait(self.timeout) == 0:  # one thread sums while the others wait at the second barrier
            for ps in self.copies:
                grads = [q.grad for q in ps if q.grad is not None]
                total = torch.stack(grads).sum(0) if grads else None
                for q in ps:
                    q.grad = None if total is None else total.clone()
        self.barrier.wait(self.timeout)

    def abort(self) -> None:
        if self.barrier is not None:
            self.barrier.abort()
