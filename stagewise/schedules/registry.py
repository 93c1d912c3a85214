"""Every schedule by name, with a one-line description."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stagewise.schedules.actions import Schedule, ScheduleError
from stagewise.schedules.asynchronous import pipedream, two_bw
from stagewise.schedules.interleaved import interleaved
from stagewise.schedules.simple import gpipe, naive, one_f_one_b
from stagewise.schedules.zero_bubble import zb_h1, zbv


@dataclass(frozen=True)
class ScheduleInfo:
    name: str
    generator: Callable[..., Schedule]
    summary: str
    default_chunks: int = 1
    asynchronous: bool = False


SCHEDULES: dict[str, ScheduleInfo] = {
    info.name: info
    for info in (
        ScheduleInfo("naive", naive, "inter-layer model parallelism: one micro-batch in the pipeline at a time"),
        ScheduleInfo("gpipe", gpipe, "GPipe: all forwards, then all backwards, then a flush"),
        ScheduleInfo("1f1b", one_f_one_b, "PipeDream-Flush: one forward, one backward; at most P-s micro-batches held"),
        ScheduleInfo("interleaved", interleaved, "Megatron interleaved 1F1B: v round-robin chunks per device", 2),
        ScheduleInfo("zb-h1", zb_h1, "zero bubble H1: backward split into I and W, W fills the bubbles"),
        ScheduleInfo("zbv", zbv, "zero bubble V: two chunks per device in a V, split backward", 2),
        ScheduleInfo("pipedream", pipedream, "PipeDream: asynchronous 1F1B, weight stashing, a step per micro-batch",
                     asynchronous=True),
        ScheduleInfo("2bw", two_bw, "PipeDream-2BW: asynchronous, two weight versions, a step per m micro-batches",
                     asynchronous=True),
    )
}

SYNCHRONOUS = tuple(n for n, i in SCHEDULES.items() if not i.asynchronous)


def build(name: str, devices: int, microbatches: int, chunks: int | None = None, **options) -> Schedule:
    """Generate schedule `name` for `devices` devices and `microbatches` micro-batches.

    `chunks` defaults to the schedule's own (2 for interleaved and zbv, else 1); options
    such as `batches=` or `vertical_sync=` go to the asynchronous generators.
    """
    info = SCHEDULES.get(name)
    if info is None:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of: {', '.join(SCHEDULES)}")
    return info.generator(devices, microbatches, info.default_chunks if chunks is None else chunks, **options)
