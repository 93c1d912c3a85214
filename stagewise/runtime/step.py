"""The training step as parts: what runs at a STEP action, in order, each part with one contract.

The executor reaches a STEP action once it has run the last backward of its stages; it then
calls its `RankStep`, which runs the parts in order on that rank. A training feature that
acts on gradients or weights between the backward and the next forward (tied-gradient sync,
data-parallel reduction, clipping, loss scaling, the optimizer step, a new weight version)
is a part here, not a branch in the executor or in `Pipeline`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from stagewise.runtime.stage import Stage
from stagewise.runtime.ties import Ties
from stagewise.schedules.actions import Action


@dataclass
class StepContext:
    """What a part sees: the rank, the STEP action, the rank's stages and optimizer, and a report
    where parts leave what the user may read after the step (a gradient norm, a skipped step)."""

    rank: int
    action: Action
    stages: list[Stage]
    optimizer: torch.optim.Optimizer | None
    report: dict[str, Any] = field(default_factory=dict)


class StepPart(ABC):
    """One piece of the training step. `contract` states what holds once it has run."""

    contract: str = ""

    @abstractmethod
    def __call__(self, ctx: StepContext) -> None:
        """Do this part's work for `ctx.rank` (a collective when the contract spans ranks)."""


class SyncTiedGrads(StepPart):
    """Sums the gradients of parameters tied across ranks."""

    contract = "every copy of a tied parameter holds the sum of all copies' gradients"

    def __init__(self, ties: Ties):
        self.ties = ties

    def __call__(self, ctx: StepContext) -> None:
        self.ties.sync_grads(ctx.rank)


class OptimizerStep(StepPart):
    """Steps the rank's optimizer (none given: nothing to do)."""

    contract = "this rank's parameters have been updated from their .grad"

    def __call__(self, ctx: StepContext) -> None:
        if ctx.optimizer is not None:
            ctx.optimizer.step()


class NewWeightVersion(StepPart):
    """For the asynchronous schedules: the updated weights become the version the STEP action names."""

    contract = "the stages' weights are the version the STEP creates, and their gradients are zeroed"

    def __call__(self, ctx: StepContext) -> None:
        for st in ctx.stages:
            st.module.zero_grad(set_to_none=True)
            if st.versions is not None:
                st.versions.created(ctx.action.version)


class Step:
    """The ordered parts of a training step."""

    def __init__(self, parts: Sequence[StepPart]):
        self.parts = list(parts)

    def bind(self, rank: int, stages: list[Stage], optimizer: torch.optim.Optimizer | None) -> RankStep:
        """The step as rank `rank`'s executor calls it."""
        return RankStep(self, rank, stages, optimizer)

    def describe(self) -> list[str]:
        """`PartName: contract` for every part, in order."""
        return [f"{type(p).__name__}: {p.contract}" for p in self.parts]


class RankStep:
    """One rank's step: `run(action)` runs every part; `report` is what the last run reported."""

    def __init__(self, step: Step, rank: int, stages: list[Stage], optimizer: torch.optim.Optimizer | None):
        self.step, self.rank, self.stages, self.optimizer = step, rank, stages, optimizer
        self.report: dict[str, Any] = {}

    def run(self, action: Action) -> None:
        ctx = StepContext(self.rank, action, self.stages, self.optimizer)
        for part in self.step.parts:
            part(ctx)
        self.report = ctx.report
