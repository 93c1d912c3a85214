"""The schedules of issue #18 (looped-bfs, zb-h2, v-half, v-min, dualpipev) and the overlapped F+B pair.

Each generator is checked with the validator for any P and m, and the simulator against the
paper's bubble and memory under the paper's cost assumptions.
"""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.schedules import (
    OVERLAP_F_B,
    RECV_B,
    RECV_F,
    SCHEDULES,
    SEND_B,
    SEND_F,
    Action,
    Costs,
    ScheduleError,
    build,
    lower,
    simulate,
    validate,
)

NEW = ("looped-bfs", "zb-h2", "v-half", "v-min", "dualpipev")
CHUNKS_OK = {"looped-bfs": lambda v: v >= 2, "zb-h2": lambda v: v == 1}  # the V-shaped ones: exactly 2
UNIT = Costs(f=1, b=2, i=1, w=1)  # F = I = W: the zero-bubble papers' assumption, one stage per device
HALF = Costs(f=0.5, b=1, i=0.5, w=0.5)  # the same model in two virtual stages per device


def spans(sim) -> list[float]:
    """Each device's span: from its first action's start to its last action's end."""
    out = []
    for d in range(sim.schedule.num_devices):
        ev = [e for e in sim.timeline.events if e.device == d and e.end > e.start]
        out.append(max(e.end for e in ev) - min(e.start for e in ev))
    return out


def idle(sim) -> list[float]:
    """Idle time of each device over the makespan."""
    return [sim.makespan * b for b in sim.bubble_per_device]


def test_registered_with_default_virtual_stages():
    assert set(NEW) <= set(SCHEDULES)
    assert {n: SCHEDULES[n].default_virtual_stages for n in NEW} == {
        "looped-bfs": 2, "zb-h2": 1, "v-half": 2, "v-min": 2, "dualpipev": 2}
    assert not any(SCHEDULES[n].asynchronous for n in NEW)


@settings(max_examples=150, deadline=None)
@given(name=st.sampled_from(NEW), P=st.integers(1, 8), m=st.integers(1, 24))
def test_every_new_schedule_validates_for_any_P_and_m(name, P, m):
    sc = build(name, P, m)
    low = validate(sc)
    assert low.lowered and sc.num_devices == P and sc.microbatches == m
    sends = sum(1 for p in low.programs for a in p if a.op in (SEND_F, SEND_B))
    crossings = sum(sc.placement[s] != sc.placement[s + 1] for s in range(sc.num_stages - 1))
    assert sends == 2 * m * crossings  # an activation and a gradient across every boundary between devices


@pytest.mark.parametrize("name", NEW)
@pytest.mark.parametrize("v", [1, 2, 3])
def test_wrong_chunks_are_refused_by_name(name, v):
    ok = CHUNKS_OK.get(name, lambda v: v == 2)(v)
    if ok:
        assert build(name, 3, 5, v).virtual_stages == v
    else:
        with pytest.raises(ScheduleError, match=rf"{name}: .*virtual_stages must|{name}: needs virtual_stages"):
            build(name, 3, 5, v)


