"""The activation-checkpointing pass: which forwards keep their activations, and where the others recompute.

A forward that does not keep its activations keeps only its stage's input; a RECOMPUTE action
right before that micro-batch's backward (B, or I when the backward is split, so that W reuses
what I rebuilt) runs the forward again. Because the choice is in the action lists, the
simulator times the recompute (`Costs(recompute=)`, the forward's cost by default), the memory
model counts what each forward keeps, and the timelines draw it (`C`).

Modes:
- "never": every forward keeps its activations.
- "always": no forward does.
- "except_last": a forward keeps them when its backward comes right after it on its device (the
  next compute action there is that micro-batch's B or I): torchgpipe's "all micro-batches but
  the last" under GPipe, and under 1F1B every forward of the last stage plus the last forward
  before each backward that follows at once. What holds activations longest is recomputed.
- an integer N: every forward recomputes (as "always"); inside the stage each group of N layers
  is checkpointed on its own (DeepSpeed's `activation_checkpoint_interval`; see `Stage`).

`recompute_microbatches` chooses by micro-batch instead: `GPipe`'s torchgpipe modes recompute
micro-batches [0, m) ("always"), [0, m - 1) ("except_last": torchgpipe's backward runs the last
micro-batch first, right after its forward) or none, on every stage.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import replace

from stagewise.schedules.actions import OVERLAP_F_B, RECOMPUTE, Action, B, F, I, ScheduleError
from stagewise.schedules.schedule import Schedule

MODES = ("never", "except_last", "always")
CHECKPOINT_MODES = ("always", "except_last", "never")  # torchgpipe's `checkpoint=` (GPipe)
_WORK = (F, B, I, "W", OVERLAP_F_B)


def check_mode(mode: str | int) -> str | int:
    """`mode` if it is one of MODES or an integer >= 1; a ValueError saying what is allowed otherwise."""
    if isinstance(mode, bool) or not (mode in MODES or (isinstance(mode, int) and mode >= 1)):
        raise ValueError(f"recompute must be one of {', '.join(MODES)} or a number of layers >= 1 per "
                         f"checkpointed group, got {mode!r}")
    return mode


def with_recompute(schedule: Schedule, mode: str | int) -> Schedule:
    """`schedule` with a RECOMPUTE before the backward of every forward that `mode` does not let keep its
    activations (unchanged for "never" or when it already has recomputes)."""
    check_mode(mode)
    if mode == "never" or _has_recomputes(schedule):
        return schedule
    return _insert(schedule, [_dropped(prog, mode) for prog in schedule.programs])


def recompute_microbatches(schedule: Schedule, microbatches: Iterable[int]) -> Schedule:
    """`schedule` with a RECOMPUTE before the backward of every forward of the given micro-batches, on every
    stage (torchgpipe's `checkpoint=` modes choose micro-batches); unchanged when it already has recomputes."""
    chosen = set(microbatches)
    if not chosen or _has_recomputes(schedule):
        return schedule
    return _insert(schedule, [{(a.stage, a.microbatch) for a in prog if a.op == F and a.microbatch in chosen}
                              for prog in schedule.programs])


def checkpointed(mode: str, microbatches: int) -> range:
    """The micro-batches torchgpipe's `checkpoint=` mode recomputes: all ("always"), all but the last
    ("except_last"), none ("never")."""
    if mode not in CHECKPOINT_MODES:
        raise ValueError(f"checkpoint must be one of {', '.join(map(repr, CHECKPOINT_MODES))}, got {mode!r}")
    return range({"always": microbatches, "except_last": microbatches - 1, "never": 0}[mode])


def _has_recomputes(schedule: Schedule) -> bool:
    return any(a.op == RECOMPUTE for prog in schedule.programs for a in prog)


def _dropped(prog: Sequence[Action], mode: str | int) -> set[tuple[int, int]]:
    """The (stage, micro-batch) forwards of one device's list that `mode` does not let keep their activations."""
    work = [i for i, a in enumerate(prog) if a.op in _WORK]
    drop: set[tuple[int, int]] = set()
    for k, i in enumerate(work):
        a = prog[i]
        if a.op != F:
            continue
        if mode == "except_last":
            nxt = prog[work[k + 1]] if k + 1 < len(work) else None
            if nxt is not None and nxt.op in (B, I) and (nxt.stage, nxt.microbatch) == (a.stage, a.microbatch):
                continue
        drop.add((a.stage, a.microbatch))
    return drop


def _insert(schedule: Schedule, drops: list[set[tuple[int, int]]]) -> Schedule:
    """`schedule` with a RECOMPUTE right before the backward (B, or I) of every (stage, micro-batch) in the
    device's set of `drops`."""
    out: list[list[Action]] = []
    for prog, drop in zip(schedule.programs, drops):
        drop = set(drop)
        new: list[Action] = []
        for i, a in enumerate(prog):
            key = (a.stage, a.microbatch)
            if a.op in (B, I) and key in drop:
                # a member of an overlapped pair: recompute before the pair, which must stay whole
                at = len(new) - (2 if i >= 2 and prog[i - 2].op == OVERLAP_F_B else
                                 1 if i >= 1 and prog[i - 1].op == OVERLAP_F_B else 0)
                if at < len(new) and new[at].op != OVERLAP_F_B:
                    raise ScheduleError(f"{schedule.name}: cannot place the recompute of {a}")
                new.insert(at, Action(RECOMPUTE, a.stage, a.microbatch, a.version))
                drop.discard(key)
            new.append(a)
        out.append(new)
    return replace(schedule, programs=out)
