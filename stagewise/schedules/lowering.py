"""Derive the communication of a schedule from its compute actions.

Every dependency between stages on different devices becomes a SEND on the producer's
device and a RECV on the consumer's. All of them are placed by one global order (the
unit-cost execution of the schedule: compute by start time, a message at the moment its
producer ends), so any two devices post their messages to each other in the same order.
That makes the program deadlock-free even under blocking, rendezvous point-to-point
semantics (NCCL's per-pair streams): run the global order and every step is possible.
The order keys stay with the lowered schedule (`Programs.order`) as the certificate
`validate` checks.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from stagewise.schedules.actions import RECV_B, RECV_F, SEND_B, SEND_F, Action, B, F, I
from stagewise.schedules.execution import WORK_CODES, Compiled, compile_schedule, pair_rows, unit_execution
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule


def lower(schedule: Schedule) -> Schedule:
    """Return `schedule` with SEND/RECV actions added (a no-op if it already has them)."""
    if schedule.lowered:
        return schedule
    c = compile_schedule(schedule)
    start, end = unit_execution(schedule)
    P, S = schedule.num_devices, schedule.num_stages
    placement = np.asarray(schedule.placement, dtype=np.int64)
    progs, dev = c.programs, c.device
    N = c.n
    op, st = progs.op, progs.stage
    local = np.arange(N, dtype=np.int64) - progs.offsets[:-1][dev] if N else np.zeros(0, dtype=np.int64)
    L = int(np.diff(progs.offsets).max(initial=0)) + 1
    # One integer per event: (time, compute after messages, device, index) in mixed radix. Unit
    # costs make every time an integer, so the order is exact. The members of an overlapped pair
    # take their pair's time, so nothing comes between them: what they receive goes before the
    # pair, what they send after it.
    at = start.copy()
    pair, fm, bm = pair_rows(c)
    at[fm] = at[bm] = start[pair]
    ckey = ((at.astype(np.int64) * 2 + 1) * P + dev) * L + local
    is_f = op == OP_CODE[F]
    is_b = (op == OP_CODE[B]) | (op == OP_CODE[I])
    nxt = placement[np.minimum(st + 1, S - 1)]
    prv = placement[np.maximum(st - 1, 0)]
    send_f = is_f & (st < S - 1) & (nxt != dev)
    send_b = is_b & (st > 0) & (prv != dev)
    sends = np.flatnonzero(send_f | send_b)
    fwd = send_f[sends]
    dst = np.where(fwd, nxt[sends], prv[sends])
    mkey = ((end[sends].astype(np.int64) * 2) * P + dev[sends]) * L + local[sends]
    n_s = len(sends)
    code = np.array([OP_CODE[SEND_F], OP_CODE[SEND_B], OP_CODE[RECV_F], OP_CODE[RECV_B]], dtype=np.int8)
    device = np.concatenate([dev, dev[sends], dst])
    ops = np.concatenate([op, np.where(fwd, code[0], code[1]), np.where(fwd, code[2], code[3])])
    stage = np.concatenate([st, st[sends], np.where(fwd, st[sends] + 1, st[sends] - 1)])
    mb = np.concatenate([progs.microbatch, progs.microbatch[sends], progs.microbatch[sends]])
    version = np.concatenate([progs.version, progs.version[sends], np.zeros(n_s, dtype=np.int64)])
    peer = np.concatenate([np.full(N, -1, dtype=np.int64), dst, dev[sends]])
    times = np.concatenate([start, np.full(2 * n_s, np.nan)])
    keys = np.concatenate([ckey, mkey, mkey])
    out = Programs.from_rows(P, device, ops, stage, mb, version, peer, start=times, order=keys, sort=keys)
    lowered = replace(schedule, programs=out, lowered=True)
    # The compute rows and their unit execution are those of `schedule`: share them.
    lowered.programs.cached("compiled", lambda: _relabel(c, out))
    lowered.programs.cached("unit", lambda: (start, end))
    return lowered


def _relabel(c: Compiled, out: Programs) -> Compiled:
    """The same compiled dependencies, on the lowered programs (compute rows keep their order)."""
    mask = np.isin(out.op, WORK_CODES)
    return Compiled(out.select(mask), c.device, c.unit_cost, c.dep1, c.dep2, c.key1, c.key2,
                    c.cross1, c.cross2, c.S, c.K)


def message_of(a: Action) -> tuple[str, int, int, int]:
    """The message a SEND or RECV moves: (direction, source stage, destination stage, micro-batch)."""
    if a.op == SEND_F:
        return ("F", a.stage, a.stage + 1, a.microbatch)
    if a.op == RECV_F:
        return ("F", a.stage - 1, a.stage, a.microbatch)
    if a.op == SEND_B:
        return ("B", a.stage, a.stage - 1, a.microbatch)
    return ("B", a.stage + 1, a.stage, a.microbatch)
