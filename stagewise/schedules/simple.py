"""The flush schedules with one stage per device: naive, GPipe and 1F1B (PipeDream-Flush)."""

from __future__ import annotations

from stagewise.schedules.actions import STEP, Action, B, F, Schedule, ScheduleError
from stagewise.schedules.placement import check_args, plain


def _finish(name: str, devices: int, m: int, lists: list[list[Action]]) -> Schedule:
    for d, acts in enumerate(lists):
        acts.append(Action(STEP, d, -1, 1))
    return Schedule(name, devices, m, plain(devices), tuple(tuple(a) for a in lists))


def naive(devices: int, microbatches: int, chunks: int = 1) -> Schedule:
    """Inter-layer model parallelism: one micro-batch travels the whole pipeline at a time."""
    check_args("naive", devices, microbatches, chunks)
    _one_chunk("naive", chunks)
    lists = [[a for n in range(microbatches) for a in (Action(F, d, n), Action(B, d, n))] for d in range(devices)]
    return _finish("naive", devices, microbatches, lists)


def gpipe(devices: int, microbatches: int, chunks: int = 1) -> Schedule:
    """GPipe: every forward, then every backward, then the flush (optimizer step)."""
    check_args("gpipe", devices, microbatches, chunks)
    _one_chunk("gpipe", chunks)
    m = microbatches
    lists = [[Action(F, d, n) for n in range(m)] + [Action(B, d, n) for n in range(m)] for d in range(devices)]
    return _finish("gpipe", devices, m, lists)


def one_f_one_b(devices: int, microbatches: int, chunks: int = 1) -> Schedule:
    """1F1B / PipeDream-Flush: min(P-s-1, m) warm-up forwards, then one forward, one backward."""
    check_args("1f1b", devices, microbatches, chunks)
    _one_chunk("1f1b", chunks)
    lists = [one_f_one_b_order(d, devices, microbatches) for d in range(devices)]
    programs = [[Action(op, d, n) for op, n in order] for d, order in enumerate(lists)]
    return _finish("1f1b", devices, microbatches, programs)


def one_f_one_b_order(device: int, devices: int, m: int, warmup: int | None = None) -> list[tuple[str, int]]:
    """The (op, micro-batch) order of 1F1B on one device, shared with the asynchronous schedules."""
    w = min(devices - device - 1, m) if warmup is None else warmup
    order = [(F, n) for n in range(w)]
    for n in range(w, m):
        order += [(F, n), (B, n - w)]
    order += [(B, n) for n in range(m - w, m)]
    return order


def _one_chunk(name: str, chunks: int) -> None:
    if chunks != 1:
        raise ScheduleError(f"{name}: holds one stage per device, so chunks must be 1 (got {chunks}); "
                            "use 'interleaved' or 'zbv' for several chunks per device")
