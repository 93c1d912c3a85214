"""Breadth-first pipeline parallelism (Lamy-Poirier 2022; torch's `ScheduleLoopedBFS`)."""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import B, F, ScheduleError
from stagewise.schedules.placement import check_args, round_robin
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule


def looped_bfs(devices: int, microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Looped breadth-first: `virtual_stages` stages per device placed round-robin (as interleaved),
    run a virtual stage at a time.

    Device d runs the forwards of every micro-batch through its first chunk (stage d), then
    through its second (stage P + d), and so on; then the backwards chunk by chunk in reverse,
    the latest micro-batch first (the order `torch.distributed.pipelining` runs). A device
    holds every micro-batch of every chunk before its first backward: m whole-stage
    micro-batches, GPipe's memory, for a bubble like the interleaved schedule's once m >= P.
    Any m works.
    """
    check_args("looped-bfs", devices, microbatches, virtual_stages)
    if virtual_stages < 2:
        raise ScheduleError(f"looped-bfs: needs virtual_stages >= 2 virtual stages per device (got {virtual_stages}); "
                            "use 'gpipe' for one")
    P, m, v = devices, microbatches, virtual_stages
    chunk = np.arange(v)
    n = np.arange(m)
    rows = []
    for d in range(P):
        f_stage = np.repeat(chunk * P + d, m)
        b_stage = np.repeat(chunk[::-1] * P + d, m)
        stage = np.r_[f_stage, b_stage]
        op = np.r_[np.full(v * m, OP_CODE[F]), np.full(v * m, OP_CODE[B])]
        mb = np.r_[np.tile(n, v), np.tile(n[::-1], v)]
        rows.append((np.full(len(op), d), op, stage, mb))
    dev, op, stage, mb = (np.concatenate(c) for c in zip(*rows))
    return Schedule("looped-bfs", P, m, round_robin(P, v), Programs.flushed(P, dev, op, stage, mb))
