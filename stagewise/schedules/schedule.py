"""`Schedule`: an ordered list of actions for every device, plus where every stage lives."""

from __future__ import annotations

from dataclasses import dataclass

from stagewise.schedules.actions import COMPUTE_OPS, Action
from stagewise.schedules.programs import Programs


@dataclass(frozen=True)
class Schedule:
    """An ordered list of actions for each device, plus where every stage lives.

    `placement[s]` is the device that holds stage `s`; `programs[d]` is device `d`'s program
    (given as per-device sequences of `Action`, it is stored as `Programs` columns).
    `lowered` is True once `lower()` has added the communication actions.
    """

    name: str
    num_devices: int
    microbatches: int
    placement: tuple[int, ...]
    programs: Programs  # per-device lists of Action are accepted and stored as columns
    split_backward: bool = False  # backward is I + W rather than B
    asynchronous: bool = False  # several weight versions, no flush
    lowered: bool = False
    per_batch: int = 0  # micro-batches per optimizer batch when several batches run unflushed (0: all)

    def __post_init__(self) -> None:
        if not isinstance(self.programs, Programs):
            object.__setattr__(self, "programs", Programs.from_lists(self.programs))
        object.__setattr__(self, "placement", tuple(self.placement))

    @property
    def batch_microbatches(self) -> int:
        """Micro-batches in one batch (one optimizer step for the synchronous schedules)."""
        return self.per_batch or self.microbatches

    @property
    def num_stages(self) -> int:
        return len(self.placement)

    @property
    def virtual_stages(self) -> int:
        """Stages per device (virtual stages)."""
        return self.num_stages // self.num_devices

    def stages_of(self, device: int) -> list[int]:
        return [s for s, d in enumerate(self.placement) if d == device]

    def compute_actions(self, device: int) -> list[Action]:
        return [a for a in self.programs[device] if a.op in COMPUTE_OPS]

    def describe(self) -> str:
        return (
            f"{self.name}: {self.num_devices} devices, {self.num_stages} stages, "
            f"{self.microbatches} micro-batches"
        )
