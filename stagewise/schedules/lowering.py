"""Derive the communication of a schedule from its compute actions.

Every dependency between stages on different devices becomes a SEND on the producer's
device and a RECV on the consumer's. All of them are placed by one global order (the
unit-cost execution of the schedule: compute by start time, a message at the moment its
producer ends), so any two devices post their messages to each other in the same order.
That makes the program deadlock-free even under blocking, rendezvous point-to-point
semantics (NCCL's per-pair streams): run the global order and every step is possible.
"""

from __future__ import annotations

from dataclasses import replace

from stagewise.schedules.actions import RECV_B, RECV_F, SEND_B, SEND_F, Action, B, F, I, Schedule, W
from stagewise.schedules.engine import execute

UNIT_COSTS = {F: 1.0, B: 2.0, I: 1.0, W: 1.0}


def unit_times(schedule: Schedule) -> tuple[list[list[float]], list[list[float]]]:
    """Start and end of every compute action under unit costs: the global order `lower` follows."""
    return execute(schedule, lambda a: UNIT_COSTS.get(a.op, 0.0))


def lower(schedule: Schedule, times: tuple[list[list[float]], list[list[float]]] | None = None) -> Schedule:
    """Return `schedule` with SEND/RECV actions added (a no-op if it already has them).

    `times` are `unit_times(schedule)` when the caller has them already (integral by construction).
    """
    if schedule.lowered:
        return schedule
    starts, ends = times if times is not None else unit_times(schedule)
    placement, S, P = schedule.placement, schedule.num_stages, schedule.num_devices
    progs = [schedule.compute_actions(d) for d in range(P)]
    L = max((len(p) for p in progs), default=0) + 1
    # One integer per event: (time, compute after messages, device, index) in mixed radix. Unit
    # costs make every time an integer, so the order is exact.
    keys: list[list[int]] = [[] for _ in range(P)]
    acts: list[list[Action]] = [[] for _ in range(P)]
    for d, prog in enumerate(progs):
        st, en, kd, ad = starts[d], ends[d], keys[d], acts[d]
        for i, a in enumerate(prog):
            kd.append(((int(st[i]) * 2 + 1) * P + d) * L + i)
            ad.append(a)
            op, s = a.op, a.stage
            if op == F:
                if s < S - 1 and placement[s + 1] != d:
                    dst, kind_send, kind_recv, peer_stage = placement[s + 1], SEND_F, RECV_F, s + 1
                else:
                    continue
            elif op == B or op == I:
                if s > 0 and placement[s - 1] != d:
                    dst, kind_send, kind_recv, peer_stage = placement[s - 1], SEND_B, RECV_B, s - 1
                else:
                    continue
            else:
                continue
            key = ((int(en[i]) * 2) * P + d) * L + i
            kd.append(key)
            ad.append(Action(kind_send, s, a.microbatch, a.version, dst))
            keys[dst].append(key)
            acts[dst].append(Action(kind_recv, peer_stage, a.microbatch, 0, d))
    actions = []
    for kd, ad in zip(keys, acts):
        order = sorted(range(len(kd)), key=kd.__getitem__)
        actions.append(tuple(ad[j] for j in order))
    return replace(schedule, actions=tuple(actions), lowered=True)


def message_of(a: Action) -> tuple[str, int, int, int]:
    """The message a SEND or RECV moves: (direction, source stage, destination stage, micro-batch)."""
    if a.op == SEND_F:
        return ("F", a.stage, a.stage + 1, a.microbatch)
    if a.op == RECV_F:
        return ("F", a.stage - 1, a.stage, a.microbatch)
    if a.op == SEND_B:
        return ("B", a.stage, a.stage - 1, a.microbatch)
    return ("B", a.stage + 1, a.stage, a.microbatch)
