"""Check that a schedule is a correct pipeline program, naming the first offending action.

Each check has a fast form over the columns (`Programs`) that only says yes or no; when
it says no, the exact form walks the actions to find and name the first offending one.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import (
    COMM_OPS,
    COMPUTE_OPS,
    OVERLAP_F_B,
    RECOMPUTE,
    RECV_B,
    RECV_F,
    REDUCE,
    RESHARD,
    SEND_B,
    SEND_F,
    STEP,
    UNSHARD,
    Action,
    B,
    F,
    I,
    ScheduleError,
    W,
)
from stagewise.schedules.execution import unit_execution
from stagewise.schedules.lowering import lower, message_of
from stagewise.schedules.programs import OP_CODE
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.sharding import check_sharding


def validate(schedule: Schedule) -> Schedule:
    """Raise ScheduleError unless `schedule` is valid; return its lowered form.

    Checked: every (stage, micro-batch) has exactly one forward and one backward (B; where the
    backward may be split, B or I then W), each on the device that holds the stage; every
    overlapped pair is followed by its F and its B, of two different (stage, micro-batch);
    versions agree between a forward and its backward pieces and exist when used; a
    synchronous schedule steps only after its last backward; dependencies can be met
    (no action waits for one that comes later); and the communication, lowered when
    missing, matches send for receive and cannot deadlock under blocking semantics.
    """
    if not _structure_ok(schedule):
        _check_structure(schedule)
    if schedule.lowered:
        unit_execution(schedule)  # proves every dependency can be met
        lowered = schedule
    else:
        lowered = lower(schedule)  # runs the unit execution too
    if not _communication_ok(lowered):
        check_communication(lowered)
    return lowered


def _fail(schedule: Schedule, d: int, i: int, a: Action, why: str) -> ScheduleError:
    return ScheduleError(f"{schedule.name}: device {d} action #{i} {a}: {why}", device=d, index=i)


def _pair_problem(prog: tuple[Action, ...], i: int) -> str | None:
    """What is wrong with the overlapped pair at `prog[i]`, or None."""
    a = prog[i]
    if a.stage != -1 or a.microbatch != -1:
        return "an overlapped pair names no stage or micro-batch of its own (-1): its two members do"
    if i + 2 >= len(prog) or prog[i + 1].op != F or prog[i + 2].op != B:
        got = ", ".join(str(x) for x in prog[i + 1:i + 3]) or "nothing"
        return f"must be followed by its members, an F and then a full B (got {got})"
    f, b = prog[i + 1], prog[i + 2]
    if (f.stage, f.microbatch) == (b.stage, b.microbatch):
        return (f"pairs the forward and the backward of the same (stage {f.stage}, mb {f.microbatch}), "
                "which cannot overlap")
    return None


def _check_structure(sc: Schedule) -> None:
    P, S, m = sc.num_devices, sc.num_stages, sc.microbatches
    if len(sc.programs) != P:
        raise ScheduleError(f"{sc.name}: has {len(sc.programs)} action lists for {P} devices")
    if any(not 0 <= d < P for d in sc.placement):
        raise ScheduleError(f"{sc.name}: placement {sc.placement} names a device outside 0..{P - 1}")
    allowed = {B, I, W} if sc.split_backward else {B}
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}
    fwd_version: dict[tuple[int, int], int] = {}
    flush_error: ScheduleError | None = None
    for d, prog in enumerate(sc.programs):
        versions = {s: {0} for s in range(S)}
        step_at = -1
        for i, a in enumerate(prog):
            if a.op in COMM_OPS:
                continue
            if a.op == OVERLAP_F_B:
                problem = _pair_problem(prog, i)
                if problem:
                    raise _fail(sc, d, i, a, problem)
                continue
            if a.op not in COMPUTE_OPS:
                raise _fail(sc, d, i, a, f"unknown op {a.op!r}")
            if not 0 <= a.stage < S:
                raise _fail(sc, d, i, a, f"stage outside 0..{S - 1}")
            if a.op == STEP:
                if sc.placement[a.stage] != d:
                    raise _fail(sc, d, i, a, f"stage {a.stage} lives on device {sc.placement[a.stage]}, "
                                f"so its optimizer step runs there, not on {d}")
                step_at = i
                versions[a.stage].add(a.version)
                continue
            if a.op == RECOMPUTE:
                if sc.placement[a.stage] != d:
                    raise _fail(sc, d, i, a, f"stage {a.stage} lives on device {sc.placement[a.stage]}, not {d}")
                continue
            if a.op in (UNSHARD, RESHARD):
                if sc.placement[a.stage] != d:
                    raise _fail(sc, d, i, a, f"stage {a.stage} lives on device {sc.placement[a.stage]}, "
                                f"so its parameters are gathered and released there, not on {d}")
                continue
            if a.op == REDUCE:
                if sc.placement[a.stage] != d:
                    raise _fail(sc, d, i, a, f"stage {a.stage} lives on device {sc.placement[a.stage]}, "
                                f"so its gradients are reduced there, not on {d}")
                continue
            if not sc.asynchronous and step_at >= 0 and flush_error is None:
                flush_error = _fail(sc, d, i, a, f"runs after the optimizer step at #{step_at}; a synchronous "
                                    "schedule steps once, after its last backward (no flush)")
            if sc.placement[a.stage] != d:
                raise _fail(sc, d, i, a, f"stage {a.stage} lives on device {sc.placement[a.stage]}, not {d}")
            if not 0 <= a.microbatch < m:
                raise _fail(sc, d, i, a, f"micro-batch outside 0..{m - 1}")
            if a.op != F and a.op not in allowed:
                raise _fail(sc, d, i, a, "this schedule's backward is a full B (it is not split into I and W)")
            key = (a.op, a.stage, a.microbatch)
            if key in seen:
                raise _fail(sc, d, i, a, f"runs twice (first at device {seen[key][0]} #{seen[key][1]})")
            seen[key] = (d, i)
            if a.op == F:
                if a.version not in versions[a.stage]:
                    raise _fail(sc, d, i, a, f"uses weight version {a.version}, which no earlier STEP created")
                fwd_version[(a.stage, a.microbatch)] = a.version
            else:
                v = fwd_version.get((a.stage, a.microbatch))
                if v is not None and v != a.version:
                    raise _fail(sc, d, i, a, f"uses weight version {a.version} but its forward used {v} (no stash)")
    for s in range(S):
        for n in range(m):
            full = (B, s, n) in seen
            if full and sc.split_backward:
                for op in (I, W):
                    if (op, s, n) in seen:
                        d, i = seen[(op, s, n)]
                        raise _fail(sc, d, i, sc.programs[d][i], f"runs besides the full B(stage {s}, mb {n}); a "
                                    "backward is one B, or I then W")
            for op in (F, B) if full or not sc.split_backward else (F, I, W):
                if (op, s, n) not in seen:
                    raise ScheduleError(f"{sc.name}: {op}(stage {s}, mb {n}) never runs "
                                        f"(device {sc.placement[s]} should run it)", device=sc.placement[s])
    if flush_error is not None:
        raise flush_error
    _check_reductions(sc)
    _check_recomputes(sc)
    check_sharding(sc, lambda d, i, a, why: _fail(sc, d, i, a, why))


def _check_recomputes(sc: Schedule) -> None:
    """A RECOMPUTE(stage, mb) runs once, after that forward and before that micro-batch's backward on the stage."""
    for d, prog in enumerate(sc.programs):
        seen: dict[tuple[int, int], str] = {}
        for i, a in enumerate(prog):
            key = (a.stage, a.microbatch)
            if a.op == F:
                seen[key] = F
            elif a.op in (B, I) and seen.get(key) == "pending":
                seen[key] = "done"
            elif a.op == RECOMPUTE:
                state = seen.get(key)
                if state is None:
                    raise _fail(sc, d, i, a, f"recomputes F(stage {a.stage}, mb {a.microbatch}) before it ran")
                if state != F:
                    raise _fail(sc, d, i, a, "comes after that micro-batch's backward started, or twice")
                seen[key] = "pending"


