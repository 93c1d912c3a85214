"""Megatron's interleaved 1F1B: v virtual_stages per device placed round-robin, for any m."""

from __future__ import annotations

import numpy as np

from stagewise.schedules.actions import ScheduleError
from stagewise.schedules.list_scheduler import BWD, FWD, NONE, Ready, list_schedule, schedule_from_listed
from stagewise.schedules.placement import check_args, round_robin
from stagewise.schedules.schedule import Schedule


def interleaved(devices: int, microbatches: int, virtual_stages: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021) with `virtual_stages` virtual stages per device.

    Forwards follow Megatron's order (groups of P micro-batches, chunk by chunk), backwards
    the same order with virtual stages reversed; after (v-1)P + 2(P-1-d) warm-up forwards a device
    alternates one forward and one backward, so it holds at most (v-1)P + 2(P-1-d) + 1
    chunk activations. Unlike Megatron, any m works: when P does not divide m the groups
    hold P or P+1 micro-batches (one more chunk activation of warm-up per extra one), and
    m < P makes one group of m.
    """
    check_args("interleaved", devices, microbatches, virtual_stages)
    if virtual_stages < 2:
        raise ScheduleError(f"interleaved: needs virtual_stages >= 2 virtual stages per device (got {virtual_stages}); "
                            "use '1f1b' for one")
    P, m, v = devices, microbatches, virtual_stages

    # Megatron's groups of P micro-batches; when P does not divide m, the remainder is spread
    # over the groups (sizes P or P+1) so that no short trailing group runs without overlap.
    n_groups = max(1, m // P)
    sizes = [m // n_groups + (1 if g < m % n_groups else 0) for g in range(n_groups)]

    def chunk_order(backward: bool) -> np.ndarray:
        """Megatron's order of virtual stages, the same on every device: group by group, chunk by chunk."""
        return np.concatenate([np.repeat(np.arange(v)[::-1] if backward else np.arange(v), size) for size in sizes])

    total = m * v
    devs = np.arange(P)
    # stage of each device's k-th forward / backward (chunk c of device d is stage c*P + d); a pad at the end
    f_stage = np.c_[chunk_order(False)[None, :] * P + devs[:, None], np.zeros(P, dtype=np.int64)]
    b_stage = np.c_[chunk_order(True)[None, :] * P + devs[:, None], np.zeros(P, dtype=np.int64)]
    warmup = np.minimum(total, (v - 1) * max(sizes) + 2 * (P - 1 - devs))
    # Megatron's rhythm per device: warm-up forwards, then one forward and one backward, then the rest.
    # Position j is a forward when j < w, or when (j - w) is even while j < 2 * total - w.
    j = np.arange(2 * total + 1)[None, :]
    w_ = warmup[:, None]
    rhythm = (j < w_) | (((j - w_) % 2 == 0) & (j < 2 * total - w_))
    done_f, done_b = np.zeros(P, dtype=np.int64), np.zeros(P, dtype=np.int64)
    limits = warmup + 1

    def policy(r: Ready) -> tuple[np.ndarray, np.ndarray]:
        can_f = (done_f < total) & r.f_stage[f_stage[devs, done_f]] & (r.inflight < limits)
        can_b = (done_b < total) & r.b_stage[b_stage[devs, done_b]]
        # Follow the rhythm; when its next action is not ready, take the other kind rather than
        # idle (a trailing group shorter than P needs that to never wait forever).
        prefer_f = rhythm[devs, done_f + done_b]
        take_f = can_f & (prefer_f | ~can_b)
        take_b = can_b & ~take_f
        kind = NONE + (FWD - NONE) * take_f + (BWD - NONE) * take_b
        chunk = np.where(take_f, f_stage[devs, done_f] // P, b_stage[devs, done_b] // P)
        done_f[take_f] += 1
        done_b[take_b] += 1
        return kind, chunk

    placement = round_robin(P, v)
    listed = list_schedule(placement, P, m, False, policy)
    return schedule_from_listed("interleaved", P, m, placement, listed)
