"""Every schedule by name: its generator, a one-line summary, its default virtual_stages, whether it is asynchronous.

This is the one place a schedule's name is written down; the CLI's help, `Pipeline`'s
docstring and `stagewise simulate --list` read it from here.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass

from stagewise.schedules.actions import STEP, ScheduleError
from stagewise.schedules.asynchronous import pipedream, two_bw
from stagewise.schedules.breadth_first import looped_bfs
from stagewise.schedules.controllable_memory import v_half, v_min
from stagewise.schedules.dualpipe import dualpipev
from stagewise.schedules.flushing import gpipe, naive, one_f_one_b
from stagewise.schedules.interleaved import interleaved
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.zero_bubble import zb_h1, zb_h2, zbv


@dataclass(frozen=True)
class ScheduleInfo:
    """A registered schedule: `generator(devices, microbatches, virtual_stages, **options) -> Schedule`."""

    name: str
    generator: Callable[..., Schedule]
    summary: str
    default_virtual_stages: int = 1
    asynchronous: bool = False

    @property
    def options(self) -> tuple[str, ...]:
        """The keyword options the generator takes beyond (devices, microbatches, virtual_stages)."""
        params = list(inspect.signature(self.generator).parameters.values())[3:]
        return tuple(p.name for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD))


SCHEDULES: dict[str, ScheduleInfo] = {
    info.name: info
    for info in (
        ScheduleInfo("naive", naive, "inter-layer model parallelism: one micro-batch in the pipeline at a time"),
        ScheduleInfo("gpipe", gpipe, "GPipe: all forwards, then all backwards, then a flush"),
        ScheduleInfo("1f1b", one_f_one_b, "PipeDream-Flush: one forward, one backward; at most P-s micro-batches held"),
        ScheduleInfo("interleaved", interleaved, "Megatron interleaved 1F1B: v round-robin virtual stages per "
                                                 "device", 2),
        ScheduleInfo("looped-bfs", looped_bfs, "breadth-first: v round-robin virtual stages, every micro-batch "
                                               "through a "
                     "chunk before the next", 2),
        ScheduleInfo("zb-h1", zb_h1, "zero bubble H1: backward split into I and W, W fills the bubbles"),
        ScheduleInfo("zb-h2", zb_h2, "zero bubble H2: up to 2P-1 micro-batches in flight, no idle time inside a "
                     "device's span under F = I = W"),
        ScheduleInfo("zbv", zbv, "zero bubble V: two virtual stages per device in a V, split backward", 2),
        ScheduleInfo("v-half", v_half, "V-Half: V-shaped blocks, about 1/2 of 1F1B's activation memory", 2),
        ScheduleInfo("v-min", v_min, "V-Min: V-shaped blocks, about 1/3 of 1F1B's activation memory", 2),
        ScheduleInfo("dualpipev", dualpipev, "DualPipeV: two virtual stages in a V, forward and backward of two "
                     "micro-batches overlapped in one action", 2),
        ScheduleInfo("pipedream", pipedream, "PipeDream: asynchronous 1F1B, weight stashing, a step per micro-batch",
                     asynchronous=True),
        ScheduleInfo("2bw", two_bw, "PipeDream-2BW: asynchronous, two weight versions, a step per m micro-batches",
                     asynchronous=True),
    )
}

SYNCHRONOUS = tuple(n for n, i in SCHEDULES.items() if not i.asynchronous)


def names(asynchronous: bool | None = None) -> str:
    """The registered names as one comma-separated string (all, or only the (a)synchronous ones)."""
    return ", ".join(n for n, i in SCHEDULES.items() if asynchronous is None or i.asynchronous == asynchronous)


def info(name: str) -> ScheduleInfo:
    """The registry entry of `name`; ScheduleError naming the choices when there is none."""
    found = SCHEDULES.get(name)
    if found is None:
        raise ScheduleError(f"unknown schedule {name!r}; choose one of: {names()}")
    return found


def build(name: str, devices: int, microbatches: int, virtual_stages: int | None = None, **options) -> Schedule:
    """Generate schedule `name` for `devices` devices and `microbatches` micro-batches.

    `virtual_stages` defaults to the schedule's own (2 for the interleaved and V-shaped ones, else 1); `options`
    (such as `batches=` or `vertical_sync=` of the asynchronous generators) must be ones the
    generator takes, else a ScheduleError lists those it does take.
    """
    entry = info(name)
    unknown = sorted(set(options) - set(entry.options))
    if unknown:
        takes = ", ".join(entry.options) or "none"
        raise ScheduleError(f"schedule {name!r} takes no option {', '.join(map(repr, unknown))} (its options: {takes})")
    return entry.generator(devices, microbatches,
                           entry.default_virtual_stages if virtual_stages is None else virtual_stages, **options)


SCHEDULE_FILE_SUFFIXES = (".csv", ".txt")


def check_spec(spec: str | os.PathLike | Schedule) -> None:
    """Refuse an unknown schedule name at once (files and Schedule objects are checked by `resolve_schedule`)."""
    if isinstance(spec, str) and not spec.lower().endswith(SCHEDULE_FILE_SUFFIXES):
        info(spec)


def resolve_schedule(spec: str | os.PathLike | Schedule, devices: int, microbatches: int | None = None,
                     virtual_stages: int | None = None, data_parallel: int = 1,
                     recompute: str | int = "never", shard: str = "none",
                     **options) -> Schedule:
    """The schedule a user asked for, validated and lowered as `validate()` returns it.

    `spec` is a registered name (built for `devices` with `microbatches`, default 4, and
    `virtual_stages` and `options`, see `build`), the path of a schedule file ending in .csv or .txt
    (`files.load`), or a `Schedule`. A file or a Schedule must be written for `devices`
    devices, for `microbatches` micro-batches when given (left unset, its own count is used),
    and hold `virtual_stages` stages per device when given; it takes no options. With `data_parallel`
    > 1 it gets its gradient reductions (`with_reductions`), with `recompute` its
    recomputes (`with_recompute`), and with `shard` "full" or "gradients" the all-gathers and releases of
    its sharded parameters (`with_sharding`). Anything else, or any fault the validator finds, is a
    ScheduleError naming it.
    """
    from stagewise.schedules.recompute import with_recompute
    from stagewise.schedules.reduction import with_reductions
    from stagewise.schedules.sharding import MODES, with_sharding
    from stagewise.schedules.validate import validate

    if shard in MODES:  # around everything else: a stage's parameters are whole from its first to its last work
        return validate(with_sharding(resolve_schedule(spec, devices, microbatches, virtual_stages, data_parallel,
                                                       recompute, **options), shard))
    if recompute != "never":
        return validate(with_recompute(resolve_schedule(spec, devices, microbatches, virtual_stages, data_parallel,
                                                        **options), recompute))

    if data_parallel > 1:
        schedule = resolve_schedule(spec, devices, microbatches, virtual_stages, **options)
        steps = sum(a.op == STEP for a in schedule.programs[0])
        batches = schedule.microbatches // schedule.batch_microbatches
        if steps > batches:
            raise ScheduleError(f"schedule {schedule.name!r} takes an optimizer step after every micro-batch; data "
                                "parallelism reduces the gradients of whole batches over the replicas, so it needs a "
                                "schedule that steps once per batch (a synchronous one, or 2bw)")
        return validate(with_reductions(schedule))

    if isinstance(spec, Schedule):
        schedule, source = spec, f"schedule {spec.name!r}"
    elif isinstance(spec, os.PathLike) or (isinstance(spec, str) and spec.lower().endswith(SCHEDULE_FILE_SUFFIXES)):
        from stagewise.schedules.files import load

        schedule, source = load(spec), f"schedule file {os.fspath(spec)}"
    elif isinstance(spec, str):
        return validate(build(spec, devices, 4 if microbatches is None else microbatches, virtual_stages, **options))
    else:
        raise ScheduleError(f"a schedule is a name ({names()}), a .csv/.txt file or a Schedule, got {spec!r}")
    if options:
        raise ScheduleError(f"{source} takes no options (got {', '.join(sorted(options))})")
    if schedule.num_devices != devices:
        raise ScheduleError(f"{source} is written for {schedule.num_devices} devices, but this pipeline has {devices}")
    if microbatches is not None and microbatches != schedule.microbatches:
        raise ScheduleError(f"{source} runs {schedule.microbatches} micro-batches, not microbatches={microbatches}; "
                            "leave microbatches unset with a Schedule object or a file")
    if virtual_stages is not None and virtual_stages != schedule.virtual_stages:
        raise ScheduleError(f"{source} holds {schedule.virtual_stages} virtual stages per device, not "
                            f"virtual_stages={virtual_stages}")
    return validate(schedule)
