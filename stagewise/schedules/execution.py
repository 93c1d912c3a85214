"""Run device programs in order against their dependencies: the core of validate, lower and simulate.

A device runs its actions one after another; an action starts when the device is free
and what it depends on has finished (plus the transfer time when that came from
another device). If some device can never go on, the schedule is invalid and the
error names the first action that waits forever and what it waits for.

Everything works on columns (`Programs`), in two passes:
1. `unit_execution`: the as-soon-as-possible run under unit costs (F=1, B=2, I=W=1,
   STEP=0), advanced event by event for all devices at once. Its start times are
   integers and order every dependency before its consumer; a generator that already
   ran its schedule under these costs hands its times over and they are checked instead.
2. `timed_execution`: any costs, computed level by level in that order (all actions
   that start at one unit time are independent of each other), vectorised per level.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from stagewise.schedules.actions import (
    COMPUTE_OPS,
    OVERLAP_F_B,
    PAIR_OPS,
    RECOMPUTE,
    REDUCE,
    STEP,
    Action,
    B,
    F,
    I,
    ScheduleError,
    W,
)
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule

# A dependency key: ("F" | "B" | "W", stage, micro-batch), or ("V", stage, version) for a weight version.
Key = tuple[str, int, int]

# RECOMPUTE costs 0 here so that recomputing leaves the message order (the lowering) unchanged
UNIT_COSTS = {F: 1.0, B: 2.0, I: 1.0, W: 1.0, STEP: 0.0, REDUCE: 0.0, RECOMPUTE: 0.0}
_KIND = np.full(len(OP_CODE), -1, dtype=np.int64)  # op code -> key kind: 0 F, 1 B or I, 2 W, 3 version
for _op, _kind in ((F, 0), (B, 1), (I, 1), (W, 2), (STEP, 3)):
    _KIND[OP_CODE[_op]] = _kind
_UNIT = np.zeros(len(OP_CODE))
for _op, _cost in UNIT_COSTS.items():
    _UNIT[OP_CODE[_op]] = _cost
# The rows `compile_schedule` keeps: compute actions and the overlapped pairs that group them.
WORK_CODES = np.array([OP_CODE[op] for op in COMPUTE_OPS + PAIR_OPS])
_PAIR = OP_CODE[OVERLAP_F_B]


def produces(a: Action) -> Key:
    if a.op == OVERLAP_F_B:
        return ("P", -1, -1)  # nothing of its own: its members produce
    if a.op == STEP:
        return ("V", a.stage, a.version)
    return ("B" if a.op == I else a.op, a.stage, a.microbatch)


def describe_key(key: Key) -> str:
    kind, s, n = key
    if kind == "V":
        return f"weight version {n} of stage {s} (a STEP creating it)"
    name = {"F": "F", "B": "B/I", "W": "W"}[kind]
    return f"{name}(stage {s}, mb {n})"


@dataclass
class Compiled:
    """The compute actions of a schedule with their dependencies as row indices.

    Rows are the compute actions (and overlapped pairs), device-major in program order. An
    overlapped pair's row carries what its two members need from other actions (the F
    member's input, the B member's incoming gradient) and their whole cost (`unit_cost`); its
    members follow it at zero cost, and whatever depends on a member depends on the pair's
    row: both results are there when the pair ends. A dependency is a row,
    or `N` (none: always met) or `N + 1` (no action produces it: never met). `cross*` is the
    stage boundary a dependency's message crosses (boundary b joins stages b and b+1), -1 on
    the same device. Keys are (kind * S + stage) * K + index, kind 0 F, 1 B/I, 2 W, 3 version.
    """

    programs: Programs
    device: np.ndarray
    unit_cost: np.ndarray
    dep1: np.ndarray
    dep2: np.ndarray
    key1: np.ndarray
    key2: np.ndarray
    cross1: np.ndarray
    cross2: np.ndarray
    S: int
    K: int

    @property
    def n(self) -> int:
        return len(self.device)


def compile_schedule(schedule: Schedule) -> Compiled:
    """Dependencies of every compute action (computed once per schedule)."""
    return schedule.programs.cached("compiled", lambda: _compile(schedule))


def _compile(schedule: Schedule) -> Compiled:
    allp = schedule.programs
    progs = allp.select(np.isin(allp.op, WORK_CODES)) if allp.num_actions else allp
    S = schedule.num_stages
    placement = np.asarray(schedule.placement, dtype=np.int64)
    op, st, mb, ver = progs.op, progs.stage, progs.microbatch, progs.version
    N = len(op)
    K = int(max(schedule.microbatches, int(ver.max(initial=0)) + 1, int(mb.max(initial=0)) + 1)) + 1
    kind = _KIND[op]
    idx = np.where(kind == 3, ver, mb)
    own = (kind * S + st) * K + idx
    none = np.int64(-1)
    is_f, is_b, is_w = kind == 0, kind == 1, kind == 2
    key1 = np.where(is_f & (st > 0), (st - 1) * K + mb,
                    np.where(is_b, st * K + mb, np.where(is_w, (S + st) * K + mb, none)))
    key2 = np.where(is_f & (ver > 0), (3 * S + st) * K + ver,
                    np.where(is_b & (st < S - 1), (S + st + 1) * K + mb, none))
    row_of = np.full(4 * S * K + 1, N + 1, dtype=np.int64)
    valid = (st >= 0) & (st < S) & (idx >= 0) & (idx < K)
    row_of[own[valid]] = np.flatnonzero(valid)
    row_of[-1] = N  # key -1: no dependency
    dep1 = row_of[np.where((key1 >= 0) & (key1 < 4 * S * K), key1, -1)]
    dep1[(key1 >= 4 * S * K)] = N + 1
    dep2 = row_of[np.where((key2 >= 0) & (key2 < 4 * S * K), key2, -1)]
    dep2[(key2 >= 4 * S * K)] = N + 1
    device = progs.device()
    safe = np.clip(st, 0, max(S - 1, 0))
    prev_dev = placement[np.clip(safe - 1, 0, None)] if S else device
    next_dev = placement[np.clip(safe + 1, None, max(S - 1, 0))] if S else device
    cross1 = np.where(is_f & (st > 0) & (prev_dev != device), st - 1, -1)
    cross2 = np.where(is_b & (st < S - 1) & (next_dev != device), st, -1)
    unit = _UNIT[op]
    pair = np.flatnonzero(op == _PAIR)
    if len(pair):
        _check_pairs(schedule, progs, device, pair)
        fm, bm = pair + 1, pair + 2
        dep1[pair], key1[pair], cross1[pair] = dep1[fm], key1[fm], cross1[fm]
        dep2[pair], key2[pair], cross2[pair] = dep2[bm], key2[bm], cross2[bm]
        dep1[fm], key1[fm], cross1[fm] = N, -1, -1
        dep2[bm], key2[bm], cross2[bm] = N, -1, -1
        unit[pair] = unit[fm] + unit[bm]
        unit[fm] = unit[bm] = 0.0
        remap = np.arange(N + 2, dtype=np.int64)
        remap[fm] = remap[bm] = pair
        dep1, dep2 = remap[dep1], remap[dep2]
    return Compiled(progs, device, unit, dep1, dep2, key1, key2, cross1, cross2, S, K)


def _check_pairs(schedule: Schedule, progs: Programs, device: np.ndarray, pair: np.ndarray) -> None:
    """Every overlapped pair is followed by an F and a B of its device (`validate` names a bad one)."""
    n = len(progs.op)
    fm, bm = np.minimum(pair + 1, n - 1), np.minimum(pair + 2, n - 1)
    if ((pair + 2 >= n) | (device[fm] != device[pair]) | (device[bm] != device[pair])
            | (progs.op[fm] != OP_CODE[F]) | (progs.op[bm] != OP_CODE[B])).any():
        raise ScheduleError(f"{schedule.name}: an {OVERLAP_F_B} action is not followed by its F and B "
                            "(validate() names it)")


def pair_rows(c: Compiled) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of every overlapped pair, of its F member and of its B member (rows of `compile_schedule`)."""
    pair = np.flatnonzero(c.programs.op == _PAIR)
    return pair, pair + 1, pair + 2


