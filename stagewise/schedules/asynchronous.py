"""Asynchronous 1F1B without flush: PipeDream (weight stashing) and PipeDream-2BW.

Versions live in the actions: F and B name the weight version they use, STEP names the
version it creates, so the runtime only has to keep the versions the list mentions.
"""

from __future__ import annotations

from stagewise.schedules.actions import STEP, Action, B, F, Schedule, ScheduleError
from stagewise.schedules.placement import check_args, plain
from stagewise.schedules.simple import one_f_one_b_order


def pipedream(devices: int, microbatches: int, chunks: int = 1, *, batches: int = 1,
              vertical_sync: bool = False) -> Schedule:
    """PipeDream: 1F1B over `microbatches * batches` micro-batches, an optimizer step after every backward.

    A micro-batch's backward uses the version its forward used (weight stashing). With
    `vertical_sync`, a micro-batch uses on every stage the version that was current on
    stage 0 when it entered; each step still updates the newest version.
    """
    check_args("pipedream", devices, microbatches, chunks)
    _check_async("pipedream", chunks, batches)
    P, total = devices, microbatches * batches
    w0 = min(P - 1, total)
    lists = []
    for d in range(P):
        current, used, acts = 0, {}, []
        for op, n in one_f_one_b_order(d, P, total):
            if op == F:
                used[n] = max(0, n - w0) if vertical_sync else current
                acts.append(Action(F, d, n, used[n]))
            else:
                acts.append(Action(B, d, n, used.pop(n)))
                current += 1
                acts.append(Action(STEP, d, -1, current))
        lists.append(tuple(acts))
    name = "pipedream-vs" if vertical_sync else "pipedream"
    return Schedule(name, P, total, plain(P), tuple(lists), asynchronous=True, per_batch=microbatches)


def two_bw(devices: int, microbatches: int, chunks: int = 1, *, batches: int = 1) -> Schedule:
    """PipeDream-2BW: 1F1B with gradients accumulated over each batch of m micro-batches.

    Batch t's forwards and backwards use version max(t-1, 0); the step after its last
    backward creates version t+1, so W(t+1) = W(t) - lr * grad(W(t-1)) and at most two
    versions are ever held.
    """
    check_args("2bw", devices, microbatches, chunks)
    _check_async("2bw", chunks, batches)
    P, m, total = devices, microbatches, microbatches * batches
    lists = []
    for d in range(P):
        acts = []
        for op, n in one_f_one_b_order(d, P, total, warmup=min(P - d - 1, m, total)):
            t = n // m
            acts.append(Action(op, d, n, max(t - 1, 0)))
            if op == B and n % m == m - 1:
                acts.append(Action(STEP, d, -1, t + 1))
        lists.append(tuple(acts))
    return Schedule("2bw", P, total, plain(P), tuple(lists), asynchronous=True, per_batch=m)


def _check_async(name: str, chunks: int, batches: int) -> None:
    if chunks != 1:
        raise ScheduleError(f"{name}: holds one stage per device, so chunks must be 1 (got {chunks})")
    if not isinstance(batches, int) or batches < 1:
        raise ScheduleError(f"{name}: batches must be an integer >= 1, got {batches!r}")