def _check_reductions(sc: Schedule) -> None:
    """When a schedule reduces gradients (REDUCE actions), each device reduces every stage it holds exactly
    once between two optimizer steps, after the last backward piece of that stage and before the step."""
    if not any(a.op == REDUCE for prog in sc.programs for a in prog):
        return
    last_piece = W if sc.split_backward else B
    for d, prog in enumerate(sc.programs):
        window_start = 0
        reduced: dict[int, int] = {}
        backward_at: dict[int, int] = {}
        for i, a in enumerate(prog):
            if a.op in (last_piece, B) and a.stage in reduced:
                j = reduced[a.stage]
                raise _fail(sc, d, j, prog[j], f"reduces stage {a.stage}'s gradients before its backward piece "
                            f"{a} at #{i}; a reduction comes after the stage's last backward of the batch")
            if a.op in (last_piece, B):
                backward_at[a.stage] = i
            elif a.op == REDUCE:
                if a.stage in reduced:
                    raise _fail(sc, d, i, a, f"reduces stage {a.stage} a second time before an optimizer step "
                                f"(first at #{reduced[a.stage]})")
                reduced[a.stage] = i
            elif a.op == STEP:
                missing = sorted(s for s in backward_at if s not in reduced)
                if missing:
                    raise _fail(sc, d, i, a, f"steps before stage {missing[0]}'s gradients are reduced (no REDUCE "
                                f"between #{window_start} and #{i})")
                window_start, reduced, backward_at = i + 1, {}, {}

