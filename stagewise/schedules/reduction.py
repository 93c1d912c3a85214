"""The data-parallel lowering pass: a REDUCE action after each stage's last backward piece.

With D data-parallel replicas of the pipeline, every stage's gradients are reduced over
its D replicas before the optimizer step. Placing that reduction in the action lists,
right after the stage's last backward piece of the batch (B, or W when the backward is
split), lets a device reduce a stage as soon as that stage is done: in 1F1B the last
stages finish first, so their reduction overlaps the cooldown of the earlier ones; with
several stages per device (interleaved, V schedules) a finished chunk reduces while the
device still computes the other. The validator checks the placement; the simulator
times it (`Costs.reduce`); the timelines draw it (`R`).
"""

from __future__ import annotations

from dataclasses import replace

from stagewise.schedules.actions import REDUCE, STEP, Action, B, W
from stagewise.schedules.schedule import Schedule


def with_reductions(schedule: Schedule) -> Schedule:
    """`schedule` with one REDUCE per stage between two optimizer steps of its device, right after that
    stage's last backward piece before the step (a no-op when it already has them). Works on lowered and
    unlowered schedules (on a lowered one the message order is unchanged)."""
    if any(a.op == REDUCE for prog in schedule.programs for a in prog):
        return schedule
    last_piece = (B, W)  # a split schedule may still run a full B for some micro-batches (DualPipeV)
    out: list[list[Action]] = []
    for prog in schedule.programs:
        steps = [i for i, a in enumerate(prog) if a.op == STEP] or [len(prog)]
        after: dict[int, list[Action]] = {}
        start = 0
        for end in steps:
            last: dict[int, int] = {}
            for i in range(start, end):
                if prog[i].op in last_piece:
                    last[prog[i].stage] = i
            version = prog[end].version if end < len(prog) else 0
            for s, i in sorted(last.items(), key=lambda kv: kv[1]):
                after.setdefault(i, []).append(Action(REDUCE, s, -1, version))
            start = end + 1
        new: list[Action] = []
        for i, a in enumerate(prog):
            new.append(a)
            new.extend(after.get(i, ()))
        out.append(new)
    return replace(schedule, programs=out)
