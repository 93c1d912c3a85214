"""V-Half and V-Min: the V-shaped building blocks of "Pipeline Parallelism with Controllable Memory" (Qi et al. 2024).

A schedule there is one building block repeated every micro-batch: on device d, the two
forwards and the two input gradients (I) of micro-batch n start at fixed offsets plus 6n
(in units where F = I = W, each chunk's action taking one unit), and the weight gradients
(W) fill the free units. How long a block lives decides the peak activation memory; the
offsets below are the paper's V-Min and V-Half blocks (two virtual stages per device in a V, stage d
and 2P-1-d). Running the blocks' order as soon as possible squeezes the warm-up and cool-down.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import F, I, ScheduleError, W
from stagewise.schedules.placement import check_args, v_shape
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule

_PERIOD = 6  # units per micro-batch and device: F, I and W of two virtual stages


def v_min(devices: int, microbatches: int, virtual_stages: int = 2) -> Schedule:
    """V-Min: about a third of 1F1B's activation memory ((P+4)/3 micro-batches), about 2/3 of its bubble.

    Block offsets on device d: forward of the first chunk at d, of the second at 2P-1-d, input
    gradient of the second chunk at 2P+g+d and of the first at 4P+g-1-d (g = 2 when 3 divides P,
    else 0), so every unit of a 6-unit period is used once. Any m works.
    """
    P = _check("v-min", devices, microbatches, virtual_stages)
    g = 2 if P % 3 == 0 else 0
    d = np.arange(P)
    offsets = np.stack([d, 2 * P - 1 - d, 2 * P + g + d, 4 * P + g - 1 - d], axis=1)
    return _from_blocks("v-min", P, microbatches, offsets)


def v_half(devices: int, microbatches: int, virtual_stages: int = 2) -> Schedule:
    """V-Half: about half of 1F1B's activation memory ((P+2)/2 micro-batches) and about half of its bubble.

    Block offsets on device d: forwards at 2d and 3P-2-d, input gradients at 3P+g+2d-1 and
    6P+g-d-2 (g = 3 when P is even, else 0). Any m works.
    """
    P = _check("v-half", devices, microbatches, virtual_stages)
    g = 3 if P % 2 == 0 else 0
    d = np.arange(P)
    offsets = np.stack([2 * d, 3 * P - 2 - d, 3 * P + g + 2 * d - 1, 6 * P + g - d - 2], axis=1)
    return _from_blocks("v-half", P, microbatches, offsets)


def _check(name: str, devices: int, microbatches: int, virtual_stages: int) -> int:
    check_args(name, devices, microbatches, virtual_stages)
    if virtual_stages != 2:
        raise ScheduleError(f"{name}: places exactly two virtual stages per device in a V, so virtual_stages must "
                            f"be 2 (got {virtual_stages})")
    return devices


def _from_blocks(name: str, P: int, m: int, offsets: np.ndarray) -> Schedule:
    """Each device's order from the repeated blocks: F/I at offset + 6n, W's in the free units.

    Kinds: 0 F first chunk, 1 F second chunk, 2 I second chunk, 3 I first chunk, 4 W second
    chunk, 5 W first chunk. A free unit takes the oldest pending W, the second chunk's first
    (its I comes first); W's left at the end follow in that order.
    """
    op_of = np.array([OP_CODE[F], OP_CODE[F], OP_CODE[I], OP_CODE[I], OP_CODE[W], OP_CODE[W]])
    second = np.array([False, True, True, False, True, False])
    n = np.arange(m)
    rows = []
    for d in range(P):
        times = offsets[d][:, None] + _PERIOD * n[None, :]  # (4, m)
        slot = {int(t): (k, int(x)) for k in range(4) for x, t in zip(n, times[k])}
        kinds: list[int] = []
        mbs: list[int] = []
        pending: list[list[int]] = [[], []]  # micro-batches whose W is due, per chunk (second, first)
        nxt = [0, 0]
        for t in range(int(times.max()) + 1):
            hit = slot.get(t)
            if hit is not None:
                k, x = hit
                kinds.append(k)
                mbs.append(x)
                if k >= 2:
                    pending[k - 2].append(x)
                continue
            for c in (0, 1):
                if nxt[c] < len(pending[c]):
                    kinds.append(4 + c)
                    mbs.append(pending[c][nxt[c]])
                    nxt[c] += 1
                    break
        for c in (0, 1):
            kinds += [4 + c] * (len(pending[c]) - nxt[c])
            mbs += pending[c][nxt[c]:]
        k = np.asarray(kinds, dtype=np.int64)
        stage = np.where(second[k], 2 * P - 1 - d, d)
        rows.append((np.full(len(k), d), op_of[k], stage, np.asarray(mbs, dtype=np.int64)))
    dev, op, stage, mb = (np.concatenate(c) for c in zip(*rows))
    return Schedule(name, P, m, v_shape(P), Programs.flushed(P, dev, op, stage, mb), split_backward=True)
