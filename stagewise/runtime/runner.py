"""Running a schedule on every local rank: an executor per rank, data for each replica, one agreed loss."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.executor import Executor, RunResult
from stagewise.runtime.feed import Microbatches, MicrobatchFeed
from stagewise.runtime.guards import BatchCheck, NonFiniteGuard, RankWatch, guarded
from stagewise.runtime.microbatch import batch_size
from stagewise.runtime.precision import LossScaler
from stagewise.runtime.stage_set import StageSet
from stagewise.runtime.step import RankStep, Step
from stagewise.runtime.streams import ActionClock
from stagewise.runtime.transport import Transport
from stagewise.runtime.versions import stashing
from stagewise.runtime.world import World
from stagewise.schedules import ScheduleError
from stagewise.schedules.registry import resolve_schedule
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Timeline
from stagewise.schedules.validate import validate


class Runner:
    """The executors of this process's ranks, and what the last run measured and reported.

    Executors are kept for the schedule given at construction and for its accumulating form
    (the same lists without optimizer steps and reductions, for `step=False` calls); other
    schedules (an unflushed multi-batch program) get fresh ones. Every rank keeps one transport
    for all of them, so negotiated shapes are remembered across steps.
    """

    def __init__(self, world: World, model: StageSet, schedule: Schedule,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None, step: Step,
                 optimizers: dict[int, torch.optim.Optimizer], scalers: dict[int, LossScaler] | None = None,
                 on_nonfinite: str = "raise"):
        self.world, self.model, self.schedule, self.loss_fn = world, model, schedule, loss_fn
        self.scalers = scalers or {}
        self.optimizers = optimizers
        self.groups = world.grid_groups()
        # the guards (see `stagewise.runtime.guards`): a watch per rank, the non-finite policy, the batch check
        alone = len(world.local_ranks) == 1
        self.watches = {r: RankWatch(r, model.of_rank(r), schedule.num_stages - 1, world.status if alone else None)
                        for r in world.local_ranks}
        self.step = guarded(step, NonFiniteGuard(world, model, self.watches, on_nonfinite, schedule.asynchronous,
                                                 self.scalers))
        balance = [hi - lo for lo, hi in model.layer_ranges]
        self.check = BatchCheck(world, f"schedule {schedule.name}, {schedule.microbatches} micro-batches, "
                                       f"{world.grid.pipeline} x {world.grid.data} ranks, balance {balance}")
        self.steps = 0  # calls so far (the status names them `step N`)
        self.transports: dict[int, Transport] = {r: world.transport(r, schedule.num_stages) for r in world.local_ranks}
        self.rank_steps: dict[int, RankStep] = {}
        self.executors = self.executors_for(schedule)
        self._accumulating: dict[int, Executor] | None = None
        self.results: dict[int, RunResult] = {}
        self.samples = 0  # samples whose gradients are accumulated since the last optimizer step
        self.pairs = False  # whether loss_fn returned (sum, count) pairs in the last run (learnt from the runs)
        self.carried = [0.0, 0.0]  # (loss, weight) of the accumulating calls since the last step: samples or counts
        self.step_loss: float | None = None  # the loss of the last step over all its calls (see `step_batch`)
        counter = getattr(loss_fn, "count", None)  # a (sum, count) loss that counts a batch's items ahead
        self.counter = counter if callable(counter) and not schedule.asynchronous else None

    def executors_for(self, schedule: Schedule) -> dict[int, Executor]:
        out = {}
        for rank in self.world.local_ranks:
            stages = self.model.of_rank(rank)
            if rank not in self.rank_steps:
                self.rank_steps[rank] = self.step.bind(rank, list(stages.values()), self.optimizers.get(rank))
            scaler = self.scalers.get(rank)
            out[rank] = Executor(schedule, self.world.grid.coords(rank)[0], stages, self.transports[rank],
                                 self.loss_fn, self.rank_steps[rank], rank=rank, watch=self.watches[rank],
                                 loss_scale=None if scaler is None else lambda s=scaler: s.scale,
                                 clock=ActionClock(self.world.device(rank)))
        return out

    def step_batch(self, batch: tuple[Any, Any], microbatches: int, train: bool, step: bool = True) -> torch.Tensor:
        """One flushed pass over `batch` (every rank is given the same batch; each replica takes its share).

        Training calls with `step=False` only accumulate gradients; the next stepping call steps on the
        mean over every sample since the last step (earlier gradients are rescaled as samples come in), or,
        for (sum, count) losses, on sum(sums) / sum(counts) over every call: with a loss that counts a batch's
        items ahead (`loss_fn.count(labels)`), each backward starts from 1 / the items so far and earlier
        gradients are rescaled as items come in, as for samples; otherwise `.grad` holds the sums until the step
        divides them. Returns this call's loss (float64, on the CPU), the same on every rank; `step_loss` is the
        loss over every call of the step, once a call has stepped.
        """
        grid, device = self.world.grid, self.model.world.device(self.world.local_ranks[0])
        fields = self.check.fields(batch, "eval_step" if not train else "train_step" if step else
                                   "train_step(step=False)")
        scale, total, item_weight = 1.0, 0, None
        if train:
            total = batch_size(batch[0]) if isinstance(batch, (tuple, list)) and len(batch) == 2 else 0
            items = float(self.counter(batch[1])) if self.counter is not None else None  # the whole batch's
            if self.samples == 0:
                self.model.zero_grad()
                self.carried = [0.0, 0.0]
            elif items is not None:  # keep .grad the mean over all items so far
                self.model.scale_grads(self.carried[1] / (self.carried[1] + items) if self.carried[1] + items else 0.0)
            elif not self.pairs:  # keep .grad the mean over all samples so far
                self.model.scale_grads(self.samples / (self.samples + total))
                scale = total / (self.samples + total)
            if items is not None:
                item_weight = 1.0 / (self.carried[1] + items) if self.carried[1] + items else 0.0
            for st in self.rank_steps.values():  # for MeanOverCount: the counts of the earlier calls, and all
                st.carried = self.carried[1]
                st.expected = None if items is None else self.carried[1] + items
            self.samples = 0 if step else self.samples + total
        replicas = sorted({grid.coords(r)[1] for r in self.world.local_ranks})
        feeds = {r: Microbatches.of_batch(batch, microbatches, device, self.schedule.name, r, grid.data, scale,
                                          item_weight) for r in replicas}
        executors = self.executors if step or not train else self._accumulate()
        tallies = self.run(feeds, train, executors=executors, fields=fields, tallies=True)[0]
        loss_sum, count, pairs = tallies.tolist()
        pairs = pairs > 0
        if train and pairs != self.pairs and self.carried[1]:
            raise PipelineError("loss_fn changed between a (sum, count) pair and a scalar within one accumulated step; "
                                "return one form for every call")
        self.pairs = bool(pairs)
        if not self.pairs:
            loss, count = loss_sum / scale, float(total)
        else:
            loss = loss_sum / count if count else float("nan")
        if train:
            self.carried = [self.carried[0] + (loss_sum if self.pairs else loss * count), self.carried[1] + count]
            if step:
                self.step_loss = self.carried[0] / self.carried[1] if self.carried[1] else loss
                self.carried = [0.0, 0.0]
        return torch.tensor(loss, dtype=torch.float64)

    def _accumulate(self) -> dict[int, Executor]:
        if self._accumulating is None:
            self._accumulating = self.executors_for(validate(without_step(self.schedule)))
        return self._accumulating

    def run(self, feeds: dict[int, Microbatches], train: bool, schedule: Schedule | None = None, batches: int = 1,
            executors: dict[int, Executor] | None = None, fields: dict[str, str] | None = None,
            tallies: bool = False) -> torch.Tensor:
        """Every local rank walks its program over its replica's feed; returns the loss of each batch (float64,
        on the CPU), the same on every rank: the last stage's, broadcast along each pipeline, summed over the
        replicas; for (sum, count) losses sum(sums) / sum(counts). With `tallies`, each batch's row is
        (sum of the weighted losses or of the sums, sum of the counts, 1 if the losses were pairs). The ranks
        first agree on `fields` (the batch's fingerprint; without it, the settings alone)."""
        if executors is None:
            executors = self.executors if schedule is None else self.executors_for(schedule)
        grid = self.world.grid
        m = (schedule or self.schedule).batch_microbatches
        fields = fields or self.check.fields(None, f"train over {batches} batches" if train else "eval")
        self.steps += 1
        for watch in self.watches.values():
            watch.step = self.steps
            if self.schedule.asynchronous:  # each run is a program of its own; a synchronous step may accumulate
                watch.clear()

        def on_rank(rank: int) -> tuple[RunResult, torch.Tensor]:
            self.check.agree(rank, fields)
            replica = grid.coords(rank)[1]
            feed = feeds[replica]
            res = executors[rank].run(feed.inputs, feed.labels, feed.weights, train=train, keep_outputs=not train,
                                      per_item=getattr(feed, "per_item", False))
            losses = torch.zeros(batches, 3, dtype=torch.float64, device=self.world.device(rank))
            for n, value in res.losses.items():  # float64, so that every rank sees the last stage's loss to the bit
                losses[n // m, 0] += value.to(torch.float64)
            for n, count in res.counts.items():
                losses[n // m, 1] += count
                losses[n // m, 2] = 1.0
            pipeline, data = self.groups.of_rank(grid, rank)
            self.world.broadcast(rank, losses, grid.rank(self.schedule.placement[-1], replica), pipeline)
            self.world.all_reduce(rank, [losses], data)
            return res, losses

        done = self.world.run(on_rank, "the step")
        self.results = {r: res for r, (res, _) in done.items()}
        rows = done[self.world.local_ranks[0]][1].cpu()
        if tallies:
            return rows
        pairs = rows[:, 2] > 0
        return torch.where(pairs, rows[:, 0] / rows[:, 1], rows[:, 0])

    def unflushed(self, it: Iterator[tuple[Any, Any]], rebuild: tuple[str, int | None, dict] | None, batches: int
                  ) -> tuple[list[float], dict[int, int]]:
        """Run `batches` batches from `it` as one program that never drains (PipeDream, 2BW), the schedule built
        again by name for that many batches (`rebuild`: name, virtual_stages,
                                             generator options): the loss of each batch,
        and the most weight versions each stage held at once."""
        if rebuild is None:
            raise ScheduleError("an asynchronous Schedule object runs one batch per train_step; to run several "
                                "batches unflushed, pass the schedule by name")
        grid = self.world.grid
        name, virtual_stages, options = rebuild
        schedule = resolve_schedule(name, grid.pipeline, self.schedule.batch_microbatches, virtual_stages,
                                    batches=batches,
                                    data_parallel=grid.data, **options)
        m = schedule.batch_microbatches
        device = self.world.device(self.world.local_ranks[0])
        feed = MicrobatchFeed(it, m, device, keep=grid.pipeline // m + 2, replicas=grid.data)  # batches in flight
        feeds = {grid.coords(r)[1]: feed.microbatches(grid.coords(r)[1]) for r in self.world.local_ranks}
        peaks: dict[int, int] = {}
        with stashing(schedule, self.model.all(), peaks):
            losses = self.run(feeds, True, schedule, batches=batches)
        return losses.tolist(), peaks

    def report(self) -> dict[str, Any]:
        """What the step's parts reported in the last step (gradient norm, a skipped step), this process's
        first rank (the parts agree across ranks)."""
        return dict(self.rank_steps[self.world.local_ranks[0]].report)

    def outputs(self) -> list[Any] | None:
        """The last stage's outputs of the last (evaluation) run on this process's first replica, when this
        process holds the last stage."""
        last, first = self.schedule.placement[-1], self.world.grid.coords(self.world.local_ranks[0])[1]
        return next((res.outputs for r, res in self.results.items() if self.world.grid.coords(r) == (last, first)),
                    None)

    def trace(self) -> Timeline:
        """The measured timeline of the last run, every rank's events (a collective across processes). With
        data parallelism every rank gets its own row (row = rank), else a row per pipeline device."""
        events = self.world.gather({r: res.events for r, res in self.results.items()})
        grid = self.world.grid
        if grid.data > 1:
            for r, evs in events.items():
                for e in evs:
                    e.device = r
        merged = [e for r in sorted(events) for e in events[r]]
        sc = self.schedule
        rows = grid.size if grid.data > 1 else grid.pipeline
        title = f"measured: {sc.describe()}" + (f" x {grid.data} data replicas (row = rank)" if grid.data > 1 else "")
        return Timeline(rows, sorted(merged, key=lambda e: (e.device, e.start)), title=title, unit="s",
                        num_stages=sc.num_stages)


def without_step(schedule: Schedule) -> Schedule:
    """The same programs without optimizer steps and gradient reductions: a call that only accumulates."""
    from dataclasses import replace

    from stagewise.schedules.actions import REDUCE, STEP

    return replace(schedule, programs=[[a for a in prog if a.op not in (STEP, REDUCE)] for prog in schedule.programs])
