"""The flush schedules with one stage per device: naive, GPipe and 1F1B (PipeDream-Flush)."""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import B, F, ScheduleError
from stagewise.schedules.placement import check_args, plain
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule

_F, _B = OP_CODE[F], OP_CODE[B]


def _finish(name: str, devices: int, m: int, orders: list[tuple[np.ndarray, np.ndarray]]) -> Schedule:
    """Per-device (op codes, micro-batches) of one stage each, then the step (creating version 1)."""
    dev = np.concatenate([np.full(len(ops), d, dtype=np.int64) for d, (ops, _) in enumerate(orders)])
    op = np.concatenate([np.asarray(ops, dtype=np.int64) for ops, _ in orders])
    mb = np.concatenate([np.asarray(mbs, dtype=np.int64) for _, mbs in orders])
    return Schedule(name, devices, m, plain(devices), Programs.flushed(devices, dev, op, dev, mb))


def naive(devices: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """Inter-layer model parallelism: one micro-batch travels the whole pipeline at a time."""
    check_args("naive", devices, microbatches, virtual_stages)
    _one_chunk("naive", virtual_stages)
    m = microbatches
    order = (np.tile([_F, _B], m), np.repeat(np.arange(m), 2))
    return _finish("naive", devices, m, [order] * devices)


def gpipe(devices: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """GPipe: every forward, then every backward, then the flush (optimizer step)."""
    check_args("gpipe", devices, microbatches, virtual_stages)
    _one_chunk("gpipe", virtual_stages)
    m = microbatches
    order = (np.repeat([_F, _B], m), np.tile(np.arange(m), 2))
    return _finish("gpipe", devices, m, [order] * devices)


def one_f_one_b(devices: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """1F1B / PipeDream-Flush: min(P-s-1, m) warm-up forwards, then one forward, one backward."""
    check_args("1f1b", devices, microbatches, virtual_stages)
    _one_chunk("1f1b", virtual_stages)
    orders = []
    for d in range(devices):
        backward, mbs = one_f_one_b_order(d, devices, microbatches)
        orders.append((np.where(backward, _B, _F), mbs))
    return _finish("1f1b", devices, microbatches, orders)


def one_f_one_b_order(device: int, devices: int, m: int, warmup: int | None = None
                      ) -> tuple[np.ndarray, np.ndarray]:
    """1F1B on one device as (is backward, micro-batch) arrays; shared with the asynchronous schedules.

    `warmup` forwards (default min(P-d-1, m)), then forward n and backward n - warmup, then the rest.
    """
    w = min(devices - device - 1, m) if warmup is None else warmup
    steady = m - w
    backward = np.r_[np.zeros(w, dtype=bool), np.tile([False, True], steady), np.ones(w, dtype=bool)]
    pairs = np.stack([np.arange(w, m), np.arange(0, steady)], axis=1).ravel()
    mbs = np.r_[np.arange(w), pairs, np.arange(steady, m)]
    return backward, mbs.astype(np.int64)


def _one_chunk(name: str, virtual_stages: int) -> None:
    if virtual_stages != 1:
        raise ScheduleError(f"{name}: holds one stage per device, so virtual_stages must be 1 (got {virtual_stages}); "
                            "use 'interleaved' or 'zbv' for several virtual_stages per device")
