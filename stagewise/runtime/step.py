"""The training step as parts: what runs at a STEP action, in order, each part with one contract.

The executor reaches a STEP action once it has run the last backward of its stages; it then
calls its `RankStep`, which runs the parts in order on that rank. A training feature that
acts on gradients or weights between the backward and the next forward (tied-gradient sync,
data-parallel reduction, clipping, loss scaling, the optimizer step, a new weight version)
is a part here, not a branch in the executor or in `Pipeline`.
"""

from __future__ import annotations

import math
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.grid import Group
from stagewise.runtime.precision import LossScaler
from stagewise.runtime.stage import Stage
from stagewise.runtime.ties import Ties
from stagewise.runtime.world import PendingCollective, World
from stagewise.schedules.actions import Action

if TYPE_CHECKING:
    from stagewise.runtime.stage_set import StageSet


@dataclass
class StepContext:
    """What a part sees: the rank, the STEP action, the rank's stages and optimizer, and a report
    where parts leave what the user may read after the step (a gradient norm, a skipped step)."""

    rank: int
    action: Action
    stages: list[Stage]
    optimizer: torch.optim.Optimizer | None
    report: dict[str, Any] = field(default_factory=dict)
    skip: bool = False  # set by a part that finds the step must not be taken (the same on every rank)
    counts: dict[int, float] = field(default_factory=dict)  # micro-batch -> count of a (sum, count) loss, this run
    carried: float = 0.0  # the global count of earlier accumulating calls (step=False) since the last step
    expected: float | None = None  # the count a loss counting its items ahead said (its backward already divided)


class StepPart(ABC):
    """One piece of the training step. `contract` states what holds once it has run."""

    contract: str = ""

    @abstractmethod
    def __call__(self, ctx: StepContext) -> None:
        """Do this part's work for `ctx.rank` (a collective when the contract spans ranks)."""

    def reduce(self, rank: int, action: Action) -> None:  # noqa: B027 (most parts have no reduction)
        """A REDUCE action of `rank`'s program (see `stagewise.schedules.with_reductions`), or an UNSHARD or RESHARD
        (sharded data parallel: `stagewise.runtime.sharding`), reached this part."""


class ReduceGradients(StepPart):
    """Data parallelism: sums each stage's gradients over its D replicas.

    Every replica weighs its micro-batch losses by their share of the global batch, so the sum
    over replicas is the full-batch gradient. A REDUCE action starts the reduction of its stage
    (one flat buffer, asynchronous where the World allows), so it overlaps whatever the device
    still computes; the part, at the step, reduces what no REDUCE covered and waits for all. A
    parameter shared by two stages of one rank is reduced with the later of them.
    """

    contract = "every replica of a stage holds the sum of its replicas' gradients: the full-batch gradient"

    def __init__(self, world: World, model: StageSet):
        self.world, self.model = world, model
        self.owned = {r: {id(p) for p in ps} for r, ps in model.owned.items()}
        self.pending: dict[int, list[tuple[PendingCollective, torch.Tensor, list[torch.Tensor]]]] = {}
        self.done: dict[int, set[int]] = {}
        self.waiting: dict[int, set[int]] = {}

    def _window(self, rank: int) -> None:
        if rank not in self.waiting:
            self.waiting[rank] = set(self.model.of_rank(rank))
            self.done[rank], self.pending[rank] = set(), []

    def _start(self, rank: int, params: list[torch.nn.Parameter]) -> None:
        if not params:
            return
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.done[rank].add(id(p))
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        group = self.world.grid_groups().data[self.world.grid.coords(rank)[0]]
        self.pending[rank].append((self.world.all_reduce_async(rank, [flat], group), flat, grads))

    def reduce(self, rank: int, action: Action) -> None:
        self._window(rank)
        stages = self.model.of_rank(rank)
        self.waiting[rank].discard(action.stage)
        later = {id(p) for t in self.waiting[rank] for p in stages[t].parameters()}
        later |= set(self.model.shared)  # another thread may still add to it: reduced at the step, once settled
        self._start(rank, [p for p in stages[action.stage].parameters()
                           if id(p) in self.owned[rank] and id(p) not in later and id(p) not in self.done[rank]])

    def __call__(self, ctx: StepContext) -> None:
        rank = ctx.rank
        self._window(rank)
        self._start(rank, [p for p in self.model.owned[rank] if id(p) not in self.done[rank]])
        t0 = time.perf_counter()
        for work, flat, grads in self.pending[rank]:
            work.wait()
            for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
                g.copy_(reduced)
        ctx.report["reduce_wait_s"] = time.perf_counter() - t0  # what the reductions did not hide
        del self.waiting[rank]