def check_communication(sc: Schedule) -> None:
    """Match every SEND with one RECV and prove the programs finish under rendezvous semantics.

    A device runs its list in order, so whatever an action needs on its own device (the local
    producer, or the RECV that brought its input) must come earlier in that list: checked
    statically. What is left is the order of the messages: a SEND and its RECV happen
    together when both devices reach them, which is simulated over the messages alone.
    """
    P, S, placement = sc.num_devices, sc.num_stages, sc.placement
    M = sc.microbatches + 1
    SEND_OPS = (SEND_F, SEND_B)

    def msg_key(a: Action) -> int:
        direction, src, dst, mb = message_of(a)
        return (((direction == "B") * S + src) * S + dst) * M + mb

    sends: dict[int, tuple[int, int]] = {}
    recvs: dict[int, tuple[int, int]] = {}
    comm: list[list[int]] = []  # per device: the message keys of its SEND/RECV actions, in order
    comm_at: list[list[int]] = []  # ... and their positions in the list
    for d, prog in enumerate(sc.programs):
        keys_d, at_d = [], []
        produced: dict[tuple, int] = {}  # what is at hand on this device, and from which position
        for i, a in enumerate(prog):
            op = a.op
            if op in COMM_OPS:
                k = msg_key(a)
                book = sends if op in SEND_OPS else recvs
                if k in book:
                    raise _fail(sc, d, i, a, "this message is moved twice")
                book[k] = (d, i)
                keys_d.append(k)
                at_d.append(i)
                if op in SEND_OPS:
                    need = ("F" if op == SEND_F else "B", a.stage, a.microbatch)
                    if need not in produced:
                        raise _deadlock(sc, d, i, a, f"it sends the result of {need[0]}(stage {need[1]}, mb "
                                        f"{need[2]}), which this device has not computed by then")
                else:
                    direction, src, _, mb = message_of(a)
                    produced[("in", direction, src, mb)] = i
                continue
            for need, what in _needs(sc, d, a):
                if need not in produced:
                    raise _deadlock(sc, d, i, a, f"it needs {what}, which this device has not "
                                    f"{'received' if need[0] == 'in' else 'computed'} by then")
            if op in (F, B, I, W):
                produced[("B" if op == I else op, a.stage, a.microbatch)] = i
        comm.append(keys_d)
        comm_at.append(at_d)
    for k, (d, i) in sends.items():
        if k not in recvs:
            dst = message_of(sc.programs[d][i])[2]
            raise _fail(sc, d, i, sc.programs[d][i], f"no device receives it (device {placement[dst]} should)")
    for k, (d, i) in recvs.items():
        if k not in sends:
            src = message_of(sc.programs[d][i])[1]
            raise _fail(sc, d, i, sc.programs[d][i], f"no device sends it (device {placement[src]} should)")
        d2, i2 = sends[k]
        for (x, j), other in (((d, i), d2), ((d2, i2), d)):
            if sc.programs[x][j].peer != other:
                raise _fail(sc, x, j, sc.programs[x][j], f"names peer {sc.programs[x][j].peer}, but the other end "
                            f"of this message is device {other}")
    pos = [0] * P
    work = list(range(P))
    while work:
        d = work.pop()
        keys_d = comm[d]
        while pos[d] < len(keys_d):
            k = keys_d[pos[d]]
            peer = recvs[k][0] if sends[k][0] == d else sends[k][0]  # messages never stay on one device
            if pos[peer] >= len(comm[peer]) or comm[peer][pos[peer]] != k:
                break
            pos[d] += 1
            pos[peer] += 1
            work.append(peer)
    stuck = [d for d in range(P) if pos[d] < len(comm[d])]
    if stuck:
        heads = "; ".join(f"device {d} at #{comm_at[d][pos[d]]} {sc.programs[d][comm_at[d][pos[d]]]}" for d in stuck)
        raise ScheduleError(f"{sc.name}: communication deadlocks under blocking send/receive: {heads}")


def _deadlock(sc: Schedule, d: int, i: int, a: Action, why: str) -> ScheduleError:
    return ScheduleError(f"{sc.name}: communication deadlocks under blocking send/receive: device {d} waits "
                         f"forever at #{i} {a}: {why}")


