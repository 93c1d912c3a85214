"""How fast the run's ranks talk: what the planner charges a message between stages and a gradient reduction.

The planner cannot guess these (threads of one process, gloo on loopback, NCCL over NVLink or a network
differ by orders of magnitude), so they are measured on the world the run uses, with its own collectives:

- **Between stages**: two neighbouring pipeline ranks all-reduce a one-element tensor and a buffer of about
  one message's size, the fastest of a few repetitions each. A two-rank all-reduce is two exchanges (reduce-
  scatter, all-gather) of half the buffer each, so the latency is half the small one's time and the bandwidth
  the buffer's bytes / (large - small). A message of b bytes is then predicted at latency + b / bandwidth.
- **Gradient reduction**: every data group all-reduces a float32 buffer of about a stage's gradient size;
  the slowest group's fastest repetition counts, as a bandwidth in the units a ring all-reduce moves, 2 (D - 1)
  / D x bytes per second, so that a stage's reduction is predicted as 2 (D - 1) / D x its gradient bytes /
  bandwidth.

`local_links` measures the same with gloo processes on this machine's CPU (`stagewise plan` without a world): it
starts processes, so only the command line calls it; `Pipeline` measures on its own world or not at all.

The planner charges messages only where they run beside the compute (GPUs: NCCL has its own engines), or
when asked: on CPU ranks a message costs the cores' time on both ends, which a link delay does not
represent, and measured that way it made the planner prefer many small micro-batches that measured slowest
(docs/partitioning.md).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from stagewise.measure.timing import sync
from stagewise.partition.cost_model import ring_factor

MIN_BYTES = 1 << 20  # smaller buffers measure the latency, not the bandwidth
MAX_BYTES = 64 << 20
REPEATS = 5


@dataclass(frozen=True)
class Links:
    """Measured link speeds: `latency` (s) and `bandwidth` (bytes/s) of a message between pipeline devices
    (0 and inf with one device), `reduce_bandwidth` (bytes/s, ring units; inf with one replica)."""

    latency: float = 0.0
    bandwidth: float = math.inf
    reduce_bandwidth: float = math.inf


def buffer_bytes(nbytes: float) -> int:
    """A buffer of about `nbytes`, within [1 MiB, 64 MiB]."""
    return int(min(MAX_BYTES, max(MIN_BYTES, nbytes)))


def _fastest(world: Any, rank: int, group: Any, numel: int) -> float:
    """The fastest of REPEATS all-reduces of `numel` float32 values over `group`, after one warm-up."""
    device = world.device(rank)
    buf = torch.zeros(numel, device=device)
    world.all_reduce(rank, [buf], group)
    best = math.inf
    for _ in range(REPEATS):
        sync(device)
        t0 = time.perf_counter()
        world.all_reduce(rank, [buf], group)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def measure_links(world: Any, message_bytes: float, stage_gradient_bytes: float, messages: bool = True,
                  reductions: bool = True) -> Links:
    """The link speeds of `world` (a `stagewise.runtime.world.World`): with `messages`, messages of about
    `message_bytes` between pipeline devices 0 and 1 of replica 0; with `reductions`, reductions of about
    `stage_gradient_bytes` (one stage's gradients) over every data group (what is not measured, or cannot be,
    stays free). Every rank of the world must call it with the same arguments (it is a collective)."""
    grid = world.grid
    pair = world.group([grid.rank(0, 0), grid.rank(1, 0)]) if messages and grid.pipeline > 1 else None
    groups = world.grid_groups() if reductions and grid.data > 1 else None
    message = buffer_bytes(message_bytes) // 4
    reduce = buffer_bytes(stage_gradient_bytes) // 4

    def timed(rank: int) -> tuple[float, float, float]:
        small = large = reduced = math.nan
        if pair is not None and rank in pair.index:
            small, large = _fastest(world, rank, pair, 1), _fastest(world, rank, pair, message)
        if groups is not None:
            reduced = _fastest(world, rank, groups.of_rank(grid, rank)[1], reduce)
        return small, large, reduced

    if pair is None and groups is None:
        return Links()
    times = list(world.gather(world.run(timed, "measuring the links between ranks")).values())
    links = Links()
    if pair is not None:
        small = max(t[0] for t in times if not math.isnan(t[0]))
        large = max(t[1] for t in times if not math.isnan(t[1]))
        links = Links(small / 2, 4 * message / (large - small) if large > small else math.inf)
    if groups is not None:
        seconds = max(t[2] for t in times)
        links = Links(links.latency, links.bandwidth,
                      ring_factor(grid.data) * 4 * reduce / seconds if seconds > 0 else math.inf)
    return links


def _spawned(rank: int, world_size: int, devices: int, replicas: int, message_bytes: float,
             stage_gradient_bytes: float) -> Links:
    from stagewise.runtime.processes import DistWorld

    world = DistWorld(timeout=60.0, backend="gloo", data=replicas, device="cpu")
    try:
        return measure_links(world, message_bytes, stage_gradient_bytes)
    finally:
        world.close()


def local_links(devices: int, replicas: int, message_bytes: float, stage_gradient_bytes: float,
                timeout: float = 120.0) -> Links:
    """The link speeds of min(devices, 2) x `replicas` gloo processes on this machine (ranks of one machine, as
    `stagewise run` starts them): what `stagewise plan` uses unless given `--latency`/`--bandwidth`/
    `--reduce-bandwidth`. Nothing is started when there is nothing to measure (one device, one replica)."""
    from stagewise.runtime.launch import spawn

    pipeline = min(devices, 2)
    if pipeline * replicas == 1:
        return Links()
    try:
        return spawn(_spawned, pipeline * replicas, args=(pipeline, replicas, message_bytes, stage_gradient_bytes),
                     timeout=timeout)[0]
    except RuntimeError as err:
        raise RuntimeError(f"measuring the links with {pipeline * replicas} gloo processes on this machine failed "
                           "(give --latency and --bandwidth, or --reduce-bandwidth with --dp, to skip the "
                           f"measurement):\n{err}") from err
