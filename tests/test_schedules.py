"""Properties of every schedule generator, checked with the validator and the simulator."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.schedules import (
    SCHEDULES,
    Costs,
    ScheduleError,
    build,
    lower,
    simulate,
    validate,
)

UNIT = Costs(f=1, b=2, i=1, w=1)
P_ = st.integers(1, 8)
M_ = st.integers(1, 24)


def idle(sim) -> float:
    return sim.makespan * sim.schedule.num_devices * sim.bubble_fraction


@settings(max_examples=60, deadline=None)
@given(name=st.sampled_from(sorted(SCHEDULES)), P=P_, m=M_, v=st.integers(1, 3))
def test_every_generator_validates_or_refuses_clearly(name, P, m, v):
    info = SCHEDULES[name]
    opts = {"batches": 2} if info.asynchronous else {}
    wants = {"interleaved": v >= 2, "looped-bfs": v >= 2, "zbv": v == 2, "v-half": v == 2, "v-min": v == 2,
             "dualpipev": v == 2}.get(name, v == 1)
    if not wants:
        with pytest.raises(ScheduleError, match="virtual_stages"):
            build(name, P, m, v, **opts)
        return
    sc = build(name, P, m, v, **opts)
    lowered = validate(sc)
    assert lowered.lowered
    assert sc.num_stages == P * v


@settings(max_examples=80, deadline=None)
@given(P=P_, m=M_)
def test_gpipe_and_1f1b_bubble_and_memory(P, m):
    expected = (P - 1) / (m + P - 1)
    g = simulate(build("gpipe", P, m), UNIT)
    o = simulate(build("1f1b", P, m), UNIT)
    assert g.bubble_fraction == pytest.approx(expected, abs=1e-12)
    assert o.bubble_fraction == pytest.approx(expected, abs=1e-12)
    assert g.peak_inflight == [m] * P
    assert o.peak_inflight == [min(P - s, m) for s in range(P)]
    assert o.peak_weight_versions == [1] * P


@settings(max_examples=60, deadline=None)
@given(P=st.integers(2, 8), extra=st.integers(0, 16), v=st.integers(2, 3))
def test_interleaved_beats_1f1b_for_m_at_least_P(P, extra, v):
    m = P + extra
    inter = simulate(build("interleaved", P, m, v), Costs(f=1 / v, b=2 / v))
    base = simulate(build("1f1b", P, m), Costs(f=1, b=2))
    assert inter.bubble_fraction < base.bubble_fraction
    if m % P == 0:  # Megatron's closed form where Megatron is defined
        assert inter.bubble_fraction == pytest.approx((P - 1) / (v * m + P - 1), abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(P=st.integers(2, 8), extra=st.integers(0, 16))
def test_zb_h1_bubble_is_a_third_of_1f1b_with_equal_costs(P, extra):
    m = P + extra
    zb = simulate(build("zb-h1", P, m), UNIT)
    base = simulate(build("1f1b", P, m), UNIT)
    assert idle(zb) <= idle(base) / 3 + 1e-9
    assert max(zb.peak_inflight) <= P  # 1F1B's peak


@settings(max_examples=60, deadline=None)
@given(P=P_, m=M_)
def test_zbv_holds_at_most_P_and_nearly_no_bubble(P, m):
    sim = simulate(build("zbv", P, m), Costs(f=0.5, b=1, i=0.5, w=0.5))
    assert max(sim.peak_inflight) <= P
    if P > 1 and m >= 2 * P:
        base = simulate(build("1f1b", P, m), UNIT)
        assert sim.bubble_fraction < base.bubble_fraction / 2


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 6), m=st.integers(1, 8), batches=st.integers(3, 5))
def test_async_schedules_versions_and_steady_state(P, m, batches):
    pd = simulate(build("pipedream", P, m, batches=batches), UNIT)
    if m * batches >= 2 * P:
        assert pd.peak_weight_versions == [P - s for s in range(P)]
    assert all(v <= P - s for s, v in enumerate(pd.peak_weight_versions))
    tb = simulate(build("2bw", P, m, batches=batches), UNIT)
    assert max(tb.peak_weight_versions) <= 2
    if P > 1 and m >= P:
        assert tb.peak_weight_versions == [2] * P
    for sim in (pd, tb) if m >= P else (pd,):
        for d in range(P):  # steady state: from the first backward to the last forward, no idle time
            ev = sorted((e for e in sim.timeline.events if e.device == d and e.op != "STEP"), key=lambda e: e.start)
            first_b = next(i for i, e in enumerate(ev) if e.op == "B")
            last_f = max(i for i, e in enumerate(ev) if e.op == "F")
            for a, b in zip(ev[first_b:last_f], ev[first_b + 1:last_f + 1]):
                assert b.start == pytest.approx(a.end), (sim.schedule.name, d, a, b)


def test_pipedream_stashes_versions_and_vertical_sync_agrees_across_stages():
    sc = build("pipedream", 4, 4, batches=2, vertical_sync=True)
    validate(sc)
    fwd = {(a.stage, a.microbatch): a.version for prog in sc.programs for a in prog if a.op == "F"}
    for n in range(8):
        assert len({fwd[(s, n)] for s in range(4)}) == 1
    plain = build("pipedream", 4, 4, batches=2)
    versions = {(a.op, a.stage, a.microbatch): a.version for prog in plain.programs for a in prog}
    for (op, s, n), v in versions.items():
        if op == "B":
            assert versions[("F", s, n)] == v


@pytest.mark.parametrize("P,m,v,err", [(0, 4, 1, "devices"), (2, 0, 1, "micro-batches"), (2, 4, 0, "virtual_stages")])
def test_impossible_arguments(P, m, v, err):
    with pytest.raises(ScheduleError, match=err):
        build("1f1b", P, m, v)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        build("nope", 2, 2)


# ---- the validator on hand-made broken schedules ----

def _edit(sc, device, fn):
    from dataclasses import replace
    acts = list(sc.programs)
    acts[device] = tuple(fn(list(acts[device])))
    return replace(sc, programs=tuple(acts))


def test_rejects_missing_backward():
    sc = _edit(build("1f1b", 2, 2), 1, lambda a: [x for x in a if not (x.op == "B" and x.microbatch == 1)])
    with pytest.raises(ScheduleError, match=r"B\(stage 1, mb 1\) never runs"):
        validate(sc)


def test_rejects_backward_before_its_forward():
    def swap(a):
        i = next(k for k, x in enumerate(a) if x.op == "F" and x.microbatch == 0)
        j = next(k for k, x in enumerate(a) if x.op == "B" and x.microbatch == 0)
        a[i], a[j] = a[j], a[i]
        return a
    sc = _edit(build("gpipe", 2, 2), 1, swap)
    with pytest.raises(ScheduleError, match=r"device 1 waits forever at its action #0 B\(stage 1, mb 0\).*"
                                            r"F\(stage 1, mb 0\), which device 1 only runs later"):
        validate(sc)


def test_rejects_a_cycle_between_devices():
    # device 0 wants the backward of mb 1 before it has sent forward mb 1: a cross-device cycle
    def reorder(a):
        return [x for x in a if not (x.op == "F" and x.microbatch == 1)] [:2] + [a[1]] + a[3:]
    sc = build("gpipe", 2, 2)
    acts0 = [a for a in sc.programs[0]]
    # F0 F1 B0 B1 STEP  ->  F0 B1 B0 F1 STEP
    bad = [acts0[0], acts0[3], acts0[2], acts0[1], acts0[4]]
    sc = _edit(sc, 0, lambda _: bad)
    with pytest.raises(ScheduleError, match="a cycle|waits forever"):
        validate(sc)


def test_rejects_a_send_receive_order_that_deadlocks():
    sc = lower(build("1f1b", 2, 2))
    # On device 1, move the first RECV_F behind its first SEND_B: device 1 would wait to
    # send a gradient it cannot compute before it receives, while device 0 waits on its send.
    def move(a):
        r = next(i for i, x in enumerate(a) if x.op == "RECV_F")
        recv = a.pop(r)
        s = next(i for i, x in enumerate(a) if x.op == "SEND_B")
        a.insert(s + 1, recv)
        return a
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(_edit(sc, 1, move))


def test_rejects_two_sends_crossing():
    # both devices send first and receive second: deadlocks under blocking semantics
    from stagewise.schedules import RECV_B, RECV_F, SEND_B, SEND_F
    from stagewise.schedules.actions import Action
    sc = lower(build("1f1b", 2, 1))
    d0 = [Action("F", 0, 0), Action(SEND_F, 0, 0, 0, 1), Action(RECV_B, 0, 0, 0, 1), Action("B", 0, 0),
          Action("STEP", 0, -1, 1)]
    d1 = [Action(RECV_F, 1, 0, 0, 0), Action("F", 1, 0), Action("B", 1, 0), Action(SEND_B, 1, 0, 0, 0),
          Action("STEP", 1, -1, 1)]
    from dataclasses import replace
    validate(replace(sc, programs=(tuple(d0), tuple(d1))))  # the right order passes
    crossed = [d1[3], d1[0], d1[1], d1[2], d1[4]]  # device 1 sends a gradient before it could compute it
    with pytest.raises(ScheduleError, match="deadlock"):
        validate(replace(sc, programs=(tuple(d0), tuple(crossed))))


def test_rejects_step_before_flush_and_wrong_device():
    sc = build("gpipe", 2, 2)
    bad = _edit(sc, 0, lambda a: [a[-1]] + a[:-1])
    with pytest.raises(ScheduleError, match="no flush"):
        validate(bad)
    moved = _edit(_edit(sc, 0, lambda a: a + [sc.programs[1][0]]), 1, lambda a: a[1:])
    with pytest.raises(ScheduleError, match="lives on device 1"):
        validate(moved)


def test_rejects_version_mismatch():
    sc = build("pipedream", 2, 2, batches=2)
    def bump(a):
        i = next(k for k, x in enumerate(a) if x.op == "B" and x.microbatch == 3)
        a[i] = a[i]._replace(version=a[i].version + 1)
        return a
    with pytest.raises(ScheduleError, match="no stash|no earlier STEP"):
        validate(_edit(sc, 0, bump))


def test_communication_is_derived_and_matched():
    sc = lower(build("interleaved", 3, 5))
    sends = sum(1 for p in sc.programs for a in p if a.op.startswith("SEND"))
    recvs = sum(1 for p in sc.programs for a in p if a.op.startswith("RECV"))
    # every stage boundary crossed by each micro-batch twice (activation and gradient)
    assert sends == recvs == 2 * 5 * (sc.num_stages - 1)