def _needs(sc: Schedule, d: int, a: Action) -> list[tuple[tuple, str]]:
    """What a compute action needs at hand on its device: local results, or received messages."""
    s, n, S = a.stage, a.microbatch, sc.num_stages
    out: list[tuple[tuple, str]] = []
    if a.op == F and s > 0:
        if sc.placement[s - 1] == d:
            out.append((("F", s - 1, n), f"F(stage {s - 1}, mb {n})"))
        else:
            out.append((("in", "F", s - 1, n), f"the activation of stage {s - 1}, mb {n} (a RECV_F)"))
    elif a.op in (B, I):
        out.append((("F", s, n), f"F(stage {s}, mb {n})"))
        if s < S - 1:
            if sc.placement[s + 1] == d:
                out.append((("B", s + 1, n), f"B/I(stage {s + 1}, mb {n})"))
            else:
                out.append((("in", "B", s + 1, n), f"the gradient from stage {s + 1}, mb {n} (a RECV_B)"))
    elif a.op == W:
        out.append((("B", s, n), f"I(stage {s}, mb {n})"))
    return out


_C = OP_CODE
_COMPUTE = len(COMPUTE_OPS)  # codes below this are compute ops


def _structure_ok(sc: Schedule) -> bool:
    """The checks of `_check_structure`, over columns: True when all of them pass."""
    p, P, S, m = sc.programs, sc.num_devices, sc.num_stages, sc.microbatches
    if len(p) != P or any(not 0 <= d < P for d in sc.placement) or (p.op < 0).any():
        return False
    if not _pairs_ok(p):
        return False
    comp = p.op < _COMPUTE
    op, st, mb, ver = p.op[comp], p.stage[comp], p.microbatch[comp], p.version[comp]
    dev = p.device()[comp]
    row = np.flatnonzero(comp)
    if ((st < 0) | (st >= S)).any():
        return False
    placement = np.asarray(sc.placement, dtype=np.int64)
    if (placement[st] != dev).any():
        return False
    if (op == _C[REDUCE]).any() or (op == _C[RECOMPUTE]).any() or (op == _C[UNSHARD]).any():
        return False  # the exact check places reductions and recomputes (`_check_reductions`, `_check_recomputes`)
    step = op == _C[STEP]
    work = ~step
    if ((mb[work] < 0) | (mb[work] >= m)).any():
        return False
    kinds = (F, B, I, W) if sc.split_backward else (F, B)
    slot = np.full(len(_C), -1)
    for k, name in enumerate(kinds):
        slot[_C[name]] = k
    wslot = slot[op[work]]
    if (wslot < 0).any():
        return False
    counts = np.bincount((wslot * S + st[work]) * m + mb[work], minlength=len(kinds) * S * m)
    if len(counts) != len(kinds) * S * m:
        return False
    counts = counts.reshape(len(kinds), S * m)
    if (counts[0] != 1).any():
        return False
    if sc.split_backward:  # B alone, or I and W
        c_b, c_i, c_w = counts[1], counts[2], counts[3]
        if not (((c_b == 1) & (c_i == 0) & (c_w == 0)) | ((c_b == 0) & (c_i == 1) & (c_w == 1))).all():
            return False
    elif (counts[1] != 1).any():
        return False
    if not sc.asynchronous and step.any():  # no work after a device's first step
        first_step = np.full(P, np.iinfo(np.int64).max)
        np.minimum.at(first_step, dev[step], row[step])
        last_work = np.full(P, -1)
        np.maximum.at(last_work, dev[work], row[work])
        if (first_step < last_work).any():
            return False
    if (ver[step] < 0).any():
        return False
    is_f = op == _C[F]
    fwd_ver = np.zeros(S * m, dtype=np.int64)
    fwd_ver[st[is_f] * m + mb[is_f]] = ver[is_f]
    back = work & ~is_f
    if (fwd_ver[st[back] * m + mb[back]] != ver[back]).any():
        return False
    used = is_f & (ver != 0)
    if used.any():  # a version a forward uses was created by an earlier STEP on its device
        V = int(max(ver.max(), 0)) + 1
        if (ver[used] < 0).any():
            return False
        born = np.full(S * V, np.iinfo(np.int64).max)
        np.minimum.at(born, st[step] * V + ver[step], row[step])
        if (born[st[used] * V + ver[used]] > row[used]).any():
            return False
    return True


