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


def _compile(schedule: Schedule, progs: list[list[Action]]):
    """Integer keys for what every action produces and waits for (tuples are slow at a million actions).

    A key is (kind * S + stage) * K + index, kind 0 = F, 1 = B or I, 2 = W, 3 = weight version.
    Per device: own keys, first and second dependency (-1: none) and, for a dependency on
    another device, the stage boundary its message crosses (-1: same device).
    """
    S, placement = schedule.num_stages, schedule.placement
    K = max([schedule.microbatches] + [a.version + 1 for p in progs for a in p if a.version]) + 1
    out = []
    for d, prog in enumerate(progs):
        own, dep1, cross1, dep2, cross2 = [], [], [], [], []
        for a in prog:
            op, st, n = a.op, a.stage, a.microbatch
            if op == F:
                own.append(st * K + n)
                if st > 0:
                    dep1.append((st - 1) * K + n)
                    cross1.append(st - 1 if placement[st - 1] != d else -1)
                else:
                    dep1.append(-1)
                    cross1.append(-1)
                dep2.append((3 * S + st) * K + a.version if a.version > 0 else -1)
                cross2.append(-1)
            elif op == B or op == I:
                own.append((S + st) * K + n)
                dep1.append(st * K + n)
                cross1.append(-1)
                if st < S - 1:
                    dep2.append((S + st + 1) * K + n)
                    cross2.append(st if placement[st + 1] != d else -1)
                else:
                    dep2.append(-1)
                    cross2.append(-1)
            elif op == W:
                own.append((2 * S + st) * K + n)
                dep1.append((S + st) * K + n)
                cross1.append(-1)
                dep2.append(-1)
                cross2.append(-1)
            else:  # STEP creates a version
                own.append((3 * S + st) * K + a.version)
                dep1.append(-1)
                cross1.append(-1)
                dep2.append(-1)
                cross2.append(-1)
        out.append((own, dep1, cross1, dep2, cross2))
    return K, out


def _decode(key: int, S: int, K: int) -> Key:
    kind, rest = divmod(key, S * K)
    s, n = divmod(rest, K)
    return (("F", "B", "W", "V")[kind], s, n)


def execute(
    schedule: Schedule,
    duration: Callable[[Action], float],
    transfer: Callable[[int, int], float] | None = None,
) -> tuple[list[list[float]], list[list[float]]]:
    """Start and end time of every compute action, device by device (lists parallel to compute_actions).

    `transfer(src_stage, dst_stage)` is the delay of a message between stages on different devices.
    """
    S = schedule.num_stages
    progs = [schedule.compute_actions(d) for d in range(schedule.num_devices)]
    K, compiled = _compile(schedule, progs)
    # delay of a message across boundary b (stages b and b+1), either direction
    delay = [transfer(b, b + 1) if transfer is not None else 0.0 for b in range(max(S - 1, 0))]
    costs = [[duration(a) for a in prog] for prog in progs]
    starts: list[list[float]] = [[0.0] * len(p) for p in progs]
    ends: list[list[float]] = [[0.0] * len(p) for p in progs]
    done: dict[int, float] = {}
    waiting: dict[int, list[int]] = {}
    pos = [0] * len(progs)
    free = [0.0] * len(progs)
    work = list(range(len(progs)))
    blocked: dict[int, int] = {}
    while work:
        d = work.pop()
        own, dep1, cross1, dep2, cross2 = compiled[d]
        cost, st_d, en_d = costs[d], starts[d], ends[d]
        p, n_actions, t_free = pos[d], len(own), free[d]
        while p < n_actions:
            ready = t_free
            k = dep1[p]
            if k >= 0:
                t = done.get(k)
                if t is None:
                    waiting.setdefault(k, []).append(d)
                    blocked[d] = k
                    break
                if cross1[p] >= 0:
                    t += delay[cross1[p]]
                if t > ready:
                    ready = t
            k = dep2[p]
            if k >= 0:
                t = done.get(k)
                if t is None:
                    waiting.setdefault(k, []).append(d)
                    blocked[d] = k
                    break
                if cross2[p] >= 0:
                    t += delay[cross2[p]]
                if t > ready:
                    ready = t
            end = ready + cost[p]
            st_d[p] = ready
            en_d[p] = end
            t_free = end
            k = own[p]
            done[k] = end
            woken = waiting.pop(k, None)
            if woken:
                work.extend(woken)
            p += 1
        if p == n_actions:
            blocked.pop(d, None)
        pos[d], free[d] = p, t_free
    if any(pos[d] < len(progs[d]) for d in range(len(progs))):
        stuck = {d: _decode(k, S, K) for d, k in blocked.items() if pos[d] < len(progs[d])}
        raise ScheduleError(_stuck_message(schedule, progs, pos, stuck))
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
