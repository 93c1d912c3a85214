"""Recomputation for the in-process GPipe: which micro-batches are checkpointed, and random numbers that replay.

`checkpoint=` takes torchgpipe's three modes. A checkpointed (partition, micro-batch) keeps only
its input in the forward and runs its forward again inside its backward
(`torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`); `is_recomputing()` is True during
that second run, so layers with side effects (`DeferredBatchNorm`'s statistics) skip them.

Random numbers. A recomputed forward must draw exactly the random numbers (dropout masks) its
first run drew. torch's generators are per device, and one process-wide for the CPU, while
GPipe runs one worker thread per pipeline device: several workers on the CPU (or on one GPU)
draw from one generator in an order that depends on thread timing, so neither torch's own
save-and-restore of the generator nor the order of draws is reproducible. Here, in training
mode, each (partition, micro-batch) forward draws from its own seed, derived from one seed
taken from torch's default generator per call: the worker holds the generator of its device
(a lock per generator), seeds it, runs the partition and puts the generator back as it was.
The recomputation seeds it again the same way, so it replays the same masks; and a run is
reproducible under `torch.manual_seed`, whatever the thread timing.

Holding the generator serialises the forwards of partitions that share it. So after a
partition's first micro-batch of each call the generator's state is compared with the seeded
one: a partition that drew nothing there runs its other micro-batches without the lock (and
without seeding). A partition on a GPU holds that GPU's generator only: random ops on the CPU
inside a GPU partition are not made reproducible.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import torch

CHECKPOINT_MODES = ("always", "except_last", "never")

_local = threading.local()
_locks: dict[str, threading.RLock] = {}
_locks_guard = threading.Lock()


def checkpoint_stop(mode: str, microbatches: int) -> int:
    """Micro-batches [0, stop) are checkpointed: all of them ("always"), all but the last ("except_last"),
    none ("never")."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {', '.join(map(repr, CHECKPOINT_MODES))}, got {mode!r}")
    return {"always": microbatches, "except_last": microbatches - 1, "never": 0}[mode]


def is_recomputing() -> bool:
    """True while a checkpointed forward runs a second time, inside its backward."""
    return getattr(_local, "recomputing", False)


@contextmanager
def recomputing(flag: bool) -> Iterator[None]:
    before = is_recomputing()
    _local.recomputing = flag
    try:
        yield
    finally:
        _local.recomputing = before


def _generator(device: torch.device) -> tuple[str, torch.Generator] | None:
    """The default generator random ops on `device` draw from, with a key naming it (None: not handled)."""
    if device.type == "cpu":
        return "cpu", torch.default_generator
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index}", torch.cuda.default_generators[index]
    return None


def _lock(key: str) -> threading.RLock:
    with _locks_guard:
        return _locks.setdefault(key, threading.RLock())


class RandomStreams:
    """A seed per (partition, micro-batch) of one call, and whether each partition draws random numbers."""

    def __init__(self, seed: int):
        self.seed = seed
        self.draws: dict[int, bool] = {}  # partition -> drew on its first micro-batch of this call

    def seed_of(self, stage: int, microbatch: int) -> int:
        return (self.seed + (stage << 24) + microbatch) & ((1 << 63) - 1)

    @contextmanager
    def around(self, stage: int, microbatch: int, device: torch.device) -> Iterator[None]:
        """Run a forward of (stage, micro-batch) on `device` with its own random numbers (see the module doc)."""
        found = _generator(device)
        probe = stage not in self.draws
        if found is None or not (probe or self.draws[stage]):
            yield
            return
        key, gen = found
        with _lock(key):
            saved = gen.get_state()
            gen.manual_seed(self.seed_of(stage, microbatch))
            seeded = gen.get_state() if probe else None
            try:
                yield
                if seeded is not None:  # the lock is held: only this forward can have moved the generator
                    self.draws[stage] = not torch.equal(gen.get_state(), seeded)
            finally:
                gen.set_state(saved)


def partition_call(module: Callable[[Any], Any], stage: int, microbatch: int, device: torch.device,
                   streams: RandomStreams | None) -> Callable[[Any], Any]:
    """`module` as the forward of (stage, micro-batch): the first call is the forward, any later one a
    recomputation (`is_recomputing()`); with `streams`, every call draws from that pair's own seed."""
    calls = 0

    def run(x: Any) -> Any:
        nonlocal calls
        calls += 1
        rng = streams.around(stage, microbatch, device) if streams is not None else nullcontext()
        with recomputing(calls > 1), rng:
            return module(x)

    return run