@settings(max_examples=40, deadline=None)
@given(P=st.integers(1, 8), extra=st.integers(0, 16), v=st.integers(2, 3))
def test_looped_bfs_bubble_like_interleaved_memory_like_gpipe(P, extra, v):
    """Looped BFS (Lamy-Poirier 2022; torch's ScheduleLoopedBFS): for m >= P its bubble is the
    interleaved schedule's (P-1)/(vm+P-1) under chunk costs F=1/v, B=2/v, and every device holds
    all m micro-batches (in whole-stage units) before its first backward."""
    m = P + extra
    sim = simulate(build("looped-bfs", P, m, v), Costs(f=1 / v, b=2 / v))
    assert sim.bubble_fraction == pytest.approx((P - 1) / (v * m + P - 1), abs=1e-12)
    assert sim.peak_inflight == [m] * P


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 8), m=st.integers(1, 24))
def test_zb_h2_parallelogram(P, m):
    """ZB-H2 (Qi et al. 2024, "Zero Bubble Pipeline Parallelism", Table 2): bubble
    (p-1)(T_F+T_B-2T_W), i.e. 0 under T_F = T_B = T_W, with (2p-1) micro-batches of activation
    memory. Under F = I = W = 1 no device idles between its first and last action once
    m >= 2P-1 (a parallelogram; the P-1 ramp slots per device are what a flushed step adds:
    makespan 3m + P - 1)."""
    sim = simulate(build("zb-h2", P, m), UNIT)
    assert max(sim.peak_inflight) <= 2 * P - 1
    if m >= 2 * P - 1:
        assert spans(sim) == pytest.approx([3 * m] * P)
        assert sim.makespan == pytest.approx(3 * m + P - 1)
        assert sim.bubble_fraction == pytest.approx((P - 1) / (3 * m + P - 1))
        assert sim.peak_inflight == [2 * P - 1] * P
        h1 = simulate(build("zb-h1", P, m), UNIT)
        assert max(spans(sim)) <= min(spans(h1))  # ZB-H1 idles inside its spans, ZB-H2 does not


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 8), m=st.integers(1, 24))
def test_v_half_and_v_min_memory_and_bubble(P, m):
    """V-Half and V-Min (Qi et al. 2024, "Pipeline Parallelism with Controllable Memory", the
    comparison table under T_F = T_B = T_W): activation memory (p+2)//2 and (p+4)//3 micro-batches
    (1F1B: p), bubble rate ~p/(2m) and ~2p/(3m) (1F1B: ~p/m), i.e. about 1.5p and 2p units of idle
    time per device against 1F1B's 3(p-1). Measured here for m >= p: V-Min stays within 2p; V-Half
    within 1.5p, plus one unit when P is even (the paper's greedy reordering is not applied)."""
    half = simulate(build("v-half", P, m), HALF)
    vmin = simulate(build("v-min", P, m), HALF)
    assert max(half.peak_inflight) == min((P + 2) // 2, m)
    assert max(vmin.peak_inflight) == min((P + 4) // 3, m)
    base = simulate(build("1f1b", P, m), UNIT)
    for sim, bound in ((half, 1.5 * P + (P % 2 == 0)), (vmin, 2 * P)):
        assert max(idle(sim)) <= max(idle(base)) + 1e-9
        if m >= P:  # the paper's regime (its rates are for m well above p)
            assert max(spans(sim)) - 3 * m <= bound + 1e-9


@settings(max_examples=60, deadline=None)
@given(P=st.integers(1, 8), m=st.integers(1, 24), w_share=st.sampled_from([1.0, 0.5]))
def test_dualpipev_bubble_and_memory(P, m, w_share):
    """DualPipeV (deepseek-ai/DualPipe README table): bubble (PP/2-1)(F&B+B-3W) with PP = 2P
    stages, F&B the time of an overlapped pair and B the full backward; activation PP+1 chunk
    activations (P + 1/2 whole-stage micro-batches). Exact for m >= 2P under the README's regime
    F = I (W = I or I/2), pairs run one after the other (F&B = F+B) or overlapped (max(F, B))."""
    f = i = 0.5
    w = i * w_share
    sc = build("dualpipev", P, m)
    for overlap in (False, True):
        sim = simulate(sc, Costs(f=f, i=i, w=w, overlap=overlap))
        b = i + w
        pair = max(f, b) if overlap else f + b
        assert max(sim.peak_inflight) <= P + 0.5
        if m >= 2 * P:
            assert max(idle(sim)) == pytest.approx((P - 1) * (pair + b - 3 * w), abs=1e-9)
            assert sim.peak_inflight == [P + 0.5] * P


def test_readme_table_numbers():
    """The rows of docs/schedules.md for the new schedules (P=4, m=8; F=1, B=2, I=W=1; two virtual stages: halved)."""
    got = {}
    for name in NEW:
        sc = build(name, 4, 8)
        sim = simulate(sc, HALF if sc.virtual_stages == 2 else UNIT)
        got[name] = (round(sim.bubble_fraction * 100, 1), sim.peak_inflight, sim.peak_weight_versions)
    assert got == {
        "looped-bfs": (15.8, [8.0] * 4, [1] * 4),
        "zb-h2": (11.1, [7.0] * 4, [1] * 4),
        "v-half": (20.0, [3.0] * 4, [1] * 4),
        "v-min": (18.6, [2.0] * 4, [1] * 4),
        "dualpipev": (11.1, [4.5] * 4, [1] * 4),
    }
    over = simulate(build("dualpipev", 4, 8), replace(HALF, overlap=True))
    assert round(over.bubble_fraction * 100, 1) == 5.1


# ---- the overlapped pair in the IR ----

def _pair_schedule():
    """A hand-made 2-device, 2-micro-batch schedule whose last device overlaps F1 with B0."""
    sc = build("1f1b", 2, 2)
    d1 = [Action("F", 1, 0), Action(OVERLAP_F_B, -1, -1), Action("F", 1, 1), Action("B", 1, 0),
          Action("B", 1, 1), Action("STEP", 1, -1, 1)]
    return replace(sc, name="paired", programs=(tuple(sc.programs[0]), tuple(d1)))


def test_pair_waits_for_both_members_and_costs_sum_or_max():
    sc = _pair_schedule()
    validate(sc)
    for overlap, length in ((False, 3.0), (True, 2.0)):
        sim = simulate(sc, Costs(f=1, b=2, overlap=overlap))
        ev = [e for e in sim.timeline.events if e.device == 1]
        pair = next(e for e in ev if e.op == OVERLAP_F_B)
        f1 = next(e for e in ev if e.op == "F" and e.microbatch == 1)
        b0 = next(e for e in ev if e.op == "B" and e.microbatch == 0)
        # F(1, 1) needs device 0's F1 (ends at 2); B(1, 0) needs F(1, 0) (ends at 2): the pair starts at 2
        assert (pair.start, pair.end - pair.start) == (2.0, length)
        assert f1.start == pair.start and b0.end == pair.end
        assert b0.start == (pair.start if overlap else f1.end)
        assert pair.label == "F1+B0" and f1.extra == {"in_pair": True}
        assert sim.timeline.busy(1) == pytest.approx(1 + length + 2)  # F0, the pair, B1: members count once
        # device 0's B0 needs the gradient of B(1, 0): there only when the pair ends
        b00 = next(e for e in sim.timeline.events if e.device == 0 and e.op == "B" and e.microbatch == 0)
        assert b00.start == pair.end


def test_lowering_keeps_the_pair_together():
    for sc in (_pair_schedule(), build("dualpipev", 4, 9)):
        low = lower(sc)
        assert validate(low) is low
        for prog in low.programs:
            for k, a in enumerate(prog):
                if a.op == OVERLAP_F_B:
                    f, b = prog[k + 1], prog[k + 2]
                    assert (f.op, b.op) == ("F", "B")
                    before = prog[:k]
                    if f.stage > 0 and low.placement[f.stage - 1] != low.placement[f.stage]:
                        assert any(x.op == RECV_F and (x.stage, x.microbatch) == (f.stage, f.microbatch)
                                   for x in before)
                    after = prog[k + 3:]
                    for x in after:  # what the members send leaves after the pair
                        assert not (x.op == RECV_B and (x.stage, x.microbatch) == (b.stage, b.microbatch))


@pytest.mark.parametrize("edit,why", [
    (lambda d1: d1[:2] + d1[3:], "must be followed by its members"),
    (lambda d1: d1[:2] + [Action("B", 1, 1), Action("F", 1, 1)] + d1[4:], "must be followed by its members"),
    (lambda d1: [d1[0], d1[1]._replace(stage=1)] + d1[2:], "names no stage"),
])
def test_malformed_pairs_are_refused_naming_the_pair(edit, why):
    sc = _pair_schedule()
    bad = replace(sc, programs=(sc.programs[0], tuple(edit(list(sc.programs[1])))))
    with pytest.raises(ScheduleError, match=rf"device 1 action #1 {OVERLAP_F_B}.*{why}"):
        validate(bad)


def test_a_pair_of_one_micro_batch_and_communication_inside_a_pair_are_refused():
    sc = build("1f1b", 1, 2)
    same = [Action("F", 0, 0), Action(OVERLAP_F_B, -1, -1), Action("F", 0, 1), Action("B", 0, 1),
            Action("B", 0, 0), Action("STEP", 0, -1, 1)]
    with pytest.raises(ScheduleError, match="same .stage 0, mb 1., which cannot overlap"):
        validate(replace(sc, programs=(tuple(same),)))
    low = lower(build("dualpipev", 2, 4))
    acts = [list(p) for p in low.programs]
    d = next(d for d, p in enumerate(acts) if any(a.op == OVERLAP_F_B for a in p))
    k = next(k for k, a in enumerate(acts[d]) if a.op == OVERLAP_F_B)
    recv = next(j for j in range(k) if acts[d][j].op in (RECV_F, RECV_B))
    acts[d].insert(k + 1, acts[d].pop(recv))  # (the pair is at k - 1 now) a RECV between its members
    with pytest.raises(ScheduleError, match="must be followed by its members"):
        validate(replace(low, programs=tuple(tuple(p) for p in acts)))


def test_split_schedules_may_mix_full_and_split_backwards_but_not_both_for_one():
    sc = build("dualpipev", 2, 4)
    ops = {a.op for p in sc.programs for a in p}
    assert {"B", "I", "W", OVERLAP_F_B} <= ops
    acts = [list(p) for p in sc.programs]
    k = next(k for k, a in enumerate(acts[0]) if a.op == "I")
    i = acts[0][k]
    acts[0].insert(k, Action("B", i.stage, i.microbatch))
    with pytest.raises(ScheduleError, match="runs twice|runs besides the full B"):
        validate(replace(sc, programs=tuple(tuple(p) for p in acts)))
    one = build("1f1b", 2, 2)
    with pytest.raises(ScheduleError, match="backward is a full B"):
        validate(replace(one, programs=(tuple(one.programs[0]),
                                       tuple(a._replace(op="I") if a.op == "B" else a for a in one.programs[1]))))


# ---- timelines ----

def test_pairs_are_drawn_in_every_timeline(tmp_path):
    from stagewise.viz import render_png, render_text, to_chrome_trace

    for overlap in (False, True):
        tl = simulate(build("dualpipev", 4, 8), Costs(f=1, b=2, i=1, w=1, overlap=overlap)).timeline
        text = render_text(tl, width=200)
        assert re.search(r"F\d+\+b\d+|f\d+\+B\d+", text), text  # a pair box: forward + backward of another chunk
        assert "F+B pair" in text
        png = render_png(tl, str(tmp_path / f"pair_{overlap}.png"))
        assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
        trace = to_chrome_trace(tl)
        xs = [e for e in trace["traceEvents"] if e["ph"] == "X"]
        pairs = [e for e in xs if e["cat"] == OVERLAP_F_B]
        assert len(pairs) == sum(1 for p in build("dualpipev", 4, 8).programs for a in p if a.op == OVERLAP_F_B)
        for p in pairs:
            inside = [e for e in xs if e["tid"] == p["tid"] and e is not p and p["ts"] <= e["ts"]
                      and e["ts"] + e["dur"] <= p["ts"] + p["dur"] + 1e-6 and e["dur"] > 0]
            assert sorted(e["name"] for e in inside) == sorted(p["name"].split("+"))
            assert p["args"]["overlapped"] is overlap
        json.dumps(trace)


# ---- the runtime runs them: float64 parity with one process ----

NEW_RUNTIME_M = [1, 2, 3, 4, 8]


def _check_parity(results: list[dict]) -> None:
    for rank_result in results:
        for (name, m), errs in rank_result.items():
            for what in ("loss", "grad", "weight"):
                assert errs[what] <= 1e-10, (name, m, what, errs)
            assert errs["watchdogs"] == 0, (name, m, errs)


@pytest.mark.parametrize("world", [2, 4])
def test_parity_threads(world):
    """Every new schedule x m on `world` thread devices: loss, gradients and 3 Adam steps equal one process."""
    import torch
    from dist_workers import parity

    dtype = torch.get_default_dtype()
    try:
        _check_parity([parity(0, world, NEW_RUNTIME_M, steps=3, local=True, schedules=list(NEW))])
    finally:
        torch.set_default_dtype(dtype)


@pytest.mark.parametrize("world", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_parity_gloo(world):
    """The same across `world` processes over gloo (spawned, as tests/test_runtime.py::test_parity_gloo)."""
    from dist_workers import parity

    from stagewise import spawn

    _check_parity(spawn(parity, world, args=(NEW_RUNTIME_M, 3, False, list(NEW)), timeout=600))


def test_measured_trace_shows_the_pairs():
    """The executor runs a pair's members one after the other and records the pair around them."""
    import torch
    from toy import loss_fn, make_batch, make_layers

    from stagewise import Pipeline

    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pipe = Pipeline(make_layers(), loss_fn, schedule="dualpipev", microbatches=4, timeout=20, local_devices=2,
                        show_partition=False)
        pipe.train_step(make_batch(8, 5))
        tl = pipe.last_trace()
        pipe.eval_step(make_batch(8, 5))  # an evaluation pass runs only the pairs' forwards
        pipe.close()
    finally:
        torch.set_default_dtype(dtype)
    pairs = [e for e in tl.events if e.op == OVERLAP_F_B]
    expected = sum(1 for p in pipe.schedule.programs for a in p if a.op == OVERLAP_F_B)
    assert len(pairs) == expected > 0
    for p in pairs:
        (fop, fs, fn), (bop, bs, bn) = p.extra["pair"]
        inside = [e for e in tl.events if e.device == p.device and e.extra.get("in_pair")
                  and p.start <= e.start and e.end <= p.end]
        assert sorted((e.op, e.stage, e.microbatch) for e in inside) == sorted([(fop, fs, fn), (bop, bs, bn)])


def test_pipeline_runs_a_schedule_file(tmp_path):
    """A schedule file goes to Pipeline like a name; it decides the micro-batches."""
    import torch
    from toy import loss_fn, make_batch, make_layers, reference

    from stagewise import Pipeline
    from stagewise.schedules import save

    path = save(build("v-min", 2, 3), tmp_path / "vmin.csv")
    dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        pipe = Pipeline(make_layers(), loss_fn, schedule=str(path), timeout=20, local_devices=2, show_partition=False)
        assert (pipe.schedule.name, pipe.microbatches) == ("vmin", 3)
        loss = pipe.train_step(make_batch(9, 5))
        pipe.close()
        ref_loss, _, _ = reference(make_layers(), make_batch(9, 5))
    finally:
        torch.set_default_dtype(dtype)
    assert abs(loss.item() - ref_loss.item()) <= 1e-10 * abs(ref_loss.item())
