"""How fast gradients reduce over the data-parallel replicas: what the planner charges a REDUCE action.

The planner cannot guess this (threads of one process, gloo on loopback, NCCL over NVLink or a network
differ by orders of magnitude), so it is measured on the world the run uses: every data group all-reduces
a float32 buffer of about a stage's gradient size, and the slowest group's fastest repetition counts.
The result is a bandwidth in the units a ring all-reduce moves: 2 (D - 1) / D x bytes per second, so
that a stage's reduction is predicted as 2 (D - 1) / D x its gradient bytes / bandwidth.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

MIN_BYTES = 1 << 20  # smaller buffers measure the latency, not the bandwidth
MAX_BYTES = 64 << 20


def ring_factor(replicas: int) -> float:
    """The share of a buffer each rank sends (and receives) in a ring all-reduce of `replicas` ranks."""
    return 2.0 * (replicas - 1) / replicas if replicas > 1 else 0.0


def buffer_bytes(gradient_bytes: float, stages: int) -> int:
    """The buffer to time: about one stage's gradients (the model's / stages), within [1 MiB, 64 MiB]."""
    return int(min(MAX_BYTES, max(MIN_BYTES, gradient_bytes / max(stages, 1))))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reduce_seconds(world: Any, nbytes: int, repeats: int = 3) -> float:
    """Seconds one all-reduce of `nbytes` (float32) takes over the data groups of `world` (a
    `stagewise.runtime.world.World` with data_parallel > 1): the slowest group's fastest of `repeats`,
    after one warm-up. Every rank of the world must call it (it is a collective)."""
    groups = world.grid_groups()
    n = max(1, nbytes // 4)

    def timed(rank: int) -> float:
        data = groups.of_rank(world.grid, rank)[1]
        device = world.device(rank)
        buf = torch.zeros(n, device=device)
        world.all_reduce(rank, [buf], data)
        best = math.inf
        for _ in range(repeats):
            _sync(device)
            t0 = time.perf_counter()
            world.all_reduce(rank, [buf], data)
            _sync(device)
            best = min(best, time.perf_counter() - t0)
        return best

    return max(world.gather(world.run(timed, "measuring the data-parallel all-reduce")).values())


def reduce_bandwidth(world: Any, gradient_bytes: float) -> float:
    """Bytes per second the data groups of `world` reduce at, in ring units (see the module docstring)."""
    grid = world.grid
    nbytes = buffer_bytes(gradient_bytes, grid.pipeline)
    seconds = reduce_seconds(world, nbytes)
    return ring_factor(grid.data) * nbytes / seconds if seconds > 0 else math.inf


def _spawned(rank: int, world_size: int, replicas: int, gradient_bytes: float) -> float:
    from stagewise.runtime.world import DistWorld

    world = DistWorld(timeout=60.0, data=replicas)
    try:
        return reduce_bandwidth(world, gradient_bytes)
    finally:
        world.close()


def local_reduce_bandwidth(replicas: int, gradient_bytes: float, timeout: float = 120.0) -> float:
    """The reduction bandwidth of `replicas` gloo processes on this machine (what `stagewise plan --dp D` uses
    when no `--reduce-bandwidth` is given: ranks of one machine, as `stagewise run` starts them)."""
    from stagewise.runtime.launch import spawn

    return spawn(_spawned, replicas, args=(replicas, gradient_bytes), timeout=timeout)[0]