def _decode(key: int, S: int, K: int) -> Key:
    kind, rest = divmod(key, S * K)
    s, n = divmod(rest, K)
    return (("F", "B", "W", "V")[kind], s, n)


def unit_execution(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of every compute row under unit costs (rows of `compile_schedule`).

    Raises ScheduleError naming the first action that can never run.
    """
    return schedule.programs.cached("unit", lambda: _unit_execution(schedule))


def _unit_execution(schedule: Schedule) -> tuple[np.ndarray, np.ndarray]:
    c = compile_schedule(schedule)
    given = c.programs.start
    if given is not None and _certificate_holds(c, given):
        return given, given + c.unit_cost
    return _asap(schedule, c)


def _certificate_holds(c: Compiled, start: np.ndarray) -> bool:
    """True if `start` is a possible run under unit costs: in program order, after every dependency."""
    if len(start) != c.n or not np.isfinite(start).all() or (start < 0).any():
        return False
    end = start + c.unit_cost
    full = np.concatenate([end, [0.0, np.inf]])
    first = np.zeros(c.n, dtype=bool)
    offs = c.programs.offsets[:-1]
    first[offs[offs < c.n]] = True
    prev_end = np.concatenate([[0.0], end[:-1]])
    return bool(((first | (prev_end <= start)) & (full[c.dep1] <= start) & (full[c.dep2] <= start)).all())


def _asap(schedule: Schedule, c: Compiled) -> tuple[np.ndarray, np.ndarray]:
    N, offsets = c.n, c.programs.offsets
    P = len(offsets) - 1
    end = np.full(N + 2, np.inf)
    end[N] = 0.0
    start = np.full(N, np.nan)
    cost, dep1, dep2 = c.unit_cost, c.dep1, c.dep2
    pos, stop = offsets[:-1].copy(), offsets[1:]
    busy = np.zeros(P)
    t = 0.0
    active = pos < stop
    recent = 0  # actions started over the last _WINDOW steps
    for step in itertools.count():
        if not active.any():
            break
        if step and step % _WINDOW == 0:
            if recent < _SPARSE * _WINDOW:  # little parallelism: numpy costs more than it saves
                return _asap_scalar(schedule, c, pos, busy, start, end)
            recent = 0
        while True:  # start what is ready at t (again after a zero-cost action: its device is free)
            cand = np.flatnonzero(active & (busy <= t))
            if not len(cand):
                break
            rows = pos[cand]
            ok = (end[dep1[rows]] <= t) & (end[dep2[rows]] <= t)
            if not ok.any():
                break
            cand, rows = cand[ok], rows[ok]
            recent += len(rows)
            e = t + cost[rows]
            start[rows] = t
            end[rows] = e
            busy[cand] = e
            pos[cand] += 1
            active = pos < stop
            if (e > t).all():
                break
        future = busy[busy > t]
        if not len(future):
            if active.any():
                _raise_stuck(schedule, c, pos, end)
            break
        t = float(future.min())
    return start, end[:N]


_WINDOW, _SPARSE = 64, 4  # switch to the scalar loop below 4 actions per step


def _asap_scalar(schedule: Schedule, c: Compiled, pos: np.ndarray, busy: np.ndarray, start: np.ndarray,
                 end: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Finish the as-soon-as-possible run action by action, from the state the vectorised loop left.

    A device runs on while what its next action needs has finished (an end time is known);
    otherwise it waits on that row and is woken when the row is placed.
    """
    N, offsets = c.n, c.programs.offsets
    P = len(offsets) - 1
    dep1, dep2, cost = c.dep1.tolist(), c.dep2.tolist(), c.unit_cost.tolist()
    end_l, start_l = end.tolist(), start.tolist()
    stop = offsets[1:].tolist()
    pos_l, free = pos.tolist(), busy.tolist()
    inf = float("inf")
    waiting: dict[int, list[int]] = {}
    work = list(range(P))
    while work:
        d = work.pop()
        p, n_end, t_free = pos_l[d], stop[d], free[d]
        while p < n_end:
            e1 = end_l[dep1[p]]
            if e1 == inf:
                waiting.setdefault(dep1[p], []).append(d)
                break
            e2 = end_l[dep2[p]]
            if e2 == inf:
                waiting.setdefault(dep2[p], []).append(d)
                break
            s = t_free if t_free > e1 else e1
            if e2 > s:
                s = e2
            start_l[p] = s
            t_free = end_l[p] = s + cost[p]
            woken = waiting.pop(p, None)
            if woken:
                work.extend(woken)
            p += 1
        pos_l[d], free[d] = p, t_free
    end_a = np.array(end_l)
    if any(pos_l[d] < stop[d] for d in range(P)):
        _raise_stuck(schedule, c, np.array(pos_l), end_a)
    return np.array(start_l), end_a[:N]


def _raise_stuck(schedule: Schedule, c: Compiled, pos: np.ndarray, end: np.ndarray) -> None:
    offsets = c.programs.offsets
    blocked: dict[int, Key] = {}
    for d in range(len(offsets) - 1):
        r = int(pos[d])
        if r < offsets[d + 1]:
            k = int(c.key1[r]) if np.isinf(end[c.dep1[r]]) else int(c.key2[r])
            blocked[d] = _decode(k, c.S, c.K)
    progs = [list(c.programs[d]) for d in range(len(offsets) - 1)]
    at = [int(pos[d] - offsets[d]) for d in range(len(progs))]
    message, d = _stuck_message(schedule, progs, at, blocked)
    raise ScheduleError(message, device=d, index=_list_index(schedule, d, at[d]))


def _list_index(schedule: Schedule, device: int, k: int) -> int:
    """Position in the device's whole list of its k-th compute row (communication rows skipped)."""
    work = np.flatnonzero(np.isin(np.asarray([OP_CODE.get(a.op, -1) for a in schedule.programs[device]]),
                                  WORK_CODES))
    return int(work[k]) if k < len(work) else k


def timed_execution(schedule: Schedule, cost: np.ndarray, delay: np.ndarray | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """Start and end of every compute row when row r takes `cost[r]` and a message across
    boundary b takes `delay[b]` (None: free). Rows as in `compile_schedule`."""
    c = compile_schedule(schedule)
    ustart, _ = unit_execution(schedule)
    N = c.n
    order, bounds = schedule.programs.cached("levels", lambda: _levels(c, ustart))
    prev = np.arange(-1, N - 1, dtype=np.int64)
    offs = c.programs.offsets[:-1]
    prev[offs[offs < N]] = N
    endf = np.zeros(N + 2)
    endf[N + 1] = np.inf
    startf = np.zeros(N)
    o_prev, o_dep1, o_dep2, o_cost = prev[order], c.dep1[order], c.dep2[order], np.asarray(cost, float)[order]
    dl = np.concatenate([np.asarray(delay if delay is not None else [], float), [0.0]])
    with_delay = bool((dl != 0).any())
    o_d1, o_d2 = (dl[c.cross1[order]], dl[c.cross2[order]]) if with_delay else (None, None)
    if N < _SPARSE * (len(bounds) - 1):  # small levels: one row at a time is faster
        _timed_scalar(order, o_prev, o_dep1, o_dep2, o_cost, o_d1, o_d2, startf, endf)
    elif with_delay:
        for a, b in zip(bounds[:-1], bounds[1:]):
            s = np.maximum(np.maximum(endf[o_prev[a:b]], endf[o_dep1[a:b]] + o_d1[a:b]),
                           endf[o_dep2[a:b]] + o_d2[a:b])
            rows = order[a:b]
            startf[rows] = s
            endf[rows] = s + o_cost[a:b]
    else:
        for a, b in zip(bounds[:-1], bounds[1:]):
            s = np.maximum(np.maximum(endf[o_prev[a:b]], endf[o_dep1[a:b]]), endf[o_dep2[a:b]])
            rows = order[a:b]
            startf[rows] = s
            endf[rows] = s + o_cost[a:b]
    return startf, endf[:N]


def _timed_scalar(order, prev, dep1, dep2, cost, d1, d2, startf: np.ndarray, endf: np.ndarray) -> None:
    """The level loop of `timed_execution`, one row at a time (rows in topological order)."""
    end_l = endf.tolist()
    rows, prev, dep1, dep2, cost = order.tolist(), prev.tolist(), dep1.tolist(), dep2.tolist(), cost.tolist()
    starts = [0.0] * len(rows)
    if d1 is None:
        for k, r in enumerate(rows):
            s = end_l[prev[k]]
            e = end_l[dep1[k]]
            if e > s:
                s = e
            e = end_l[dep2[k]]
            if e > s:
                s = e
            starts[k] = s
            end_l[r] = s + cost[k]
    else:
        d1, d2 = d1.tolist(), d2.tolist()
        for k, r in enumerate(rows):
            s = end_l[prev[k]]
            e = end_l[dep1[k]] + d1[k]
            if e > s:
                s = e
            e = end_l[dep2[k]] + d2[k]
            if e > s:
                s = e
            starts[k] = s
            end_l[r] = s + cost[k]
    startf[order] = starts
    endf[:] = end_l


def _levels(c: Compiled, ustart: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Rows grouped by unit start (then by rank among a device's zero-cost run at that time)."""
    N = c.n
    if not N:
        return np.zeros(0, dtype=np.int64), [0]
    new_run = np.ones(N, dtype=bool)
    new_run[1:] = (c.device[1:] != c.device[:-1]) | (ustart[1:] != ustart[:-1])
    run_start = np.flatnonzero(new_run)
    sub = np.arange(N) - run_start[np.cumsum(new_run) - 1]
    order = np.lexsort((sub, ustart))
    ks, kb = ustart[order], sub[order]
    change = np.flatnonzero((ks[1:] != ks[:-1]) | (kb[1:] != kb[:-1])) + 1
    return order, [0, *change.tolist(), N]


def _stuck_message(schedule: Schedule, progs: list[list[Action]], pos: list[int], blocked: dict[int, Key]
                   ) -> tuple[str, int]:
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
        return msg + "which no device ever runs", d
    d2, i2 = where[key]
    if d2 == d:
        return msg + f"which device {d} only runs later, at #{i2}", d
    head = progs[d2][pos[d2]]
    return msg + f"which device {d2} runs at #{i2}, but device {d2} is itself stuck at #{pos[d2]} {head} (a cycle)", d
