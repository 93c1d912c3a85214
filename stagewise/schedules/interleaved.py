"""Megatron's interleaved 1F1B: v chunks per device placed round-robin, for any m."""

from __future__ import annotations

from stagewise.schedules.actions import STEP, Action, B, F, Schedule, ScheduleError
from stagewise.schedules.list_scheduler import Choice, DeviceState, list_schedule
from stagewise.schedules.placement import check_args, round_robin


def interleaved(devices: int, microbatches: int, chunks: int = 2) -> Schedule:
    """Interleaved 1F1B (Narayanan et al. 2021) with `chunks` virtual stages per device.

    Forwards follow Megatron's order (groups of P micro-batches, chunk by chunk), backwards
    the same order with chunks reversed; after (v-1)P + 2(P-1-d) warm-up forwards a device
    alternates one forward and one backward, so it holds at most (v-1)P + 2(P-1-d) + 1
    chunk activations. Unlike Megatron, any m works: when P does not divide m the groups
    hold P or P+1 micro-batches (one more chunk activation of warm-up per extra one), and
    m < P makes one group of m.
    """
    check_args("interleaved", devices, microbatches, chunks)
    if chunks < 2:
        raise ScheduleError(f"interleaved: needs chunks >= 2 virtual stages per device (got {chunks}); "
                            "use '1f1b' for one")
    P, m, v = devices, microbatches, chunks

    # Megatron's groups of P micro-batches; when P does not divide m, the remainder is spread
    # over the groups (sizes P or P+1) so that no short trailing group runs without overlap.
    n_groups = max(1, m // P)
    sizes = [m // n_groups + (1 if g < m % n_groups else 0) for g in range(n_groups)]
    starts = [sum(sizes[:g]) for g in range(n_groups)]

    def order(d: int, backward: bool) -> list[tuple[int, int]]:
        """Megatron's order of (stage, micro-batch) on device d: group by group, chunk by chunk."""
        out = []
        for start, size in zip(starts, sizes):
            for c in (range(v - 1, -1, -1) if backward else range(v)):
                out += [(c * P + d, n) for n in range(start, start + size)]
        return out

    forward_order = [order(d, False) for d in range(P)]
    backward_order = [order(d, True) for d in range(P)]
    total = m * v
    warmup = [min(total, (v - 1) * max(sizes) + 2 * (P - 1 - d)) for d in range(P)]
    # Megatron's rhythm per device: warm-up forwards, then one forward and one backward, then the rest.
    rhythm = [[F] * w + [F, B] * (total - w) + [B] * w for w in warmup]
    done_f, done_b = [0] * P, [0] * P
    limits = [w + 1 for w in warmup]

    def policy(st: DeviceState) -> Choice | None:
        d = st.device
        nf = forward_order[d][done_f[d]] if done_f[d] < total else None
        nb = backward_order[d][done_b[d]] if done_b[d] < total else None
        can_f = nf in st.forwards and st.inflight < limits[d]
        can_b = nb in st.backwards
        # Follow the rhythm; when its next action is not ready, take the other kind rather than
        # idle (a trailing group shorter than P needs that to never wait forever).
        prefer_f = rhythm[d][done_f[d] + done_b[d]] == F
        if can_f and (prefer_f or not can_b):
            done_f[d] += 1
            return (F, *nf)
        if can_b:
            done_b[d] += 1
            return (B, *nb)
        return None

    placement = round_robin(P, v)
    lists = list_schedule(placement, P, m, False, policy)
    for d in range(P):
        lists[d].append(Action(STEP, d, -1, 1))
    return Schedule("interleaved", P, m, placement, tuple(tuple(a) for a in lists))
