"""Zero-bubble schedules (Qi et al. 2024): the backward split into I (input grad) and W (weight grad).

W has no consumer on another device, so it can wait and fill the idle time that 1F1B
spends waiting for gradients. Both generators work for any m.
"""

from __future__ import annotations

from stagewise.schedules.actions import STEP, Action, F, I, Schedule, ScheduleError, W
from stagewise.schedules.list_scheduler import Choice, DeviceState, list_schedule
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

    def policy(st: DeviceState) -> Choice | None:
        if st.forwards and st.inflight_until_input_grad < P - st.device and st.inflight < P:
            return (F, *st.forwards[0])
        if st.backwards:
            return (I, *st.backwards[0])
        if st.weights:
            return (W, *st.weights[0])
        return None

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
    committed = [0] * P

    def policy(st: DeviceState) -> Choice | None:
        d = st.device
        if st.backwards:  # the deeper chunk's gradient first: it unblocks the way back
            return (I, *max(st.backwards))
        later = [sn for sn in st.forwards if sn[0] >= P]
        if later:
            return (F, *later[0])
        if st.forwards and committed[d] + 2 <= 2 * P:
            committed[d] += 2
            return (F, *st.forwards[0])
        if st.weights:
            committed[d] -= 1
            return (W, *min(st.weights))
        return None

    return _build("zbv", v_shape(P), P, microbatches, policy)


def _build(name: str, placement: tuple[int, ...], P: int, m: int, policy) -> Schedule:
    lists = list_schedule(placement, P, m, True, policy, costs=(1.0, 2.0, 1.0, 1.0))
    for d in range(P):
        lists[d].append(Action(STEP, d, -1, 1))
    return Schedule(name, P, m, placement, tuple(tuple(a) for a in lists), split_backward=True)
