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
    """Return `schedule` with SEND/RECV actions added (a no-op if it already has them)."""
    if schedule.lowered:
        return schedule
    starts, ends = times if times is not None else unit_times(schedule)
    placement, S = schedule.placement, schedule.num_stages
    keyed: list[list[tuple[tuple, Action]]] = [[] for _ in range(schedule.num_devices)]
    for d in range(schedule.num_devices):
        for i, a in enumerate(schedule.compute_actions(d)):
            keyed[d].append(((starts[d][i], 1, d, i), a))
            s, n, t = a.stage, a.microbatch, ends[d][i]
            if a.op == F and s < S - 1 and placement[s + 1] != d:
                dst = placement[s + 1]
                key = (t, 0, d, i)
                keyed[d].append((key, Action(SEND_F, s, n, a.version, dst)))
                keyed[dst].append((key, Action(RECV_F, s + 1, n, 0, d)))
            elif a.op in (B, I) and s > 0 and placement[s - 1] != d:
                dst = placement[s - 1]
                key = (t, 0, d, i)
                keyed[d].append((key, Action(SEND_B, s, n, a.version, dst)))
                keyed[dst].append((key, Action(RECV_B, s - 1, n, 0, d)))
    actions = tuple(tuple(a for _, a in sorted(k, key=lambda x: x[0])) for k in keyed)
    return replace(schedule, actions=actions, lowered=True)


def message_of(a: Action) -> tuple[str, int, int, int]:
    """The message a SEND or RECV moves: (direction, source stage, destination stage, micro-batch)."""
    if a.op == SEND_F:
        return ("F", a.stage, a.stage + 1, a.microbatch)
    if a.op == RECV_F:
        return ("F", a.stage - 1, a.stage, a.microbatch)
    if a.op == SEND_B:
        return ("B", a.stage, a.stage - 1, a.microbatch)
    return ("B", a.stage + 1, a.stage, a.microbatch)
