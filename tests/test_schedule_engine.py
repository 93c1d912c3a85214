"""The columnar schedule core: fast checks agree with the exact ones, the engine with a plain reference."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stagewise.schedules import SCHEDULES, Costs, ScheduleError, build, lower, simulate, validate
from stagewise.schedules.actions import Action
from stagewise.schedules.execution import _timed_scalar, compile_schedule, timed_execution, unit_execution
from stagewise.schedules.programs import Programs
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.validate import _check_structure, _communication_ok, _structure_ok, check_communication

NAMES = sorted(SCHEDULES)


def _build(name: str, P: int, m: int) -> Schedule:
    info = SCHEDULES[name]
    return build(name, P, m, info.default_virtual_stages, **({"batches": 2} if info.asynchronous else {}))


def reference_times(sc: Schedule, dur, delay) -> dict[tuple[int, int], tuple[float, float]]:
    """As-soon-as-possible start/end of every compute action, by repeated passes (slow, obviously right).

    An overlapped pair (OVERLAP_F_B, then its F and B) starts once what both members need is
    there, runs them one after the other, and both results count from the pair's end."""
    S = sc.num_stages
    progs = [[a for a in p if a.op in ("F", "B", "I", "W", "STEP", "OVERLAP_F_B")] for p in sc.programs]
    end: dict = {}
    times: dict = {}
    pos, free = [0] * len(progs), [0.0] * len(progs)

    def needs_of(a, d):
        needs = []
        if a.op == "F":
            if a.stage > 0:
                needs.append((("F", a.stage - 1, a.microbatch), sc.placement[a.stage - 1] != d, a.stage - 1))
            if a.version > 0:
                needs.append((("V", a.stage, a.version), False, 0))
        elif a.op in ("B", "I"):
            needs.append((("F", a.stage, a.microbatch), False, 0))
            if a.stage < S - 1:
                needs.append((("B", a.stage + 1, a.microbatch), sc.placement[a.stage + 1] != d, a.stage))
        elif a.op == "W":
            needs.append((("B", a.stage, a.microbatch), False, 0))
        return needs

    def key_of(a):
        return ("V", a.stage, a.version) if a.op == "STEP" else ("B" if a.op == "I" else a.op, a.stage, a.microbatch)

    progress = True
    while progress:
        progress = False
        for d, prog in enumerate(progs):
            while pos[d] < len(prog):
                a = prog[pos[d]]
                group = prog[pos[d] + 1:pos[d] + 3] if a.op == "OVERLAP_F_B" else [a]
                needs = [n for x in group for n in needs_of(x, d)]
                if any(k not in end for k, _, _ in needs):
                    break
                t = max([free[d]] + [end[k] + (delay[b] if cross else 0.0) for k, cross, b in needs])
                e, k = t, pos[d] + (a.op == "OVERLAP_F_B")
                for x in group:
                    times[(d, k)] = (e, e + dur(x))
                    e += dur(x)
                    k += 1
                for x in group:
                    end[key_of(x)] = e
                if a.op == "OVERLAP_F_B":
                    times[(d, pos[d])] = (t, e)
                free[d] = e
                pos[d] += len(group) + (a.op == "OVERLAP_F_B")
                progress = True
    return times


@settings(max_examples=40, deadline=None)
@given(name=st.sampled_from(NAMES), P=st.integers(1, 6), m=st.integers(1, 10), seed=st.integers(0, 10**6))
def test_simulation_equals_a_plain_reference(name, P, m, seed):
    sc = _build(name, P, m)
    rng = np.random.default_rng(seed)
    S = sc.num_stages
    f, b, i = (rng.uniform(0.1, 3, S).tolist() for _ in range(3))
    costs = Costs(f=f, b=b, i=[min(x, y) for x, y in zip(i, b)], step=float(rng.uniform(0, 1)),
                  latency=float(rng.uniform(0, 1)), bytes=rng.uniform(0, 2, max(S - 1, 1)).tolist(), bandwidth=2.0)
    sim = simulate(sc, costs)
    table = costs.table(S)
    delay = [costs.transfer(S)(k, k + 1) for k in range(max(S - 1, 0))]
    ref = reference_times(sc, lambda a: costs.step if a.op == "STEP" else table[a.op][a.stage], delay)
    got = {}
    for e in sim.timeline.events:
        got.setdefault(e.device, []).append((e.start, e.end))
    for (d, k), (t0, t1) in ref.items():
        assert got[d][k] == pytest.approx((t0, t1), abs=1e-9)
    assert sum(len(v) for v in got.values()) == len(ref)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), P=st.integers(1, 6), m=st.integers(1, 10))
