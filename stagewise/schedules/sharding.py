"""The sharding lowering pass: UNSHARD (all-gather) and RESHARD (release) actions around each stage's work.

With `shard="full"` or `"gradients"` (see `stagewise.runtime.sharding`) every stage's parameters live split
over its D data-parallel replicas (FSDP2). A stage needs them whole to compute; when is in the action lists,
as REDUCE's placement is (`with_reductions`), so the validator checks it, the simulator times it
(`Costs.unshard`), the timelines draw it (`U` and `X`) and the planner counts the memory it holds.

- "full" (ZeRO-3): UNSHARD(s) before stage s's first forward of the step, moved one compute action earlier so
  that the all-gather runs while the device computes that action (a prefetch), and RESHARD(s) right after
  REDUCE(s), which follows s's last backward piece (B, or W when the backward is split): whole parameters are
  held from the stage's first forward to its last backward, sharded between steps.
- "gradients" (ZeRO-2): the parameters stay whole between steps; after the optimizer step (which updates the
  shards) RESHARD(s) drops the stale whole copy and UNSHARD(s) gathers the new one.

Both start and end a program in the same state, so the program can run again (validated by `check_sharding`).
"""

from __future__ import annotations

from dataclasses import replace

from stagewise.schedules.actions import (
    OVERLAP_F_B,
    RECOMPUTE,
    REDUCE,
    RESHARD,
    STEP,
    UNSHARD,
    Action,
    B,
    F,
    I,
    ScheduleError,
    W,
)
from stagewise.schedules.schedule import Schedule

MODES = ("full", "gradients")  # the modes whose parameters are sharded (FSDP2); "none"/"optimizer" need no pass
_WORK = (F, B, I, W, RECOMPUTE)  # what needs a stage's whole parameters
_ROW = (F, B, I, W, RECOMPUTE, OVERLAP_F_B)  # compute rows a prefetch can hide behind


def with_sharding(schedule: Schedule, mode: str) -> Schedule:
    """`schedule` with its UNSHARD/RESHARD actions for `mode` ("full" or "gradients"; any other mode, or a
    schedule that has them already, is returned unchanged). Works on lowered schedules without changing the
    message order; an asynchronous schedule (several weight versions) is refused."""
    if mode not in MODES or any(a.op in (UNSHARD, RESHARD) for prog in schedule.programs for a in prog):
        return schedule
    if schedule.asynchronous:
        raise ScheduleError(f"schedule {schedule.name!r} keeps several weight versions per stage, which sharded "
                            f"parameters (shard={mode!r}) cannot hold; use a synchronous schedule or shard='none'")
    place = _full if mode == "full" else _gradients
    return replace(schedule, programs=[place(list(prog)) for prog in schedule.programs])


def _windows(prog: list[Action]) -> list[tuple[int, int]]:
    """(start, end) of each stretch between two optimizer steps (end: the STEP's index, or len(prog))."""
    steps = [i for i, a in enumerate(prog) if a.op == STEP]
    starts = [0] + [i + 1 for i in steps]
    return list(zip(starts, steps + [len(prog)]))


def _full(prog: list[Action]) -> list[Action]:
    before: dict[int, list[Action]] = {}
    after: dict[int, list[Action]] = {}
    pair_of = {k: i for i, a in enumerate(prog) if a.op == OVERLAP_F_B for k in (i + 1, i + 2)}  # member -> pair
    for start, end in _windows(prog):
        rows = [i for i in range(start, end) if prog[i].op in _ROW and i not in pair_of]
        first: dict[int, int] = {}  # stage -> the row (a pair's own row for a member) of its first work
        last: dict[int, int] = {}  # stage -> the index after which it is released
        for i in range(start, end):
            a = prog[i]
            if a.op in _WORK:
                first.setdefault(a.stage, pair_of.get(i, i))  # a pair's member: the pair's row
                last[a.stage] = i
            elif a.op == REDUCE and a.stage in last:
                last[a.stage] = i
        for s, row in sorted(first.items(), key=lambda kv: kv[1]):
            k = rows.index(row)
            at = rows[k - 1] if k > 0 else start  # one compute row earlier: its all-gather runs meanwhile
            before.setdefault(at, []).append(Action(UNSHARD, s))
        for s, i in sorted(last.items(), key=lambda kv: kv[1]):
            after.setdefault(i, []).append(Action(RESHARD, s))
    return _splice(prog, before, after)


def _gradients(prog: list[Action]) -> list[Action]:
    after: dict[int, list[Action]] = {}
    for start, end in _windows(prog):
        stages = sorted({a.stage for a in prog[start:end] if a.op in _WORK})
        at = end if end < len(prog) else len(prog) - 1  # after the STEP (a program without one: at its end)
        for s in stages:
            after.setdefault(at, []).extend([Action(RESHARD, s), Action(UNSHARD, s)])
    return _splice(prog, {}, after)


def _splice(prog: list[Action], before: dict[int, list[Action]], after: dict[int, list[Action]]) -> list[Action]:
    out: list[Action] = []
    for i, a in enumerate(prog):
        out.extend(before.get(i, ()))
        out.append(a)
        out.extend(after.get(i, ()))
    return out


def check_sharding(sc: Schedule, fail) -> None:
    """When a schedule has UNSHARD/RESHARD actions: on every device each stage computes (F, B, I, W, RECOMPUTE)
    only while whole (after an UNSHARD, before its RESHARD), is gathered only when sharded and released only when
    whole, reduces its gradients (REDUCE) while whole, and ends its program in the state it started it in (the
    state before its first UNSHARD or RESHARD), so that the program can run again. `fail(d, i, a, why)` makes
    the error."""
    if not any(a.op in (UNSHARD, RESHARD) for prog in sc.programs for a in prog):
        return
    for d, prog in enumerate(sc.programs):
        first_op = {}
        for a in prog:
            if a.op in (UNSHARD, RESHARD):
                first_op.setdefault(a.stage, a.op)
        whole = {s: first_op.get(s) == RESHARD for s in sc.stages_of(d)}
        start = dict(whole)
        since: dict[int, int] = {}
        for i, a in enumerate(prog):
            s = a.stage
            if a.op == UNSHARD:
                if whole[s]:
                    raise fail(d, i, a, f"gathers stage {s}, which is whole already (since #{since.get(s, 0)})")
                whole[s], since[s] = True, i
            elif a.op == RESHARD:
                if not whole[s]:
                    raise fail(d, i, a, f"releases stage {s}, which is sharded (no UNSHARD before it)")
                whole[s], since[s] = False, i
            elif a.op in _WORK or a.op == REDUCE:
                if s not in first_op:
                    raise fail(d, i, a, f"stage {s} has no UNSHARD/RESHARD actions while the others of this "
                               "schedule have: its sharded parameters are never gathered")
                if not whole[s]:
                    when = f"released at #{since[s]}" if s in since else "gathered only later"
                    raise fail(d, i, a, f"needs stage {s}'s whole parameters, but they are sharded here ({when})")
        for s in sorted(whole):
            if whole[s] != start[s]:
                state = ("whole", "sharded")
                raise fail(d, len(prog) - 1, prog[-1], f"ends its program with stage {s} {state[not whole[s]]} but "
                           f"starts it {state[not start[s]]}: the next step would find it so")