class SettleSharedGrads(StepPart):
    """Ranks that are threads of one process may hold the very same parameter object (a tie between their
    stages); each adds its gradient into the one `.grad` (autograd's accumulation locks it). No part may read or
    scale such a gradient before every holder has run its last backward: this part waits for all of them."""

    contract = "every rank holding a parameter object shared with another rank has finished adding to its gradient"

    def __init__(self, world: World, model: StageSet):
        self.world = world
        self.ranks = sorted({r for ranks in model.shared.values() for r in ranks})
        self.group = world.group(self.ranks)

    def __call__(self, ctx: StepContext) -> None:
        if ctx.rank in self.ranks:
            self.world.barrier(ctx.rank, self.group)


class MeanOverCount(StepPart):
    """Losses given as (sum, count) pairs (see `stagewise.runtime.loss`). The ranks holding the last stage know
    their replica's counts; one all-reduce of every rank gives every rank the step's total (and whether the
    losses were pairs at all; scalar losses are already means). A loss that counted its items ahead had each
    backward start from 1 / that count: the total is checked against it. Otherwise the backward ran on the sums,
    and the gradients are divided by the total here."""

    contract = ("with (sum, count) losses, every gradient is divided by the count summed over every micro-batch, "
                "replica and accumulating call since the last step: the gradient of sum(sums) / sum(counts)")

    def __init__(self, world: World, model: StageSet):
        self.world, self.model = world, model

    def __call__(self, ctx: StepContext) -> None:
        tally = torch.tensor([sum(ctx.counts.values()), float(bool(ctx.counts))], dtype=torch.float64,
                             device=self.world.device(ctx.rank))
        self.world.all_reduce(ctx.rank, [tally], self.world.grid_groups().everyone)
        count, pairs = tally.tolist()
        if not pairs:
            return
        count += ctx.carried
        ctx.report["count"] = count
        if count == 0:
            raise PipelineError("every (sum, count) loss of this step counted 0 items (all labels ignored?), so the "
                                "mean is undefined; give the step a batch with at least one counted item",
                                action=str(ctx.action), rank=ctx.rank)
        if ctx.expected is not None:  # each backward already started from 1 / this count
            if count != ctx.expected:
                raise PipelineError(f"loss_fn.count(labels) gave {ctx.expected:g} items for this step but loss_fn "
                                    f"returned counts summing to {count:g}; make `count` agree with the counts the "
                                    "loss returns (or drop it)", action=str(ctx.action), rank=ctx.rank)
            return
        for p in self.model.owned[ctx.rank]:
            if p.grad is not None:
                p.grad.div_(count)


class LossScaling(StepPart):
    """fp16 dynamic loss scaling across the pipeline (see `stagewise.runtime.precision`). A flagged step is judged
    by the `NonFiniteGuard` (`stagewise.runtime.guards`), which runs later and knows the losses: a non-finite loss
    is its policy's business and leaves the scale alone; anything else is an overflow, and the guard backs the
    scale off (`LossScaler.update(True)`) or, once the scaler gives up, stops every rank naming where it appeared."""

    contract = ("gradients are unscaled; an inf/NaN gradient on any rank marks the step skipped on every rank, with "
                "report['overflow'] for the NonFiniteGuard; a clean step counts towards the scale's growth")

    def __init__(self, world: World, model: StageSet, scalers: dict[int, LossScaler]):
        self.world, self.model, self.scalers = world, model, scalers

    def __call__(self, ctx: StepContext) -> None:
        scaler = self.scalers[ctx.rank]
        inv = 1.0 / scaler.scale
        found = torch.zeros(1, dtype=torch.float64, device=self.world.device(ctx.rank))
        for p in self.model.owned[ctx.rank]:
            if p.grad is not None:
                p.grad.mul_(inv)
                found += (~torch.isfinite(p.grad)).any().to(torch.float64)
        self.world.all_reduce(ctx.rank, [found], self.world.grid_groups().everyone)  # one verdict everywhere
        ctx.report["loss_scale"] = scaler.scale
        if found.item() > 0:
            ctx.skip = ctx.report["overflow"] = True
            ctx.report["skipped"] = f"an inf or NaN gradient at loss scale {scaler.scale:g} (fp16 overflow)"
        else:
            scaler.update(False)
        ctx.report["overflow_skips"] = scaler.skips


