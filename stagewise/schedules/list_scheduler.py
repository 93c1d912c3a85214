"""Build a device order by list scheduling: simulate unit costs, let a policy pick each next action.

Schedules whose closed form only exists for special (P, m) (Megatron's interleaving wants
m % P == 0, zero-bubble papers draw m >= 2P) are generated here for any m: the policy
says what each device prefers, the simulation guarantees that every picked action is
ready, so the result is valid by construction. The output is still plain data.
"""

from __future__ import annotations

import heapq
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from stagewise.schedules.actions import Action, B, F, I, ScheduleError

# (op, stage, microbatch)
Choice = tuple[str, int, int]


@dataclass
class DeviceState:
    """What a policy sees about one device when it is free to start something."""

    device: int
    time: float
    forwards: list[tuple[int, int]]  # ready (stage, micro-batch) forwards, at most one per stage
    backwards: list[tuple[int, int]]  # ready B (or I) per stage
    weights: list[tuple[int, int]]  # ready W per stage (split backward only)
    inflight: int  # chunk forwards started whose last backward part has not started
    inflight_until_input_grad: int  # same, but released at I
    extra: dict = field(default_factory=dict)


Policy = Callable[[DeviceState], Choice | None]


def list_schedule(
    placement: tuple[int, ...],
    devices: int,
    microbatches: int,
    split_backward: bool,
    policy: Policy,
    costs: tuple[float, float, float, float] = (1.0, 2.0, 1.0, 1.0),
) -> list[list[Action]]:
    """Return each device's compute actions (no STEP) in the order the policy produced."""
    S, m = len(placement), microbatches
    cost_f, cost_b, cost_i, cost_w = costs
    inf = float("inf")
    stages_on = [[s for s in range(S) if placement[s] == d] for d in range(devices)]
    fend = [[inf] * m for _ in range(S)]
    bend = [[inf] * m for _ in range(S)]  # end of B, or of I when split
    next_f, next_b = [0] * S, [0] * S
    pending_w: list[deque[int]] = [deque() for _ in range(S)]
    inflight, inflight_i = [0] * devices, [0] * devices
    remaining = [len(st) * m * (3 if split_backward else 2) for st in stages_on]
    lists: list[list[Action]] = [[] for _ in range(devices)]
    # (time, sequence, device): the sequence orders devices looking again at the same time
    ready_heap = [(0.0, d, d) for d in range(devices) if remaining[d]]
    seq = devices
    ends: list[float] = []  # completion times of placed actions: when an idle device looks again
    busy_until = [0.0] * devices
    idle_streak = 0  # consecutive looks that placed nothing while no action is running
    waiting: dict[int, float] = {}  # idle device -> when it looks again
    bop = I if split_backward else B
    while ready_heap:
        t, _, d = heapq.heappop(ready_heap)
        if t < busy_until[d] or not remaining[d]:
            continue  # a stale wake-up
        fw, bw, ww = [], [], []
        for s in stages_on[d]:
            n = next_f[s]
            if n < m and (s == 0 or fend[s - 1][n] <= t):
                fw.append((s, n))
            k = next_b[s]
            if k < next_f[s] and fend[s][k] <= t and (s == S - 1 or bend[s + 1][k] <= t):
                bw.append((s, k))
            if pending_w[s] and bend[s][pending_w[s][0]] <= t:
                ww.append((s, pending_w[s][0]))
        choice = policy(DeviceState(d, t, fw, bw, ww, inflight[d], inflight_i[d])) if fw or bw or ww else None
        if choice is None:
            while ends and ends[0] <= t:
                heapq.heappop(ends)
            seq += 1
            if ends:
                heapq.heappush(ready_heap, (ends[0], seq, d))
                waiting[d] = ends[0]
            else:  # nothing running: look again after the other devices free at this time
                idle_streak += 1
                if idle_streak > devices:
                    stuck = sorted(x for x in range(devices) if remaining[x])
                    raise ScheduleError(f"list scheduler: devices {stuck} have work left but nothing can ever run")
                heapq.heappush(ready_heap, (t, seq, d))
            continue
        idle_streak = 0
        waiting.pop(d, None)
        op, s, n = choice
        if op == F:
            end = t + cost_f
            fend[s][n] = end
            next_f[s] += 1
            inflight[d] += 1
            inflight_i[d] += 1
        elif op in (B, I):
            end = t + (cost_i if split_backward else cost_b)
            bend[s][n] = end
            next_b[s] += 1
            inflight_i[d] -= 1
            if split_backward:
                pending_w[s].append(n)
            else:
                inflight[d] -= 1
        else:
            end = t + cost_w
            pending_w[s].popleft()
            inflight[d] -= 1
        lists[d].append(Action(bop if op in (B, I) else op, s, n))
        remaining[d] -= 1
        busy_until[d] = end
        heapq.heappush(ends, end)
        for other, wake in list(waiting.items()):  # an idle device must not sleep past this completion
            if wake > end:
                seq += 1
                heapq.heappush(ready_heap, (end, seq, other))
                waiting[other] = end
        if remaining[d]:
            seq += 1
            heapq.heappush(ready_heap, (end, seq, d))
    return lists
