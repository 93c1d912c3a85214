"""Random numbers a recomputed forward replays, and runs reproducible whatever the thread timing.

A forward that keeps only its input runs again before its backward (`Stage.recompute`) and must
draw exactly the random numbers (dropout masks) it drew the first time. torch's generators are
per device, one for the whole CPU, and shared by every thread of the process. So a forward whose
draws matter holds the generators of its device (a lock per generator) while it runs and notes
their state at its start (its `Start`); `replaying(start)` sets them back to that state for the
recompute and restores them afterwards.

Two ways a run's forwards draw (`RandomDraws`):
- from the running generators (`seed=None`, `Pipeline`): a forward advances them as in plain
  PyTorch. Forwards hold the generators only while some forward of the process may be replayed
  (`hold`), so that no other thread draws in the middle of a forward that will be;
- from a seed per (stage, micro-batch) (`seed=`, `GPipe`: one seed per call, taken from torch's
  default generator): the generators are seeded with `seed_of(stage, microbatch)` for the forward
  and put back as they were after it. The run is then reproducible under `torch.manual_seed`
  whatever the thread timing, and a recompute replays the masks.

Holding the generators makes the forwards that draw take turns. So the first forward of each
stage in a run is watched (under the lock): a stage whose forward moved no generator runs its
later forwards of the run without the lock and without seeding (a stage that draws on some
micro-batches only is not supported). A forward on a GPU holds the CPU generator and its GPU's.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import torch

Generators = list[tuple[str, torch.Generator]]
Start = tuple[Generators, list[torch.Tensor]]  # generators and their states where a forward's draws began

_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def _generators(device: torch.device) -> Generators:
    """The default generators random ops of a forward on `device` draw from, each with a key naming it."""
    found: Generators = [("cpu", torch.default_generator)]
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        found.append((f"cuda:{index}", torch.cuda.default_generators[index]))
    return found


@contextmanager
def _holding(generators: Generators) -> Iterator[None]:
    """Hold the generators' locks (in one order everywhere: no deadlock)."""
    with ExitStack() as held:
        for key, _ in generators:  # the CPU's first, then the GPU's
            with _locks_guard:
                lock = _locks.setdefault(key, threading.RLock())
            held.enter_context(lock)
        yield


class RandomDraws:
    """How the forwards of one run (one device's pass over its program) draw random numbers; see the module doc."""

    def __init__(self, seed: int | None = None):
        self.seed = seed
        self.drew: dict[int, bool] = {}  # stage -> whether its first forward of the run moved a generator

    def seed_of(self, stage: int, microbatch: int) -> int:
        """The seed of the (stage, micro-batch) forward (with `seed`)."""
        assert self.seed is not None
        return (self.seed + (stage << 24) + microbatch) & ((1 << 63) - 1)

    @contextmanager
    def forward(self, stage: int, microbatch: int, device: torch.device, hold: bool, replayed: bool
                ) -> Iterator[Start | None]:
        """Run the block as the forward of (stage, micro-batch) on `device`; yields where its draws start when
        `replayed` (for `replaying`), else None (also when the stage draws nothing). `hold`: some forward of this
        process may be replayed while this one runs."""
        seeded = self.seed is not None
        if self.drew.get(stage) is False or not (seeded or hold or replayed):
            yield None
            return
        generators = _generators(device)
        with _holding(generators):
            saved = [g.get_state() for _, g in generators]
            if seeded:
                for _, g in generators:
                    g.manual_seed(self.seed_of(stage, microbatch))
            start = [g.get_state() for _, g in generators] if seeded else saved
            try:
                yield (generators, start) if replayed else None
                if stage not in self.drew:  # the lock is held: only this forward can have moved them
                    self.drew[stage] = any(not torch.equal(g.get_state(), s) for (_, g), s in zip(generators, start))
            finally:
                if seeded:
                    for (_, g), state in zip(generators, saved):
                        g.set_state(state)


@contextmanager
def replaying(start: Start | None) -> Iterator[None]:
    """Run the block drawing what the forward that began at `start` drew (None: nothing to replay), leaving the
    generators as they were."""
    if start is None:
        yield
        return
    generators, states = start
    with _holding(generators):
        saved = [g.get_state() for _, g in generators]
        for (_, g), state in zip(generators, states):
            g.set_state(state)
        try:
            yield
        finally:
            for (_, g), state in zip(generators, saved):
                g.set_state(state)


__all__ = ["RandomDraws", "Start", "replaying"]
