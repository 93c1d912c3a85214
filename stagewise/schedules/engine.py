"""Run device programs in order against their dependencies: the core of validate, lower and simulate.

A device runs its actions one after another; an action starts when the device is free
and what it depends on has finished (plus the transfer time when that came from
another device). If some device can never go on, the schedule is invalid and the
error names the first action that waits forever and what it waits for.
"""

from __future__ import annotations

from collections.abc import Callable

from stagewise.schedules.actions import STEP, Action, B, F, I, Schedule, ScheduleError, W

# A dependency key: ("F" | "B" | "W", stage, micro-batch), or ("V", stage, version) for a weight version.
Key = tuple[str, int, int]


def dependencies(a: Action, num_stages: int) -> list[tuple[Key, int]]:
    """What action `a` waits for, each with the stage that produces it."""
    op, s, n = a.op, a.stage, a.microbatch
    if op == F:
        deps = [(("F", s - 1, n), s - 1)] if s > 0 else []
        if a.version > 0:
            deps.append((("V", s, a.version), s))
        return deps
    if op in (B, I):
        deps = [(("F", s, n), s)]
        if s < num_stages - 1:
            deps.append((("B", s + 1, n), s + 1))
        return deps
    if op == W:
        return [(("B", s, n), s)]
    return []


def produces(a: Action) -> Key:
    if a.op == STEP:
        return ("V", a.stage, a.version)
    return ("B" if a.op == I else a.op, a.stage, a.microbatch)


def describe_key(key: Key) -> str:
    kind, s, n = key
    if kind == "V":
        return f"weight version {n} of stage {s} (a STEP creating it)"
    name = {"F": "F", "B": "B/I", "W": "W"}[kind]
    return f"{name}(stage {s}, mb {n})"


def execute(
    schedule: Schedule,
    duration: Callable[[Action], float],
    transfer: Callable[[int, int], float] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Start and end time of every compute action, device by device (lists parallel to compute_actions).

    `transfer(src_stage, dst_stage)` is the delay of a message between stages on different devices.
    """
    S, placement = schedule.num_stages, schedule.placement
    progs = [schedule.compute_actions(d) for d in range(schedule.num_devices)]
    starts: list[list[float]] = [[0.0] * len(p) for p in progs]
    ends: list[list[float]] = [[0.0] * len(p) for p in progs]
    done: dict[Key, float] = {}
    waiting: dict[Key, list[int]] = {}
    pos = [0] * len(progs)
    free = [0.0] * len(progs)
    work = list(range(len(progs)))
    blocked: dict[int, Key] = {}
    while work:
        d = work.pop()
        prog, p = progs[d], pos[d]
        t_free = free[d]
        while p < len(prog):
            a = prog[p]
            ready = t_free
            missing = None
            for key, src in dependencies(a, S):
                t = done.get(key)
                if t is None:
                    missing = key
                    break
                if transfer is not None and placement[src] != d:
                    t += transfer(src, a.stage)
                if t > ready:
                    ready = t
            if missing is not None:
                waiting.setdefault(missing, []).append(d)
                blocked[d] = missing
                break
            blocked.pop(d, None)
            end = ready + duration(a)
            starts[d][p], ends[d][p] = ready, end
            t_free = end
            key = produces(a)
            done[key] = end
            woken = waiting.pop(key, None)
            if woken:
                work.extend(woken)
            p += 1
        pos[d], free[d] = p, t_free
    if any(pos[d] < len(progs[d]) for d in range(len(progs))):
        raise ScheduleError(_stuck_message(schedule, progs, pos, blocked))
    return starts, ends


def _stuck_message(schedule: Schedule, progs: list[list[Action]], pos: list[int], blocked: dict[int, Key]) -> str:
    where: dict[Key, tuple[int, int]] = {}
    for d, prog in enumerate(progs):
        for i, a in enumerate(prog):
            where.setdefault(produces(a), (d, i))
    def root_cause(dev: int) -> int:  # waits on itself or on nothing: the real culprit, not a victim
        key = blocked[dev]
        return 0 if key not in where or where[key][0] == dev else 1

    d = min(blocked, key=lambda dev: (root_cause(dev), dev))
    key = blocked[d]
    a = progs[d][pos[d]]
    msg = f"{schedule.name}: device {d} waits forever at its action #{pos[d]} {a}: it needs {describe_key(key)}, "
    if key not in where:
        return msg + "which no device ever runs"
    d2, i2 = where[key]
    if d2 == d:
        return msg + f"which device {d} only runs later, at #{i2}"
    head = progs[d2][pos[d2]]
    return msg + f"which device {d2} runs at #{i2}, but device {d2} is itself stuck at #{pos[d2]} {head} (a cycle)"
