"""DualPipeV (DeepSeek 2025): DualPipe folded into a V, with a forward and a backward overlapped in one action.

The overlapped pair is one action in the lists: an OVERLAP_F_B row followed by its two
members, the forward of one micro-batch and the full backward of another (see
`actions.OVERLAP_F_B`). Validation, lowering, the simulator (`Costs.overlap`) and the
timelines all see it; a CPU runs the members one after the other.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import OVERLAP_F_B, B, F, I, ScheduleError, W
from stagewise.schedules.placement import check_args, v_shape
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule


def dualpipev(devices: int, microbatches: int, virtual_stages: int = 2) -> Schedule:
    """DualPipeV: two virtual stages per device in a V (stages d and 2P-1-d), steady state of overlapped F+B pairs.

    DeepSeek's order (deepseek-ai/DualPipe, `dualpipev.py`; also torch's `ScheduleDualPipeV`),
    device d of P, first chunk stage d, second chunk stage 2P-1-d:
    1. 2(P-d-1) forwards of the first chunk;
    2. d+1 times: a forward of each chunk;
    3. P-d-1 times: I of the second chunk, the oldest pending W, a forward of the second chunk;
    4. m-2P+d+1 times: the pair (F first chunk, B second chunk), then the pair (F second chunk,
       B first chunk); the very first of these on the last device runs unpaired;
    5. P-d-1 times: B of the second chunk, then the pair (F second chunk, B first chunk);
    6. d+1 times: a backward of each chunk, full for the first half, then split (I, W later);
    7. P-d-1 times: the oldest pending W, then I of the first chunk;
    8. the remaining W's.
    The order is written for n = max(m, 2P) micro-batches (DualPipeV needs 2P) and the actions of
    micro-batches past m are dropped (a pair that loses a member runs the other alone), so any
    m works. The backward is full B in the pairs and split into I and W elsewhere.
    """
    check_args("dualpipev", devices, microbatches, virtual_stages)
    if virtual_stages != 2:
        raise ScheduleError(f"dualpipev: places exactly two virtual stages per device in a V, so virtual_stages "
                            f"must be 2 "
                            f"(got {virtual_stages})")
    P, m = devices, microbatches
    n = max(m, 2 * P)
    rows: list[tuple[int, str, int, int]] = []  # (device, op, stage, micro-batch); a pair is three rows
    for d in range(P):
        for op, stage, mb in _device_order(d, P, n, m):
            rows.append((d, op, stage, mb))
    dev = np.array([r[0] for r in rows], dtype=np.int64)
    op = np.array([OP_CODE[r[1]] for r in rows], dtype=np.int64)
    stage = np.array([r[2] for r in rows], dtype=np.int64)
    mb = np.array([r[3] for r in rows], dtype=np.int64)
    return Schedule("dualpipev", P, m, v_shape(P), Programs.flushed(P, dev, op, stage, mb), split_backward=True)


def _device_order(d: int, P: int, n: int, m: int) -> list[tuple[str, int, int]]:
    """Device d's actions as (op, stage, micro-batch) rows for n micro-batches, those of micro-batches >= m left out."""
    s0, s1 = d, 2 * P - 1 - d
    fwd = {s0: 0, s1: 0}
    bwd = {s0: 0, s1: 0}  # B and I share the count: each is the backward of the next micro-batch
    waiting: list[tuple[int, int]] = []  # I's whose W is still to run, oldest first
    steps: list[tuple] = []

    def forward(s: int) -> tuple[str, int, int]:
        fwd[s] += 1
        return (F, s, fwd[s] - 1)

    def backward(s: int, split: bool) -> tuple[str, int, int]:
        bwd[s] += 1
        if split:
            waiting.append((s, bwd[s] - 1))
        return (I if split else B, s, bwd[s] - 1)

    def weight() -> None:
        if waiting:
            s, x = waiting.pop(0)
            steps.append((W, s, x))

    def pair(sf: int, sb: int) -> None:
        steps.append((OVERLAP_F_B, forward(sf), backward(sb, False)))

    steps.extend(forward(s0) for _ in range(2 * (P - d - 1)))
    for _ in range(d + 1):
        steps += [forward(s0), forward(s1)]
    for _ in range(P - d - 1):
        steps.append(backward(s1, True))
        weight()
        steps.append(forward(s1))
    for i in range(n - 2 * P + d + 1):
        if i == 0 and d == P - 1:
            steps += [forward(s0), backward(s1, False)]
        else:
            pair(s0, s1)
        pair(s1, s0)
    for _ in range(P - d - 1):
        steps.append(backward(s1, False))
        pair(s1, s0)
    split = False
    for i in range(d + 1):
        if i == (d + 1) // 2 and d % 2 == 1:
            split = True
        steps.append(backward(s1, split))
        if i == (d + 1) // 2 and d % 2 == 0:
            split = True
        steps.append(backward(s0, split))
    for _ in range(P - d - 1):
        weight()
        steps.append(backward(s0, split))
    while waiting:
        weight()
    out: list[tuple[str, int, int]] = []
    for step in steps:
        if step[0] != OVERLAP_F_B:
            if step[2] < m:
                out.append(step)
            continue
        members = [a for a in step[1:] if a[2] < m]
        if len(members) == 2:
            out.append((OVERLAP_F_B, -1, -1))
        out += members
    return out
