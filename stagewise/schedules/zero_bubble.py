"""Zero-bubble schedules (Qi et al. 2024): the backward split into I (input grad) and W (weight grad).

W has no consumer on another device, so it can wait and fill the idle time that 1F1B
spends waiting for gradients. Both generators work for any m.
"""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import Schedule, ScheduleError
from stagewise.schedules.list_scheduler import BWD, FWD, NONE, WGT, Ready, list_schedule, schedule_from_listed
from stagewise.schedules.placement import check_args, plain, v_shape


def zb_h1(devices: int, microbatches: int, chunks: int = 1) -> Schedule:
    """ZB-H1: 1F1B's rhythm (P-d micro-batches awaiting I), F before I before W.

    W waits to fill the bubbles, but a device never holds more than P micro-batches
    awaiting W: the peak activation memory of 1F1B's first device.
    """
    check_args("zb-h1", devices, microbatches, chunks)
    if chunks != 1:
        raise ScheduleError(f"zb-h1: holds one stage per device, so chunks must be 1 (got {chunks}); use 'zbv' for two")
    P = devices
    room = P - np.arange(P)
    zeros = np.zeros(P, dtype=np.int64)

    def policy(r: Ready) -> tuple[np.ndarray, np.ndarray]:
        f = r.f[0] & (r.inflight_i < room) & (r.inflight < P)
        i = r.b[0] & ~f
        w = r.w[0] & ~f & ~i
        return NONE + (FWD - NONE) * f + (BWD - NONE) * i + (WGT - NONE) * w, zeros

    return _build("zb-h1", plain(P), P, microbatches, policy)


def zbv(devices: int, microbatches: int, chunks: int = 2) -> Schedule:
    """ZB-V: two chunks per device in a V (device d holds stages d and 2P-1-d).

    Each device holds at most 2P chunk activations, i.e. P whole-stage micro-batches,
    1F1B's peak; with F = I = W the bubble nearly vanishes once m >= 2P.
    """
    check_args("zbv", devices, microbatches, chunks)
    if chunks != 2:
        raise ScheduleError(f"zbv: places exactly two chunks per device in a V, so chunks must be 2 (got {chunks})")
    P = devices
    # A micro-batch is admitted on a device by its first chunk there and then owns two
    # activation slots on it; admitting only while 2P slots suffice means every admitted
    # micro-batch can always finish, so no device ever waits for memory it cannot get.
    committed = np.zeros(P, dtype=np.int64)

    def policy(r: Ready) -> tuple[np.ndarray, np.ndarray]:
        i = r.b[0] | r.b[1]  # the deeper chunk's gradient first: it unblocks the way back
        f_late = r.f[1] & ~i
        f_first = r.f[0] & ~i & ~f_late & (committed + 2 <= 2 * P)
        w = (r.w[0] | r.w[1]) & ~i & ~f_late & ~f_first
        # the cases exclude each other, so their codes add up
        kind = NONE + (BWD - NONE) * i + (FWD - NONE) * (f_late | f_first) + (WGT - NONE) * w
        chunk = ((i & r.b[1]) | f_late | (w & ~r.w[0])).astype(np.int64)
        committed[f_first] += 2
        committed[w] -= 1
        return kind, chunk

    return _build("zbv", v_shape(P), P, microbatches, policy)


def _build(name: str, placement: tuple[int, ...], P: int, m: int, policy) -> Schedule:
    listed = list_schedule(placement, P, m, True, policy, costs=(1.0, 2.0, 1.0, 1.0))
    return schedule_from_listed(name, P, m, placement, listed, split_backward=True)
