"""The ranks of a run as a grid with named axes, and the groups collectives run over.

Ranks form a grid of two axes, `pipeline` (P devices, one pipeline) and `data` (D replicas):
rank = pipeline device x D + replica, so the D replicas of one pipeline device are consecutive
ranks (on one node, where the gradient reduction is heaviest) and one pipeline is every D-th rank,
as DeepSpeed's and Megatron's pipe-outer layouts give.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Grid:
    """Ranks as a `pipeline` x `data` grid: rank = device * data + replica."""

    pipeline: int
    data: int = 1

    @property
    def size(self) -> int:
        return self.pipeline * self.data

    def rank(self, device: int, replica: int = 0) -> int:
        return device * self.data + replica

    def coords(self, rank: int) -> tuple[int, int]:
        """(pipeline device, data replica) of `rank`."""
        return divmod(rank, self.data)

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The ranks of one pipeline, indexed by pipeline device."""
        return [self.rank(d, replica) for d in range(self.pipeline)]

    def data_ranks(self, device: int) -> list[int]:
        """The D replicas of one pipeline device."""
        return [self.rank(device, r) for r in range(self.data)]


@dataclass(frozen=True)
class GridGroups:
    """The groups of the grid's axes: one pipeline per replica, the D replicas of each device, and everyone."""

    pipeline: dict[int, Group]  # replica -> the ranks of its pipeline
    data: dict[int, Group]  # pipeline device -> its D replicas
    everyone: Group

    def of_rank(self, grid: Grid, rank: int) -> tuple[Group, Group]:
        """(the pipeline group, the data group) `rank` belongs to."""
        device, replica = grid.coords(rank)
        return self.pipeline[replica], self.data[device]


@dataclass(eq=False)
class Group:
    """A set of ranks that take part in a collective together; `handle` is the world's own object for it."""

    ranks: tuple[int, ...]
    handle: Any = None
    index: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {r: i for i, r in enumerate(self.ranks)}


__all__ = ["Grid", "GridGroups", "Group"]
