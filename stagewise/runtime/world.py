"""The World: which ranks there are, where each computes, how they talk, and what happens when one fails.

Two worlds behind one interface. `LocalWorld` (`stagewise.runtime.threads`) runs every rank as a
thread of this process (notebooks, tests, one machine with several GPUs, `GPipe`); `DistWorld`
(`stagewise.runtime.processes`) is one rank per process (torchrun), talking through
`torch.distributed`. Code above the World (`Pipeline`, `GPipe`, the training step's parts, ties)
never asks which one it has. Ranks form a grid (`stagewise.runtime.grid`).

Calls come in two kinds:
- rank-level collectives (`all_reduce`, `broadcast`, `all_gather_object`, `barrier`) are
  called by every member rank of a group from inside `run`, naming the calling rank;
- process-level calls (`run`, `gather`, `compute_once`, `group`) are made once per process,
  by the caller's thread, in the same order on every process.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.grid import Grid, GridGroups, Group
from stagewise.runtime.status import RankStatus
from stagewise.runtime.transport import Transport

T = TypeVar("T")


class World(ABC):
    """Ranks, their devices, their transports and collectives, and the failure policy."""

    grid: Grid
    timeout: float
    local_ranks: list[int]  # the ranks this process runs
    failed: str | None = None  # set once a step failed: the world is then unusable
    status: RankStatus | None = None  # where this process's rank is, for its launcher (see `status`)
    placement: Sequence[int] | None = None  # stage -> pipeline device, set by the Pipeline (for messages)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.grid.size

    @abstractmethod
    def device(self, rank: int) -> torch.device:
        """The torch device rank `rank` computes on."""

    @abstractmethod
    def transport(self, rank: int, num_stages: int) -> Transport:
        """Point-to-point messages of `rank` to the other devices of its pipeline (peers named by device)."""

    def who(self, rank: int) -> str:
        """`rank` with the stages it holds, for messages: "rank 3 (stage 1, replica 1)"."""
        device, replica = self.grid.coords(rank)
        stages = [s for s, d in enumerate(self.placement or ()) if d == device]
        parts = [f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}"] if stages else []
        parts += [f"replica {replica}"] if self.grid.data > 1 else []
        return f"rank {rank}" + (f" ({', '.join(parts)})" if parts else "")

    # -- process-level -----------------------------------------------------------------------------
    @abstractmethod
    def run(self, fn: Callable[[int], T], what: str) -> dict[int, T]:
        """`fn(rank)` for every local rank, under the failure policy; their results by rank. `what` names
        the work in error messages ("the step"). A failure on any rank ends every rank with an error."""

    @abstractmethod
    def gather(self, values: dict[int, Any]) -> dict[int, Any]:
        """Every rank's value (picklable), given this process's `{rank: value}` for its local ranks."""

    @abstractmethod
    def compute_once(self, fn: Callable[[], T]) -> T:
        """`fn()` computed by one process and handed to all (so that every rank decides alike)."""

    @abstractmethod
    def group(self, ranks: Sequence[int]) -> Group:
        """A group of `ranks` for rank-level collectives; every process creates the same groups in order."""

    def grid_groups(self) -> GridGroups:
        """The groups of the grid's axes, created once (by every process, in the same order)."""
        cached = getattr(self, "_grid_groups", None)
        if cached is None:
            g = self.grid
            cached = GridGroups({r: self.group(g.pipeline_ranks(r)) for r in range(g.data)},
                                {d: self.group(g.data_ranks(d)) for d in range(g.pipeline)},
                                self.group(range(g.size)))
            self._grid_groups = cached
        return cached

    def all_reduce_async(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> PendingCollective:
        """Start `all_reduce`; the result is in place once the returned handle's `wait()` returns."""
        self.all_reduce(rank, tensors, group)
        return PendingCollective()

    def close(self) -> None:  # noqa: B027 (a world without helper threads has nothing to stop)
        """Stop helper threads (the failure watchdog); idempotent."""

    def check(self) -> None:
        """Raise if an earlier failure ended this world."""
        if self.failed:
            raise PipelineError(f"this pipeline stopped after an earlier failure: {self.failed}")

    # -- rank-level collectives --------------------------------------------------------------------
    @abstractmethod
    def all_reduce(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> None:
        """Sum `tensors` over the group's ranks, in place; every member ends with the same values."""

    @abstractmethod
    def broadcast(self, rank: int, tensor: torch.Tensor, src: int, group: Group) -> None:
        """Copy rank `src`'s `tensor` into every member's, in place."""

    @abstractmethod
    def all_gather_object(self, rank: int, obj: Any, group: Group) -> list[Any]:
        """Every member's `obj`, in the group's rank order."""

    def barrier(self, rank: int, group: Group) -> None:
        """Return once every member of `group` has called it."""
        self.all_gather_object(rank, None, group)


class PendingCollective:
    """A collective started asynchronously; `wait()` blocks until it is done (here: already done)."""

    def __init__(self, works: Sequence[Any] = (), timeout: float | None = None,
                 failed: Callable[[Exception], Exception] | None = None):
        self.works, self.timeout, self.failed = list(works), timeout, failed

    def wait(self) -> None:
        from datetime import timedelta

        try:
            for w in self.works:
                if self.timeout:
                    w.wait(timedelta(seconds=self.timeout))
                else:
                    w.wait()
        except Exception as err:
            named = err if self.failed is None else self.failed(err)
            if named is err:
                raise
            raise named from err
        self.works = []


__all__ = ["PendingCollective", "World"]
