"""The stages a process holds: built from the layer list and the balance, with who owns which parameter."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence

import torch
from torch import nn

from stagewise.runtime import ties
from stagewise.runtime.compiled import compile_module
from stagewise.runtime.precision import Precision
from stagewise.runtime.stage import HeldBytes, Stage
from stagewise.runtime.world import World
from stagewise.schedules.actions import RECOMPUTE
from stagewise.schedules.schedule import Schedule

LayerSpec = nn.Module | Callable[[], nn.Module]


class StageSet:
    """The stages of every local rank, and each rank's parameters (data replicas start from replica 0's).

    A rank owns (and steps) the parameters of its stages; a parameter object shared by stages
    of two local ranks (threads of one process) is owned once, by the first rank holding it.
    `tied[rank]` maps tie keys (see `stagewise.runtime.ties`) to the copy that rank owns.
    """

    def __init__(self, layers: Sequence[LayerSpec], balance: Sequence[int], schedule: Schedule, world: World,
                 seed: int | None = None, precision: Precision | None = None, recompute_every: int | None = None,
                 compile: bool | str = False):
        starts = [sum(balance[:s]) for s in range(len(balance))]
        self.layer_ranges = [(a, a + n) for a, n in zip(starts, balance)]
        self.schedule, self.world = schedule, world
        world.placement = schedule.placement  # the world's messages name a rank by the stages it holds
        names, shared = ties.canonical_names(layers), ties.shared_ids(layers)
        self.by_rank: dict[int, dict[int, Stage]] = {}
        copies: dict[int, Sequence[LayerSpec]] = {}
        # a forward any thread of this process recomputes must draw undisturbed by the others (`Stage.replays`)
        replays = any(a.op == RECOMPUTE for r in world.local_ranks for a in schedule.programs[world.grid.coords(r)[0]])
        for rank in world.local_ranks:
            device, replica = world.grid.coords(rank)
            if replica not in copies:  # data replicas in one process each get their own layers (ties kept)
                copies[replica] = layers if not copies else copy.deepcopy(list(layers))
            mine: dict[int, Stage] = {}
            for s in schedule.stages_of(device):
                lo, hi = self.layer_ranges[s]
                built = [build_layer(copies[replica][i], i, seed) for i in range(lo, hi)]
                mine[s] = Stage(s, [m.to(world.device(rank)) for m in built], lo, names, precision, recompute_every)
                compile_module(mine[s].module, compile, world.device(rank))  # in place: the names stay
            self.by_rank[rank] = mine
            device_bytes = HeldBytes()
            for st in mine.values():
                st.device_bytes, st.replays = device_bytes, replays
        # stage index -> Stage, for this process's first data replica (the only one, with processes)
        replica = world.grid.coords(world.local_ranks[0])[1]
        self.stages: dict[int, Stage] = {s: st for r, mine in self.by_rank.items()
                                         if world.grid.coords(r)[1] == replica for s, st in mine.items()}
        self.owned: dict[int, list[nn.Parameter]] = {}
        self.tied: dict[int, dict[str, nn.Parameter]] = {}
        seen: set[int] = set()
        for rank, mine in self.by_rank.items():
            own: list[nn.Parameter] = []
            tied: dict[str, nn.Parameter] = {}
            for st in mine.values():
                for p in st.parameters():
                    if id(p) in seen:
                        continue
                    seen.add(id(p))
                    own.append(p)
                    key = ties.tie_key(p, names, shared)
                    if key is not None:
                        tied[key] = p
            self.owned[rank], self.tied[rank] = own, tied
        # parameter objects held by stages of several local ranks (ties between threads): id -> those ranks
        holders: dict[int, set[int]] = {}
        for rank, mine in self.by_rank.items():
            for st in mine.values():
                for p in st.parameters():
                    holders.setdefault(id(p), set()).add(rank)
        self.shared: dict[int, list[int]] = {i: sorted(rs) for i, rs in holders.items() if len(rs) > 1}
        self.replicate()

    def of_rank(self, rank: int) -> dict[int, Stage]:
        """Stage index -> Stage for the stages rank `rank` runs."""
        return self.by_rank[rank]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The parameters of `stages` (the first replica's), by their unsplit names, each listed once."""
        out, seen = [], set()
        for s in sorted(self.stages):
            for name, p in self.stages[s].named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def device_peaks(self) -> dict[int, int]:
        """Peak saved-activation bytes per pipeline device of the first replica (its stages together)."""
        replica = self.world.grid.coords(self.world.local_ranks[0])[1]
        return {self.world.grid.coords(r)[0]: next(iter(st.values())).device_bytes.peak
                for r, st in self.by_rank.items() if st and self.world.grid.coords(r)[1] == replica}

    def all(self) -> list[Stage]:
        return [st for mine in self.by_rank.values() for st in mine.values()]

    @contextlib.contextmanager
    def evaluating(self) -> Iterator[None]:
        """Every module of every stage this process holds in eval mode (dropout off, batch norm on its running
        statistics) inside the block, and back in the mode each had after it, even when the block raises."""
        modules = [m for st in self.all() for m in st.module.modules()]
        modes = [m.training for m in modules]
        try:
            for m in modules:
                m.train(False)
            yield
        finally:
            for m, mode in zip(modules, modes):
                m.train(mode)

    def zero_grad(self) -> None:
        for st in self.all():
            st.module.zero_grad(set_to_none=True)
        for ps in self.owned.values():  # a sharded stage's module may hold whole copies, not the owned shards
            for p in ps:
                p.grad = None

    def scale_grads(self, factor: float) -> None:
        """Multiply every gradient held by `factor`."""
        for grads in self.owned.values():
            for p in grads:
                if p.grad is not None:
                    p.grad.mul_(factor)

    def replicate(self) -> None:
        """Copy replica 0's parameters and buffers to the other data replicas (as DDP does at start)."""
        world, grid = self.world, self.world.grid
        if grid.data == 1:
            return
        groups = world.grid_groups()

        def copy_from_replica_0(rank: int) -> None:
            device = grid.coords(rank)[0]
            for s in sorted(self.by_rank[rank]):
                module = self.by_rank[rank][s].module
                for t in list(module.parameters()) + list(module.buffers()):
                    world.broadcast(rank, t.data, grid.rank(device, 0), groups.data[device])

        world.run(copy_from_replica_0, "copying replica 0's weights to every data replica")


def as_layer_list(layers: nn.Sequential | Sequence[LayerSpec]) -> list[LayerSpec]:
    """The layers of an nn.Sequential, or the list given."""
    return list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)


def build_layer(spec: LayerSpec, index: int, seed: int | None) -> nn.Module:
    """A layer given as a module, or built by its zero-argument factory (seeded by `seed + index`)."""
    if isinstance(spec, nn.Module):
        return spec
    if not callable(spec):
        raise TypeError(f"layer {index} is neither an nn.Module nor a zero-argument factory: {spec!r}")
    if seed is not None:
        torch.manual_seed(seed + index)
    module = spec()
    if not isinstance(module, nn.Module):
        raise TypeError(f"layer factory {index} returned {type(module).__name__}, not an nn.Module")
    return module
