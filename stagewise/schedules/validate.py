"""Check that a schedule is a correct pipeline program, naming the first offending action."""

from __future__ import annotations

from stagewise.schedules.actions import (
    COMM_OPS,
    COMPUTE_OPS,
    SEND_B,
    SEND_F,
    STEP,
    Action,
    B,
    F,
    I,
    Schedule,
    ScheduleError,
    W,
)
from stagewise.schedules.engine import execute
from stagewise.schedules.lowering import lower, message_of, unit_times


def validate(schedule: Schedule) -> Schedule:
    """Raise ScheduleError unless `schedule` is valid; return its lowered form.

    Checked: every (stage, micro-batch) has exactly one forward and one backward (B, or
    I then W when the backward is split), each on the device that holds the stage;
    versions agree between a forward and its backward pieces and exist when used; a
    synchronous schedule steps only after its last backward; dependencies can be met
    (no action waits for one that comes later); and the communication, lowered when
    missing, matches send for receive and cannot deadlock under blocking semantics.
    """
    _check_structure(schedule)
    if schedule.lowered:
        execute(schedule, lambda a: 1.0)
        lowered = schedule
    else:
        lowered = lower(schedule, unit_times(schedule))  # also proves every dependency can be met
    check_communication(lowered)
    return lowered


def _fail(schedule: Schedule, d: int, i: int, a: Action, why: str) -> ScheduleError:
    return ScheduleError(f"{schedule.name}: device {d} action #{i} {a}: {why}")


def _check_structure(sc: Schedule) -> None:
    P, S, m = sc.num_devices, sc.num_stages, sc.microbatches
    if len(sc.actions) != P:
        raise ScheduleError(f"{sc.name}: has {len(sc.actions)} action lists for {P} devices")
    if any(not 0 <= d < P for d in sc.placement):
        raise ScheduleError(f"{sc.name}: placement {sc.placement} names a device outside 0..{P - 1}")
    allowed = {I, W} if sc.split_backward else {B}
    seen: dict[tuple[str, int, int], tuple[int, int]] = {}
    fwd_version: dict[tuple[int, int], int] = {}
    flush_error: ScheduleError | None = None
    for d, prog in enumerate(sc.actions):
        versions = {s: {0} for s in range(S)}
        step_at = -1
        for i, a in enumerate(prog):
            if a.op in COMM_OPS:
                continue
            if a.op not in COMPUTE_OPS:
                raise _fail(sc, d, i, a, f"unknown op {a.op!r}")
            if not 0 <= a.stage < S:
                raise _fail(sc, d, i, a, f"stage outside 0..{S - 1}")
            if a.op == STEP:
                step_at = i
                versions[a.stage].add(a.version)
                continue
            if not sc.asynchronous and step_at >= 0 and flush_error is None:
                flush_error = _fail(sc, d, i, a, f"runs after the optimizer step at #{step_at}; a synchronous "
                                    "schedule steps once, after its last backward (no flush)")
            if sc.placement[a.stage] != d:
                raise _fail(sc, d, i, a, f"stage {a.stage} lives on device {sc.placement[a.stage]}, not {d}")
            if not 0 <= a.microbatch < m:
                raise _fail(sc, d, i, a, f"micro-batch outside 0..{m - 1}")
            if a.op != F and a.op not in allowed:
                kind = "split into I and W" if sc.split_backward else "a full B"
                raise _fail(sc, d, i, a, f"this schedule's backward is {kind}")
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
            for op in (F, *sorted(allowed)):
                if (op, s, n) not in seen:
                    raise ScheduleError(f"{sc.name}: {op}(stage {s}, mb {n}) never runs "
                                        f"(device {sc.placement[s]} should run it)")
    if flush_error is not None:
        raise flush_error


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
    for d, prog in enumerate(sc.actions):
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
            dst = message_of(sc.actions[d][i])[2]
            raise _fail(sc, d, i, sc.actions[d][i], f"no device receives it (device {placement[dst]} should)")
    for k, (d, i) in recvs.items():
        if k not in sends:
            src = message_of(sc.actions[d][i])[1]
            raise _fail(sc, d, i, sc.actions[d][i], f"no device sends it (device {placement[src]} should)")
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
        heads = "; ".join(f"device {d} at #{comm_at[d][pos[d]]} {sc.actions[d][comm_at[d][pos[d]]]}" for d in stuck)
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
