"""Zero-bubble schedules (Qi et al. 2024): the backward split into I (input grad) and W (weight grad).

W has no consumer on another device, so it can wait and fill the idle time that 1F1B
spends waiting for gradients. Both generators work for any m.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import F, I, ScheduleError, W
from stagewise.schedules.list_scheduler import BWD, FWD, NONE, WGT, Ready, list_schedule, schedule_from_listed
from stagewise.schedules.placement import check_args, plain, v_shape
from stagewise.schedules.programs import OP_CODE, Programs
from stagewise.schedules.schedule import Schedule


def zb_h1(devices: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """ZB-H1: 1F1B's rhythm (P-d micro-batches awaiting I), F before I before W.

    W waits to fill the bubbles, but a device never holds more than P micro-batches
    awaiting W: the peak activation memory of 1F1B's first device.
    """
    check_args("zb-h1", devices, microbatches, virtual_stages)
    if virtual_stages != 1:
        raise ScheduleError(f"zb-h1: holds one stage per device, so virtual_stages must be 1 (got "
                            f"{virtual_stages}); use 'zbv' for two")
    P = devices
    room = P - np.arange(P)
    zeros = np.zeros(P, dtype=np.int64)

    def policy(r: Ready) -> tuple[np.ndarray, np.ndarray]:
        f = r.f[0] & (r.inflight_i < room) & (r.inflight < P)
        i = r.b[0] & ~f
        w = r.w[0] & ~f & ~i
        return NONE + (FWD - NONE) * f + (BWD - NONE) * i + (WGT - NONE) * w, zeros

    return _build("zb-h1", plain(P), P, microbatches, policy)


def zbv(devices: int, microbatches: int, virtual_stages: int = 2) -> Schedule:
    """ZB-V (Qi et al. 2024, section 6): two virtual stages per device in a V (device d holds stages d and 2P-1-d).

    The paper's handcrafted order. Device d warms up with 2(P-d)-1 forwards of its first
    chunk, then d pairs (second-chunk F, first-chunk F), then P-d rounds of second-chunk
    F, I, W. In the steady state each round is F, I, W on the first chunk and the same on
    the second, so each I is followed by its W. The cool-down runs the remaining I's
    (paired, then each first-chunk I with a W), then the deferred W's.
    The order is written for n = max(m, 2P-1) micro-batches and the actions of micro-batches
    past m are dropped, so any m works. A device holds at most 2P chunk activations (P
    whole-stage micro-batches, 1F1B's peak), and with F = I = W the bubble nearly vanishes
    once m >= 2P. It is also the order `torch.distributed.pipelining` runs.
    """
    check_args("zbv", devices, microbatches, virtual_stages)
    if virtual_stages != 2:
        raise ScheduleError(f"zbv: places exactly two virtual stages per device in a V, so virtual_stages must be 2 "
                            f"(got {virtual_stages})")
    P, m = devices, microbatches
    n = max(m, 2 * P - 1)
    # categories: 0 F chunk 0, 1 F chunk 1, 2 I chunk 0, 3 I chunk 1, 4 W chunk 0, 5 W chunk 1
    F0, F1, I0, I1, W0, W1 = range(6)
    op_of = np.array([OP_CODE[F], OP_CODE[F], OP_CODE[I], OP_CODE[I], OP_CODE[W], OP_CODE[W]])
    chunk_of = np.array([0, 1, 0, 1, 0, 1])
    rows = []
    for d in range(P):
        both_forward = n - 2 * P + d + 1  # steady rounds that still start a first-chunk forward
        parts = [
            np.full(2 * (P - d) - 1, F0), np.tile([F1, F0], d), np.tile([F1, I1, W1], P - d),
            np.tile([F0, I0, W0, F1, I1, W1], both_forward), np.tile([I0, W0, F1, I1, W1], P - d - 1),
            np.tile([I0, I1], d), np.tile([I0, W0], P - d), np.full(d, W1), np.full(d, W0),
        ]
        cat = np.concatenate(parts)
        # every category runs its micro-batches in order: the index is the count so far
        onehot = cat[:, None] == np.arange(6)[None, :]
        mb = (np.cumsum(onehot, axis=0) - 1)[np.arange(len(cat)), cat]
        keep = mb < m
        cat, mb = cat[keep], mb[keep]
        stage = np.where(chunk_of[cat] == 0, d, 2 * P - 1 - d)
        rows.append((np.full(len(cat), d), op_of[cat], stage, mb))
    dev, op, stage, mb = (np.concatenate(c) for c in zip(*rows))
    return Schedule("zbv", P, m, v_shape(P), Programs.flushed(P, dev, op, stage, mb), split_backward=True)


def _build(name: str, placement: tuple[int, ...], P: int, m: int, policy) -> Schedule:
    listed = list_schedule(placement, P, m, True, policy, costs=(1.0, 2.0, 1.0, 1.0))
    return schedule_from_listed(name, P, m, placement, listed, split_backward=True)


def zb_h2(devices: int, microbatches: int, virtual_stages: int = 1) -> Schedule:
    """ZB-H2 (Qi et al. 2024, section 3): up to 2P-1 micro-batches in flight, no bubble inside a device's span.

    The paper's handcrafted order. Device d runs, for x = 0, 1, ...: the forward of
    micro-batch x, the input gradient I of micro-batch x - 2(P-1-d) and the weight gradient
    W of micro-batch x - 2(P-1), each when it exists. So it warms up with 2(P-1-d) lone
    forwards and 2d (F, I) pairs, runs (F, I, W) in the steady state, and cools down with
    (I, W) pairs and the last W's: with F = I = W a device never idles between its first
    and its last action (the paper's parallelogram; its "zero bubble" counts the start and
    end ramps, P-1 slots per device, as filled by the neighbouring iterations once the
    optimizer step is not synchronised). A device holds at most 2P-1 micro-batches. Any m works.
    """
    check_args("zb-h2", devices, microbatches, virtual_stages)
    if virtual_stages != 1:
        raise ScheduleError(f"zb-h2: holds one stage per device, so virtual_stages must be 1 (got {virtual_stages})")
    P, m = devices, microbatches
    x = np.arange(m + 2 * (P - 1))
    code = np.array([OP_CODE[F], OP_CODE[I], OP_CODE[W]])
    rows = []
    for d in range(P):
        mbs = np.stack([x, x - 2 * (P - 1 - d), x - 2 * (P - 1)], axis=1)  # (F, I, W) micro-batch of round x
        kind = np.broadcast_to(np.arange(3), mbs.shape)
        keep = (mbs >= 0) & (mbs < m)
        mb, k = mbs[keep], kind[keep]
        rows.append((np.full(len(mb), d), code[k], np.full(len(mb), d), mb))
    dev, op, stage, mb = (np.concatenate(c) for c in zip(*rows))
    return Schedule("zb-h2", P, m, plain(P), Programs.flushed(P, dev, op, stage, mb), split_backward=True)