def _pairs_ok(p) -> bool:
    """The checks of `_pair_problem`, over columns."""
    pr = np.flatnonzero(p.op == _C[OVERLAP_F_B])
    if not len(pr):
        return True
    n = len(p.op)
    if (pr + 2 >= n).any():
        return False
    dev = p.device()
    fm, bm = pr + 1, pr + 2
    return bool(((p.stage[pr] == -1) & (p.microbatch[pr] == -1) & (dev[bm] == dev[pr])
                 & (p.op[fm] == _C[F]) & (p.op[bm] == _C[B])
                 & ((p.stage[fm] != p.stage[bm]) | (p.microbatch[fm] != p.microbatch[bm]))).all())


def _communication_ok(sc: Schedule) -> bool:
    """`check_communication` over columns, using the lowering's order keys as the deadlock proof.

    Keys that increase along every device's messages, equal at both ends of each message,
    give an order in which every SEND meets its RECV; without keys (a hand-made lowered
    schedule) the answer is no and the exact check decides.
    """
    p = sc.programs
    if p.order is None or len(p.order) != p.num_actions:
        return False
    S, M = sc.num_stages, sc.microbatches
    placement = np.asarray(sc.placement, dtype=np.int64)
    op, st, mb = p.op, p.stage, p.microbatch
    dev = p.device()
    rows = np.arange(len(op))
    is_sf, is_rf, is_sb, is_rb = (op == _C[SEND_F]), (op == _C[RECV_F]), (op == _C[SEND_B]), (op == _C[RECV_B])
    send, recv = is_sf | is_sb, is_rf | is_rb
    # A message is (direction, boundary b between stages b and b+1, micro-batch).
    boundary = np.where(is_sf, st, np.where(is_rf, st - 1, np.where(is_sb, st - 1, st)))
    comm = send | recv
    if ((boundary[comm] < 0) | (boundary[comm] >= S - 1) | (mb[comm] < 0) | (mb[comm] >= M)).any():
        return False
    mid = ((is_sb | is_rb).astype(np.int64) * S + boundary) * M + mb
    s_rows, r_rows = rows[send], rows[recv]
    s_order, r_order = np.argsort(mid[s_rows], kind="stable"), np.argsort(mid[r_rows], kind="stable")
    s_rows, r_rows = s_rows[s_order], r_rows[r_order]
    if len(s_rows) != len(r_rows) or not np.array_equal(mid[s_rows], mid[r_rows]):
        return False
    if len(s_rows) and (np.diff(mid[s_rows]) == 0).any():
        return False
    if ((p.peer[s_rows] != dev[r_rows]) | (p.peer[r_rows] != dev[s_rows])).any():
        return False
    if (p.order[s_rows] != p.order[r_rows]).any():
        return False
    c_rows = rows[comm]
    same_dev = dev[c_rows[1:]] == dev[c_rows[:-1]]
    if (same_dev & (p.order[c_rows[1:]] <= p.order[c_rows[:-1]])).any():
        return False
    # What each action needs at hand on its device, and where that is: items are results
    # (kind 0 F, 1 B/I, 2 W) and received inputs (3 activation into stage s, 4 gradient into s).
    is_f, is_bi, is_w = op == _C[F], (op == _C[B]) | (op == _C[I]), op == _C[W]
    key = np.full(len(op), -1, dtype=np.int64)
    kind = np.select([is_f, is_bi, is_w, is_rf, is_rb], [0, 1, 2, 3, 4], -1)
    has = kind >= 0
    key[has] = (kind[has] * S + st[has]) * M + mb[has]
    at = np.full(5 * S * M + 1, -1, dtype=np.int64)
    at[key[has]] = rows[has]
    sp = np.clip(st, 0, S - 1)
    f_in = np.where(placement[np.clip(sp - 1, 0, None)] == dev, (0 * S + sp - 1) * M + mb, (3 * S + sp) * M + mb)
    b_in = np.where(placement[np.clip(sp + 1, None, S - 1)] == dev, (1 * S + sp + 1) * M + mb,
                    (4 * S + sp) * M + mb)
    need1 = np.select([is_sf, is_sb, is_f & (st > 0), is_bi, is_w],
                      [(0 * S + sp) * M + mb, (1 * S + sp) * M + mb, f_in, (0 * S + sp) * M + mb,
                       (1 * S + sp) * M + mb], -1)
    need2 = np.where(is_bi & (st < S - 1), b_in, -1)
    for need in (need1, need2):
        want = need >= 0
        where = at[need[want]]
        r = rows[want]
        if ((where < 0) | (where >= r) | (dev[np.maximum(where, 0)] != dev[r])).any():
            return False
    return True
