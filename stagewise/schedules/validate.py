"""Check that a schedule is a correct pipeline program, naming the first offending action."""

from __future__ import annotations

from stagewise.schedules.actions import (
    COMM_OPS,
    COMPUTE_OPS,
    RECV_B,
    RECV_F,
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
    """Match every SEND with one RECV and run the programs under rendezvous semantics."""
    P, placement = sc.num_devices, sc.placement
    sends: dict[tuple, tuple[int, int]] = {}
    recvs: dict[tuple, tuple[int, int]] = {}
    for d, prog in enumerate(sc.actions):
        for i, a in enumerate(prog):
            if a.op in (SEND_F, SEND_B, RECV_F, RECV_B):
                msg = message_of(a)
                book = sends if a.op in (SEND_F, SEND_B) else recvs
                if msg in book:
                    raise _fail(sc, d, i, a, "this message is moved twice")
                book[msg] = (d, i)
    for msg, (d, i) in sends.items():
        if msg not in recvs:
            raise _fail(sc, d, i, sc.actions[d][i], f"no device receives it (device {placement[msg[2]]} should)")
    for msg, (d, i) in recvs.items():
        if msg not in sends:
            raise _fail(sc, d, i, sc.actions[d][i], f"no device sends it (device {placement[msg[1]]} should)")
    # Rendezvous execution: a SEND and its RECV happen together, when both devices are at them.
    pos = [0] * P
    have: set[tuple] = set()  # ("F"|"B"|"W", stage, mb) computed, ("in", dir, stage, mb) data at hand
    work = list(range(P))
    while work:
        d = work.pop()
        prog = sc.actions[d]
        while pos[d] < len(prog):
            a = prog[pos[d]]
            if a.op in COMPUTE_OPS:
                if not _inputs_here(sc, d, a, have):
                    break
                have.add(("B" if a.op == I else a.op, a.stage, a.microbatch))
                pos[d] += 1
                continue
            msg = message_of(a)
            if a.op in (SEND_F, SEND_B):
                if (msg[0], msg[1], msg[3]) not in have:
                    break  # the producer has not run yet
                peer = placement[msg[2]]
            else:
                peer = placement[msg[1]]
            other = sc.actions[peer][pos[peer]] if pos[peer] < len(sc.actions[peer]) else None
            if other is None or other.op not in COMM_OPS or message_of(other) != msg or other.op == a.op:
                break
            if a.op in (SEND_F, SEND_B) and (msg[0], msg[1], msg[3]) not in have:
                break
            if other.op in (SEND_F, SEND_B) and (msg[0], msg[1], msg[3]) not in have:
                break
            have.add(("in", *msg))
            pos[d] += 1
            pos[peer] += 1
            work.append(peer)
    stuck = [d for d in range(P) if pos[d] < len(sc.actions[d])]
    if stuck:
        heads = "; ".join(f"device {d} at #{pos[d]} {sc.actions[d][pos[d]]}" for d in stuck)
        raise ScheduleError(f"{sc.name}: communication deadlocks under blocking send/receive: {heads}")


def _inputs_here(sc: Schedule, d: int, a: Action, have: set[tuple]) -> bool:
    s, n, S = a.stage, a.microbatch, sc.num_stages
    if a.op == F and s > 0:
        return ("F", s - 1, n) in have if sc.placement[s - 1] == d else ("in", "F", s - 1, s, n) in have
    if a.op in (B, I):
        if ("F", s, n) not in have:
            return False
        if s < S - 1:
            return ("B", s + 1, n) in have if sc.placement[s + 1] == d else ("in", "B", s + 1, s, n) in have
    if a.op == W:
        return ("B", s, n) in have
    return True