class ClipGradNorm(StepPart):
    """The global gradient norm over every stage (replicas hold equal gradients by now), tied parameters
    counted once; with `max_norm`, gradients are scaled as `torch.nn.utils.clip_grad_norm_` scales them. A
    non-finite norm skips the step on every rank (they all compute the same norm)."""

    contract = ("report['grad_norm'] is the global gradient norm; with max_norm the gradients' norm is at most "
                "max_norm; a non-finite norm marks the step skipped everywhere")

    def __init__(self, world: World, model: StageSet, ties: Ties, max_norm: float | None,
                 held: Callable[[torch.Tensor], torch.Tensor] = lambda g: g,
                 across: Callable[[int], Group] | None = None):
        self.world, self.model, self.ties, self.max_norm = world, model, ties, max_norm
        self.held = held  # the part of a gradient this rank holds: all of it, or its shard (sharded stages)
        # the ranks whose squares make the norm: this replica's pipeline (replicas agree), or every shard's holder
        self.across = across or (lambda rank: world.grid_groups().of_rank(world.grid, rank)[0])

    def __call__(self, ctx: StepContext) -> None:
        params = [p for p in self.model.owned[ctx.rank] if p.grad is not None]
        device = self.world.device(ctx.rank)
        squares = torch.zeros(1, dtype=torch.float64, device=device)
        for p in params:
            if id(p) not in self.ties.not_counted:
                squares += self.held(p.grad).detach().to(torch.float64).pow(2).sum()
        self.world.all_reduce(ctx.rank, [squares], self.across(ctx.rank))
        norm = math.sqrt(squares.item()) if math.isfinite(squares.item()) else math.nan
        ctx.report["grad_norm"] = norm
        if not math.isfinite(norm):
            ctx.skip = True
            ctx.report["skipped"] = f"the gradient norm is {norm} (an inf or NaN gradient)"
            return
        if self.max_norm is not None:
            coef = min(self.max_norm / (norm + 1e-6), 1.0)  # clip_grad_norm_'s coefficient, clamped to 1
            for p in params:
                self.held(p.grad).mul_(coef)


class SyncTiedGrads(StepPart):
    """Sums the gradients of parameters tied across ranks."""

    contract = "every copy of a tied parameter holds the sum of all copies' gradients"

    def __init__(self, ties: Ties):
        self.ties = ties

    def __call__(self, ctx: StepContext) -> None:
        self.ties.sync_grads(ctx.rank)


class OptimizerStep(StepPart):
    """Steps the rank's optimizer. A Pipeline built without one (`given=False`) changes no weight: rank 0 warns
    once (the gradients stay in `.grad` until the next step, for a caller who steps by hand)."""

    contract = "this rank's parameters have been updated from their .grad"

    def __init__(self, given: bool = True):
        self.given, self.warned = given, False

    def __call__(self, ctx: StepContext) -> None:
        if ctx.optimizer is not None and not ctx.skip:
            ctx.optimizer.step()
        elif not self.given and not self.warned and ctx.rank == 0:
            self.warned = True
            warnings.warn("stagewise: this Pipeline has no optimizer, so its training step changed no weight (the "
                          "gradients are left in each parameter's .grad until the next step). Give it one: "
                          "Pipeline(..., optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3))", stacklevel=2)


class NewWeightVersion(StepPart):
    """For the asynchronous schedules: the updated weights become the version the STEP action names."""

    contract = "the stages' weights are the version the STEP creates, and their gradients are zeroed"

    def __call__(self, ctx: StepContext) -> None:
        for st in ctx.stages:
            st.module.zero_grad(set_to_none=True)
            if st.versions is not None:
                st.versions.created(ctx.action.version)


def training_step(world: World, model: StageSet, ties: Ties, *, asynchronous: bool = False,
                  max_grad_norm: float | None = None, track_grad_norm: bool = False,
                  scalers: dict[int, LossScaler] | None = None, optimizer: bool = True) -> Step:
    """The standard step: wait for threads sharing a parameter, reduce over data replicas (D > 1), sum tied
    gradients, divide (sum, count) losses' gradients by the global count, unscale (fp16), measure and
    clip the global norm (when asked), step the optimizer (`optimizer=False`: none was given, warn once), and for
    asynchronous schedules make the new weight version."""
    if asynchronous and ties:
        raise ValueError(f"schedule {model.schedule.name!r} keeps several weight versions per stage; parameters "
                         "tied across stages (such as GPT-2's embedding and head) are not supported with it. "
                         "Untie them or use a synchronous schedule")
    parts: list[StepPart] = [SettleSharedGrads(world, model)] if model.shared else []
    parts += [ReduceGradients(world, model)] if world.grid.data > 1 else []
    parts += [SyncTiedGrads(ties)] if ties else []
    parts += [] if asynchronous else [MeanOverCount(world, model)]
    parts += [LossScaling(world, model, scalers)] if scalers else []
    if max_grad_norm is not None or track_grad_norm:
        parts.append(ClipGradNorm(world, model, ties, max_grad_norm))
    parts.append(OptimizerStep(optimizer))
    parts += [NewWeightVersion()] if asynchronous else []
    return Step(parts)


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
        self.carried = 0.0  # set by the runner: the global count of the accumulating calls before this step
        self.expected: float | None = None  # set by the runner: the step's count known ahead (then already divided)

    def run(self, action: Action, counts: dict[int, float] | None = None) -> None:
        """Every part, in order; `counts`: this run's (sum, count) loss counts on the rank holding the last stage."""
        ctx = StepContext(self.rank, action, self.stages, self.optimizer, counts=dict(counts or {}),
                          carried=self.carried, expected=self.expected)
        for part in self.step.parts:
            part(ctx)
        self.report = ctx.report

    def reduce(self, action: Action) -> None:
        for part in self.step.parts:
            part.reduce(self.rank, action)
