"""Running a schedule on every local rank: an executor per rank, and one loss every rank agrees on."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from stagewise.runtime.executor import Executor, RunResult
from stagewise.runtime.feed import Microbatches
from stagewise.runtime.stages import StageSet
from stagewise.runtime.step import Step
from stagewise.runtime.world import World
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Timeline


class Runner:
    """The executors of this process's ranks for a schedule, and what the last run measured.

    Executors (and their transports, which remember negotiated shapes) are kept for the
    schedule given at construction; other schedules (an unflushed multi-batch program) get
    fresh ones for their run.
    """

    def __init__(self, world: World, model: StageSet, schedule: Schedule,
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None, step: Step,
                 optimizers: dict[int, torch.optim.Optimizer]):
        self.world, self.model, self.schedule, self.loss_fn = world, model, schedule, loss_fn
        self.step, self.optimizers = step, optimizers
        grid = world.grid
        self.pipelines = {r: world.group(grid.pipeline_ranks(r)) for r in range(grid.data)}  # one group per replica
        self.executors = self.executors_for(schedule)
        self.results: dict[int, RunResult] = {}

    def executors_for(self, schedule: Schedule) -> dict[int, Executor]:
        out = {}
        for rank in self.world.local_ranks:
            stages = self.model.of_rank(rank)
            out[rank] = Executor(schedule, self.world.grid.coords(rank)[0], stages,
                                 self.world.transport(rank, schedule.num_stages), self.loss_fn,
                                 self.step.bind(rank, list(stages.values()), self.optimizers.get(rank)), rank=rank)
        return out

    def run(self, feed: Microbatches, train: bool, schedule: Schedule | None = None, batches: int = 1
            ) -> torch.Tensor:
        """Every local rank walks its program over `feed`; returns the loss of each batch (float64, on the
        CPU), the same on every rank: the last stage's, broadcast along each pipeline."""
        executors = self.executors if schedule is None else self.executors_for(schedule)
        grid = self.world.grid
        m = (schedule or self.schedule).batch_microbatches

        def on_rank(rank: int) -> tuple[RunResult, torch.Tensor]:
            res = executors[rank].run(feed.inputs, feed.labels, feed.weights, train=train, keep_outputs=not train)
            losses = torch.zeros(batches, dtype=torch.float64, device=self.world.device(rank))
            for n, value in res.losses.items():  # float64, so that every rank sees the last stage's loss to the bit
                losses[n // m] += value.to(torch.float64)
            replica = grid.coords(rank)[1]
            self.world.broadcast(rank, losses, grid.rank(self.schedule.placement[-1], replica),
                                 self.pipelines[replica])
            return res, losses

        done = self.world.run(on_rank, "the step")
        self.results = {r: res for r, (res, _) in done.items()}
        return done[self.world.local_ranks[0]][1].cpu()

    def outputs(self) -> list[Any] | None:
        """The last stage's outputs of the last (evaluation) run, when this process holds the last stage."""
        last = self.schedule.placement[-1]
        return next((res.outputs for r, res in self.results.items() if self.world.grid.coords(r)[0] == last), None)

    def trace(self) -> Timeline:
        """The measured timeline of the last run, every device's events (a collective across processes)."""
        events = self.world.gather({r: res.events for r, res in self.results.items()})
        merged = [e for r in sorted(events) for e in events[r]]
        sc = self.schedule
        return Timeline(self.world.grid.pipeline, sorted(merged, key=lambda e: (e.device, e.start)),
                        title=f"measured: {sc.describe()}", unit="s", num_stages=sc.num_stages)
