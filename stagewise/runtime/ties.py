"""Parameters shared between stages (GPT-2's embedding and LM head): keep the copies identical.

A tie is found by identity (the same nn.Parameter object in two layers of the list) or
by an attribute `stagewise_tie = "key"` on the parameter (for layers built by factories,
where each rank creates its own object). Copies on different ranks start from the
lowest rank's value; before every optimizer step their gradients are summed (the
`SyncTiedGrads` part of the step), so the step is the one a single process would take on
the one shared parameter. Ranks that are threads of one process and hold the very same
object share it already: only its owner (the first rank holding it) takes part.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from stagewise.runtime.grid import Group
from stagewise.runtime.world import World

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
    """The key naming the tie `p` belongs to, or None when it is not tied."""
    key = getattr(p, TIE_ATTR, None)
    if key is not None:
        return str(key)
    return f"shared:{names[id(p)]}" if id(p) in shared else None


class Ties:
    """Every tie held by more than one rank, with the group of its holders.

    `held[rank]` maps tie keys to the copy that rank owns. Built by every process at the same
    time (it gathers the keys and creates one group per tie and data replica: the replicas' copies
    are summed by the data-parallel reduction first); the copies are made equal at once.
    `counted(rank)` lists the copies whose gradient a global norm counts (one per tie and replica).
    """

    def __init__(self, world: World, held: dict[int, dict[str, nn.Parameter]]):
        self.world = world
        keys = world.gather({r: sorted(held.get(r, {})) for r in world.local_ranks})
        holders: dict[tuple[str, int], list[int]] = {}
        for r in sorted(keys):
            for k in keys[r]:
                holders.setdefault((k, world.grid.coords(r)[1]), []).append(r)
        self.by_rank: dict[int, list[tuple[nn.Parameter, Group, int]]] = {r: [] for r in world.local_ranks}
        self.not_counted: set[int] = set()  # ids of copies a global gradient norm skips (their first holder counts)
        for key, replica in sorted(holders):  # every process creates the groups in the same order
            ranks = holders[(key, replica)]
            if len(ranks) < 2:
                continue
            group = world.group(ranks)
            for r in world.local_ranks:
                if r in ranks:
                    self.by_rank[r].append((held[r][key], group, ranks[0]))
                    if r != ranks[0]:
                        self.not_counted.add(id(held[r][key]))
        self.count = sum(len(ranks) > 1 for ranks in holders.values())  # the same on every rank
        if any(self.by_rank.values()):
            world.run(self._equalize, "making tied parameters equal")

    def __bool__(self) -> bool:
        """Whether any parameter is tied across ranks (anywhere, not only here)."""
        return self.count > 0

    def _equalize(self, rank: int) -> None:
        with torch.no_grad():
            for p, group, src in self.by_rank[rank]:
                self.world.broadcast(rank, p.data, src, group)

    def sync_grads(self, rank: int) -> None:
        """Sum the gradients of every tied copy `rank` holds with the other copies (a collective)."""
        for p, group, _ in self.by_rank.get(rank, ()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.world.all_reduce(rank, [p.grad], group)
