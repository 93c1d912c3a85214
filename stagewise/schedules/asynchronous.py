"""Asynchronous 1F1B without flush: PipeDream (weight stashing) and PipeDream-2BW.

Versions live in the actions: F and B name the weight version they use, STEP names the
version it creates, so the runtime only has to keep the versions the list mentions.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import STEP, B, F, ScheduleError
from stagewise.schedules.flushing import one_f_one_b_order
from stagewise.schedules.placement import check_args, plain
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule


def pipedream(devices: int, microbatches: int, virtual_stages: int = 1, *, batches: int = 1,
              vertical_sync: bool = False) -> Schedule:
    """PipeDream: 1F1B over `microbatches * batches` micro-batches, an optimizer step after every backward.

    A micro-batch's backward uses the version its forward used (weight stashing). With
    `vertical_sync`, a micro-batch uses on every stage the version that was current on
    stage 0 when it entered; each step still updates the newest version.
    """
    check_args("pipedream", devices, microbatches, virtual_stages)
    _check_async("pipedream", virtual_stages, batches)
    P, total = devices, microbatches * batches
    w0 = min(P - 1, total)
    rows = []
    for d in range(P):
        backward, mbs = one_f_one_b_order(d, P, total)
        steps_before = np.cumsum(backward) - backward  # optimizer steps this device ran before each action
        used = np.zeros(total, dtype=np.int64)
        fw = ~backward
        used[mbs[fw]] = np.maximum(0, mbs[fw] - w0) if vertical_sync else steps_before[fw]
        version = used[mbs]
        # each backward is followed by the step that creates version (backwards so far)
        step_version = np.cumsum(backward)
        rows.append(_with_steps(d, backward, mbs, version, backward, step_version))
    name = "pipedream-vs" if vertical_sync else "pipedream"
    return Schedule(name, P, total, plain(P), _programs(P, rows), asynchronous=True, per_batch=microbatches)


def two_bw(devices: int, microbatches: int, virtual_stages: int = 1, *, batches: int = 1) -> Schedule:
    """PipeDream-2BW: 1F1B with gradients accumulated over each batch of m micro-batches.

    Batch t's forwards and backwards use version max(t-1, 0); the step after its last
    backward creates version t+1, so W(t+1) = W(t) - lr * grad(W(t-1)) and at most two
    versions are ever held.
    """
    check_args("2bw", devices, microbatches, virtual_stages)
    _check_async("2bw", virtual_stages, batches)
    P, m, total = devices, microbatches, microbatches * batches
    rows = []
    for d in range(P):
        backward, mbs = one_f_one_b_order(d, P, total, warmup=min(P - d - 1, m, total))
        t = mbs // m
        steps = backward & (mbs % m == m - 1)
        rows.append(_with_steps(d, backward, mbs, np.maximum(t - 1, 0), steps, t + 1))
    return Schedule("2bw", P, total, plain(P), _programs(P, rows), asynchronous=True, per_batch=m)


def _with_steps(d: int, backward: np.ndarray, mbs: np.ndarray, version: np.ndarray, step_after: np.ndarray,
                step_version: np.ndarray) -> tuple[np.ndarray, ...]:
    """One device's rows with a STEP (creating `step_version`) right after each marked action."""
    n = len(mbs)
    pos = np.arange(n) + np.cumsum(step_after) - step_after  # where each action lands
    total = n + int(step_after.sum())
    op = np.full(total, OP_CODE[STEP], dtype=np.int64)
    mb = np.full(total, -1, dtype=np.int64)
    ver = np.zeros(total, dtype=np.int64)
    op[pos] = np.where(backward, OP_CODE[B], OP_CODE[F])
    mb[pos] = mbs
    ver[pos] = version
    ver[pos[step_after] + 1] = step_version[step_after]
    return np.full(total, d, dtype=np.int64), op, np.full(total, d, dtype=np.int64), mb, ver


def _programs(P: int, rows: list[tuple[np.ndarray, ...]]) -> Programs:
    dev, op, st, mb, ver = (np.concatenate(c) for c in zip(*rows))
    return Programs.from_rows(P, dev, op, st, mb, ver)


def _check_async(name: str, virtual_stages: int, batches: int) -> None:
    if virtual_stages != 1:
        raise ScheduleError(f"{name}: holds one stage per device, so virtual_stages must be 1 (got {virtual_stages})")
    if not isinstance(batches, int) or batches < 1:
        raise ScheduleError(f"{name}: batches must be an integer >= 1, got {batches!r}")
