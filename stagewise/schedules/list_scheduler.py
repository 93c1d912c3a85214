"""Build a device order by list scheduling: simulate unit costs, let a policy pick each next action.

Schedules whose closed form only exists for special (P, m) (Megatron's interleaving wants
m % P == 0, zero-bubble papers draw m >= 2P) are generated here for any m: the policy
says what each device prefers, the simulation guarantees that every picked action is
ready, so the result is valid by construction. The output is still plain data.

The simulation moves from one completion time to the next and lets every free device
choose at once (nothing started at time t can finish by t, so devices choosing at the
same moment cannot affect each other); the policy decides for all devices in one call,
on arrays, which keeps a million-action schedule to a fraction of a second.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from stagewise.schedules.actions import B, F, I, ScheduleError, W
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule

# What a policy returns per device: NONE, or the kind of action and the chunk it is for.
NONE, FWD, BWD, WGT = -1, 0, 1, 2


@dataclass
class Ready:
    """What the policy sees at time `t`, for every device d and chunk c (arrays shaped (virtual_stages, P)).

    `f`, `b`, `w`: the chunk's next forward, backward (B, or I when split) and weight-gradient
    piece can start now on a free device. `inflight[d]` counts chunk forwards started whose
    last backward piece has not started; `inflight_i[d]` the same, released at I.
    `f_stage`, `b_stage` give the same readiness per stage (device freedom included).
    """

    t: float
    f: np.ndarray
    b: np.ndarray
    w: np.ndarray
    f_stage: np.ndarray
    b_stage: np.ndarray
    inflight: np.ndarray
    inflight_i: np.ndarray


# A policy returns (kind per device, chunk per device); it sees only free devices as ready.
Policy = Callable[[Ready], tuple[np.ndarray, np.ndarray]]


@dataclass
class Listed:
    """The compute actions a list schedule placed: flat rows with their start under unit costs."""

    device: np.ndarray
    op: np.ndarray
    stage: np.ndarray
    microbatch: np.ndarray
    start: np.ndarray
    device_free: np.ndarray  # when each device finished its last action


def list_schedule(
    placement: tuple[int, ...],
    devices: int,
    microbatches: int,
    split_backward: bool,
    policy: Policy,
    costs: tuple[float, float, float, float] = (1.0, 2.0, 1.0, 1.0),
) -> Listed:
    """Run the policy until every device has placed all its F, B (or I and W) actions."""
    S, m, P = len(placement), microbatches, devices
    place = np.asarray(placement, dtype=np.int64)
    virtual_stages = S // P
    stage_of = np.zeros((virtual_stages, P), dtype=np.int64)
    seen = np.zeros(P, dtype=np.int64)
    for s, d in enumerate(placement):  # chunk c of device d = its c-th stage in stage order
        stage_of[seen[d], d] = s
        seen[d] += 1
    cost_f, cost_b, cost_i, cost_w = costs
    cost_back = cost_i if split_backward else cost_b
    inf = np.inf
    # End times per (stage, micro-batch), plus m slots of "no dependency" (the input of
    # stage 0, the gradient into the last stage) so that every lookup is one index.
    fend = np.full(S * m + m, inf)
    bend = np.full(S * m + m, inf)
    fend[S * m:] = -inf
    bend[S * m:] = -inf
    nxt_f, nxt_b, nxt_w = (np.zeros(S, dtype=np.int64) for _ in range(3))
    inflight, inflight_i = np.zeros(P, dtype=np.int64), np.zeros(P, dtype=np.int64)
    remaining = np.bincount(place, minlength=P) * m * (3 if split_backward else 2)
    busy = np.zeros(P)
    stages = np.arange(S)
    own_base = stages * m
    prev_base = np.where(stages > 0, own_base - m, S * m)
    next_base = np.where(stages < S - 1, own_base + m, S * m)
    code_f, code_b, code_w = OP_CODE[F], OP_CODE[I] if split_backward else OP_CODE[B], OP_CODE[W]
    last = m - 1
    rows: list[tuple] = []
    t = 0.0
    ready_w = np.zeros((virtual_stages, P), dtype=bool)
    while True:
        free_s = ((busy <= t) & (remaining > 0))[place]
        nf = np.minimum(nxt_f, last)
        f_ok = free_s & (nxt_f < m) & (fend[prev_base + nf] <= t)
        nb = np.minimum(nxt_b, last)
        b_ok = free_s & (nxt_b < nxt_f) & (fend[own_base + nb] <= t) & (bend[next_base + nb] <= t)
        if split_backward:
            w_ok = free_s & (nxt_w < nxt_b) & (bend[own_base + np.minimum(nxt_w, last)] <= t)
            ready_w = w_ok[stage_of]
        kind, chunk = policy(Ready(t, f_ok[stage_of], b_ok[stage_of], ready_w, f_ok, b_ok, inflight, inflight_i))
        chosen = np.flatnonzero(kind >= 0)
        if len(chosen):
            k = kind[chosen]
            s = stage_of[chunk[chosen], chosen]
            n = np.empty(len(chosen), dtype=np.int64)
            code = np.empty(len(chosen), dtype=np.int64)
            end = np.empty(len(chosen))
            f, b = k == FWD, k == BWD
            if f.any():
                sf, df = s[f], chosen[f]
                n[f] = nf_ = nxt_f[sf]
                fend[sf * m + nf_] = end[f] = t + cost_f
                code[f] = code_f
                nxt_f[sf] += 1
                inflight[df] += 1
                inflight_i[df] += 1
            if b.any():
                sb, db = s[b], chosen[b]
                n[b] = nb_ = nxt_b[sb]
                bend[sb * m + nb_] = end[b] = t + cost_back
                code[b] = code_b
                nxt_b[sb] += 1
                inflight_i[db] -= 1
                if not split_backward:
                    inflight[db] -= 1
            w = k == WGT
            if w.any():
                sw = s[w]
                n[w] = nxt_w[sw]
                end[w] = t + cost_w
                code[w] = code_w
                nxt_w[sw] += 1
                inflight[chosen[w]] -= 1
            busy[chosen] = end
            remaining[chosen] -= 1
            rows.append((chosen, code, s, n, t))
        running = busy[busy > t]
        if not len(running):
            if remaining.any():
                stuck = np.flatnonzero(remaining).tolist()
                raise ScheduleError(f"list scheduler: devices {stuck} have work left but nothing can ever run")
            break
        t = float(running.min())
    if not rows:
        e = np.zeros(0, dtype=np.int64)
        return Listed(e, e, e, e, np.zeros(0), busy)
    cols = [np.concatenate(c) for c in list(zip(*rows))[:4]]
    start = np.repeat(np.array([r[4] for r in rows]), [len(r[0]) for r in rows])
    return Listed(cols[0], cols[1], cols[2], cols[3], start, busy)


def schedule_from_listed(name: str, P: int, m: int, placement: tuple[int, ...], listed: Listed,
                         split_backward: bool = False) -> Schedule:
    """The schedule of a list-scheduled run, with each device's optimizer step (version 1) at its end.

    The run's start times go along as the unit-cost execution `validate` checks and reuses.
    """
    progs = Programs.flushed(P, listed.device, listed.op, listed.stage, listed.microbatch,
                             start=listed.start, device_free=listed.device_free)
    return Schedule(name, P, m, placement, progs, split_backward=split_backward)