def test_one_row_at_a_time_and_level_by_level_agree(name, P, m):
    sc = _build(name, P, m)
    c = compile_schedule(sc)
    cost = np.linspace(0.5, 2.0, c.n)
    start, end = timed_execution(sc, cost, np.full(max(sc.num_stages - 1, 0), 0.25))
    from stagewise.schedules.execution import _levels
    order, _ = _levels(c, unit_execution(sc)[0])
    prev = np.arange(-1, c.n - 1)
    offs = c.programs.offsets[:-1]
    prev[offs[offs < c.n]] = c.n
    dl = np.r_[np.full(max(sc.num_stages - 1, 0), 0.25), 0.0]
    s2, e2 = np.zeros(c.n), np.zeros(c.n + 2)
    e2[c.n + 1] = np.inf
    _timed_scalar(order, prev[order], c.dep1[order], c.dep2[order], cost[order], dl[c.cross1[order]],
                  dl[c.cross2[order]], s2, e2)
    assert np.allclose(start, s2) and np.allclose(end, e2[:c.n])


def test_a_wrong_unit_run_from_a_generator_is_not_trusted():
    sc = build("zbv", 3, 6)
    progs = sc.programs
    bogus = Programs(progs.op, progs.stage, progs.microbatch, progs.version, progs.peer, progs.offsets,
                     start=np.zeros(progs.num_actions))  # everything at time 0: impossible
    forged = replace(sc, programs=bogus)
    start, _ = unit_execution(forged)
    assert np.array_equal(start, unit_execution(replace(sc, programs=tuple(sc.programs)))[0])
    assert validate(forged).lowered


def test_columns_and_tuples_are_the_same_schedule():
    sc = build("interleaved", 3, 5)
    again = replace(sc, programs=tuple(tuple(p) for p in sc.programs))
    assert again.programs == sc.programs and again == sc
    assert [list(p) for p in again.programs] == [list(p) for p in sc.programs]
    assert validate(again).programs == validate(sc).programs
    assert simulate(again).makespan == simulate(sc).makespan


def _mutations(sc: Schedule, rng: np.random.Generator, n: int) -> list[Schedule]:
    out = []
    for _ in range(n):
        acts = [list(p) for p in sc.programs]
        d = int(rng.integers(len(acts)))
        if len(acts[d]) < 2:
            continue
        kind = rng.integers(4)
        i, j = sorted(rng.choice(len(acts[d]), 2, replace=False).tolist())
        if kind == 0:
            acts[d][i], acts[d][j] = acts[d][j], acts[d][i]
        elif kind == 1:
            del acts[d][i]
        elif kind == 2:
            acts[d][i] = acts[d][i]._replace(version=acts[d][i].version + 1)
        else:
            acts[d][i] = acts[d][i]._replace(microbatch=acts[d][i].microbatch + 1)
        out.append(replace(sc, programs=tuple(tuple(p) for p in acts)))
    return out


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), P=st.integers(1, 4), m=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_fast_structure_check_agrees_with_the_exact_one(name, P, m, seed):
    for bad in _mutations(_build(name, P, m), np.random.default_rng(seed), 6):
        try:
            _check_structure(bad)
            exact = True
        except ScheduleError:
            exact = False
        if _structure_ok(bad):
            assert exact, "the fast check passed a schedule the exact check rejects"
        # the other way round is allowed only for version checks the exact walk makes in order
        elif exact:
            with pytest.raises(ScheduleError):
                validate(bad)


@settings(max_examples=30, deadline=None)
@given(name=st.sampled_from(NAMES), P=st.integers(2, 4), m=st.integers(1, 6), seed=st.integers(0, 10**6))
def test_order_keys_never_prove_a_program_that_deadlocks(name, P, m, seed):
    low = lower(_build(name, P, m))
    assert _communication_ok(low)
    progs = low.programs
    rng = np.random.default_rng(seed)
    for _ in range(6):  # move rows around on one device, their order keys with them
        d = int(rng.integers(P))
        a, b = int(progs.offsets[d]), int(progs.offsets[d + 1])
        i, j = rng.choice(np.arange(a, b), 2, replace=False)
        perm = np.arange(progs.num_actions)
        perm[i], perm[j] = perm[j], perm[i]
        moved = Programs(progs.op[perm], progs.stage[perm], progs.microbatch[perm], progs.version[perm],
                         progs.peer[perm], progs.offsets, order=progs.order[perm])
        bad = replace(low, programs=moved)
        if _communication_ok(bad):
            check_communication(bad)  # must not raise


def test_step_on_a_device_that_does_not_hold_its_stage_is_rejected():
    sc = build("gpipe", 2, 2)
    acts = [list(p) for p in sc.programs]
    acts[0][-1] = Action("STEP", 1, -1, 1)
    with pytest.raises(ScheduleError, match="optimizer step runs there"):
        validate(replace(sc, programs=tuple(tuple(p) for p in acts)))
