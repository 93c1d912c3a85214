"""The planner: exact balances, pruning that never drops the best, ties, recompute, the CLI,
`Pipeline(schedule="auto")`, the saved-activation prediction of every synchronous schedule, `stagewise check`."""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import plan_models
import pytest
import torch

from stagewise.measure.trace_costs import compare
from stagewise.partition import CostModel, Footprint, LayerProfile, ProfileSet, SizeProfile, predict, search
from stagewise.partition.balances import compositions_array
from stagewise.partition.plan_search import best_balance, default_microbatches
from stagewise.partition.plan_ties import PREFERENCE, preference
from stagewise.partition.units import parse_bytes
from stagewise.schedules import SYNCHRONOUS, build
from stagewise.schedules.recompute import MODES, with_recompute

ROOT = Path(__file__).resolve().parents[1]


def synthetic(rng: random.Random, num_layers: int, sizes=(1, 2, 4, 8), tied: bool = False, loss: int = 0,
              noise: float = 0.0) -> ProfileSet:
    """Layer costs that grow with the micro-batch (with a per-call overhead), random per layer."""
    base = [(rng.uniform(0.5, 3.0), rng.randint(100, 5000), rng.randint(50, 4000)) for _ in range(num_layers)]
    out = {}
    for n in sizes:
        layers = []
        for i, (t, params, act) in enumerate(base):
            f = 0.2 + t * n
            shared = {0: 100} if tied and i in (0, num_layers - 1) else {}
            layers.append(LayerProfile(i, "L", forward=f, backward=2 * f, input_grad=f, params=params,
                                       output_bytes=64 * n, saved_bytes=act * n, shared=shared))
        out[n] = SizeProfile(n, tuple(layers), input_bytes=8 * n, loss_bytes=loss * n, noise=noise,
                             weight_grad=tuple(x.forward * 1.1 for x in layers))
    return ProfileSet(out, step_per_param=1e-4)


def brute_best(model: CostModel, limit: float = math.inf) -> float:
    comps = compositions_array(model.num_layers, model.schedule.num_stages)
    steps = [model.estimate(b.tolist()).step_s for b, peak in zip(comps, model.memory(comps).max(axis=1))
             if peak <= limit]
    return min(steps) if steps else math.inf


# ---- the search, on synthetic profiles ----

def test_the_balance_step_is_exact():
    rng = random.Random(0)
    for trial in range(24):
        name = rng.choice(["1f1b", "gpipe", "zb-h1", "interleaved", "zbv", "v-min", "dualpipev"])
        P, m = rng.choice([2, 3]), rng.choice([2, 4, 5])
        schedule = with_recompute(build(name, P, m), MODES[trial % 3])
        L = rng.randint(schedule.num_stages, schedule.num_stages + 4)
        prof = synthetic(rng, L, tied=trial % 3 == 0, loss=rng.choice([0, 500])).at(2)
        model = CostModel(schedule, prof, step_per_param=1e-4, cores=rng.choice([None, 2]))
        comps = compositions_array(L, schedule.num_stages)
        peaks = model.memory(comps).max(axis=1)
        for limit in (math.inf, float(np.quantile(peaks, 0.3))):
            got, why = best_balance(model, limit)
            want = brute_best(model, limit)
            assert got is not None and why == ""
            assert got.step_s == pytest.approx(want, rel=1e-9), (name, P, m, L, limit)
            assert max(got.memory) <= limit


def test_the_cost_model_agrees_with_the_footprint_without_recompute():
    rng = random.Random(1)
    for name in ("1f1b", "gpipe", "interleaved", "zbv", "zb-h2"):
        schedule = build(name, 2, 4)
        prof = synthetic(rng, 7, tied=True).at(1)
        model = CostModel(schedule, prof)
        fp = Footprint(schedule, [x.params for x in prof.layers], [x.saved_bytes for x in prof.layers],
                       shared=[x.shared for x in prof.layers])
        comps = compositions_array(7, schedule.num_stages)
        assert np.allclose(model.memory(comps), [fp.devices(b.tolist()) for b in comps])


def test_recompute_keeps_only_stage_inputs_and_pays_a_forward():
    rng = random.Random(2)
    prof = synthetic(rng, 6, loss=1000).at(4)
    schedule = build("1f1b", 2, 4)
    plain, again = CostModel(schedule, prof), CostModel(with_recompute(schedule, "always"), prof)
    b = np.array([[3, 3]])
    act = [sum(x.saved_bytes for x in prof.layers[:3]), sum(x.saved_bytes for x in prof.layers[3:])]
    inputs = [prof.input_bytes, prof.layers[2].output_bytes]
    # 1f1b on 2 devices: stage 0 holds 2 micro-batches, stage 1 holds 1 (and the loss's bytes with it)
    assert plain.activation_peaks(b).tolist() == [[2 * act[0], act[1] + prof.loss_bytes]]
    # recompute: the inputs of the micro-batches in flight, plus one micro-batch's activations rebuilt
    assert again.activation_peaks(b).tolist() == [[2 * inputs[0] + act[0] - inputs[0] + inputs[0],
                                                   inputs[1] + act[1] + prof.loss_bytes]]
    # every micro-batch's forward runs twice: m more forwards per stage
    f = plain.stage_times([3, 3])["f"]
    assert again._work(b)[0] - plain._work(b)[0] == pytest.approx([4 * x for x in f])
    assert again.estimate([3, 3]).step_s > plain.estimate([3, 3]).step_s
    # activations that dwarf the parameters: under a cap only recompute fits, so the planner takes it
    heavy = ProfileSet({n: SizeProfile(n, tuple(LayerProfile(i, "L", forward=1.0 * n, backward=2.0 * n, params=10,
                                                             saved_bytes=10_000 * n, output_bytes=100 * n)
                                                for i in range(6)), input_bytes=8 * n) for n in (4,)})
    free = search(heavy, 2, 16, schedules=["1f1b"], microbatches=[4], recompute=MODES)
    assert free.choice.recompute == "never" and {c.recompute for c in free.candidates} == set(MODES)
    peak = {c.recompute: max(c.memory) for c in free.candidates}
    assert max(peak["always"], peak["except_last"]) < peak["never"] / 1.5
    limit = min(peak.values())
    plan = search(heavy, 2, 16, schedules=["1f1b"], microbatches=[4], recompute=MODES, memory_limit=limit)
    assert plan.choice.recompute != "never" and max(plan.choice.memory) <= limit
    assert plan.choice.step_s > free.choice.step_s  # the extra forward


def test_pruning_never_drops_the_best_under_the_memory_cap():
    rng = random.Random(3)
    for trial in range(4):
        P = (2, 4)[trial % 2]
        L = rng.randint(2 * P, 2 * P + 1)
        profiles = synthetic(rng, L, tied=trial % 2 == 0, loss=rng.choice([0, 300]))
        cores = (None, 2)[trial // 2]
        peaks = sorted(max(c.memory) for c in search(profiles, P, 16, recompute=MODES, top=50).candidates)
        for limit in (None, peaks[len(peaks) // 2]):
            fast = search(profiles, P, 16, recompute=MODES, memory_limit=limit, cores=cores)
            slow = search(profiles, P, 16, recompute=MODES, memory_limit=limit, cores=cores, exhaustive=True)
            assert fast.fastest.step_s == pytest.approx(slow.fastest.step_s, rel=1e-12)
            assert fast.choice == slow.choice
            assert [c.step_s for c in fast.candidates[:5]] == pytest.approx([c.step_s for c in slow.candidates[:5]])
            assert fast.stats["simulations"] <= slow.stats["simulations"]
            if limit is not None:
                assert all(max(c.memory) <= limit for c in fast.candidates)


def test_ties_go_to_fewer_actions_then_the_simpler_schedule():
    rng = random.Random(4)
    profiles = synthetic(rng, 8, noise=0.0)
    exact = search(profiles, 2, 16, noise=0.0, top=100)
    assert exact.choice.step_s == exact.fastest.step_s
    for band in (0.01, 0.05, 0.3):
        plan = search(profiles, 2, 16, noise=band, top=100)
        tied = [c for c in plan.candidates if c.step_s <= plan.fastest.step_s * (1 + band)]
        assert plan.choice == min(tied, key=preference)
    # with equal stages 1f1b and gpipe take the same time; 1f1b is preferred (the same time in less memory)
    even = ProfileSet({n: SizeProfile(n, tuple(LayerProfile(i, "L", forward=1.0 * n, backward=2.0 * n, params=10)
                                               for i in range(4))) for n in (1, 2, 4, 8)})
    both = search(even, 2, 16, schedules=["gpipe", "1f1b"], microbatches=[4], noise=0.0)
    assert both.candidates[0].step_s == pytest.approx(both.candidates[1].step_s)
    assert both.choice.schedule == "1f1b"
    # a wide band chooses the fewest micro-batches among the simplest schedule's
    wide = search(profiles, 2, 16, schedules=["1f1b"], microbatches=[2, 4, 8], noise=10.0)
    assert wide.choice.microbatches == 2
    assert PREFERENCE.index("1f1b") < PREFERENCE.index("gpipe") < PREFERENCE.index("zbv")
    # fewer actions per device (m x virtual stages) come before the simpler schedule, then fewer virtual stages
    c = both.choice
    many, few = replace(c, schedule="1f1b", microbatches=16), replace(c, schedule="zb-h1", microbatches=4)
    looped = replace(c, schedule="interleaved", microbatches=4, virtual_stages=2)
    assert min([many, few], key=preference) is few and min([many, looped], key=preference) is looped
    assert min([looped, replace(c, schedule="1f1b", microbatches=8)], key=preference).schedule == "1f1b"


def test_memory_limit_errors_and_parsing():
    assert parse_bytes("2GiB") == 2 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20 and parse_bytes("1.5GB") == 1.5e9
    assert parse_bytes(1000) == 1000.0 and parse_bytes(None) is None and parse_bytes("3e9") == 3e9
    with pytest.raises(ValueError, match="2GiB"):
        parse_bytes("two gigs")
    from stagewise.partition import PartitionError

    with pytest.raises(PartitionError, match="smallest peak"):
        search(synthetic(random.Random(5), 6), 2, 8, memory_limit=10)
    assert default_microbatches(16, 4) == [4, 8, 16] and default_microbatches(16, 2) == [2, 4, 8, 16]
    assert default_microbatches(3, 4) == [3]
    one = search(synthetic(random.Random(6), 3), 1, 8, data_parallel=2)  # one stage, two replicas
    assert one.choice.balance == [3] and one.choice.samples == 4 // one.choice.microbatches


# ---- on real layers ----

def stagewise_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    return subprocess.run([sys.executable, "-m", "stagewise.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_plan_cli_json_on_gpt2_tiny():
    out = stagewise_cli("plan", "--model", "gpt2-tiny", "--stages", "2", "--batch", "8", "--seq-len", "16",
                        "--runs", "2", "--repeats", "1", "--memory-limit", "64MiB", "--json")
    assert out.returncode == 0, out.stderr[-3000:]
    data = json.loads(out.stdout)
    choice, candidates = data["choice"], data["candidates"]
    assert choice["schedule"] in SYNCHRONOUS and 8 % choice["microbatches"] == 0
    assert sum(choice["balance"]) == 6 and len(choice["balance"]) == 2 * choice["virtual_stages"]
    assert max(choice["memory"]) <= 64 * 2**20
    assert [c["step_s"] for c in candidates] == sorted(c["step_s"] for c in candidates) or choice not in candidates[:5]
    assert choice["step_s"] <= candidates[0]["step_s"] * (1 + data["noise"]) + 1e-12
    assert data["stats"]["configurations"] >= data["stats"]["evaluated"] > 0 and data["stats"]["runs"] == 2
    text = stagewise_cli("plan", "--model", "gpt2-tiny", "--stages", "2", "--batch", "8", "--seq-len", "16",
                         "--runs", "1", "--repeats", "1", "--schedules", "1f1b", "zbv")
    assert text.returncode == 0 and "choice:" in text.stdout and "tokens/s" in text.stdout, text.stderr[-2000:]


def test_pipeline_plans_itself_and_meets_its_saved_bytes_prediction():
    from stagewise import Pipeline
    from stagewise.models import lm_loss

    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    pipe = Pipeline(plan_models.small_gpt(), lm_loss, schedule="auto", microbatches="auto", partition="auto",
                    sample=(ids, ids), memory_limit="256MiB", local_devices=2, show_partition=False,
                    planner={"runs": 1, "repeats": 1}, optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    try:
        c = pipe.plan.choice
        assert (pipe.schedule.name, pipe.microbatches, pipe.schedule.virtual_stages, pipe.balance) == \
            (c.schedule, c.microbatches, c.virtual_stages, c.balance)
        assert "choice:" in pipe.plan.format()
        assert pipe.plan.settings["latency"] == 0.0 and pipe.plan.settings["bandwidth"] is None  # CPU: not charged
        losses = [pipe.train_step((ids, ids)).item() for _ in range(3)]
        assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
        result = compare(pipe.plan.choice, pipe.last_trace(), 0.1)
        assert result["saved_bytes"]["measured"] == pytest.approx(result["saved_bytes"]["predicted"], rel=0.05)
    finally:
        pipe.close()


def test_pipeline_recomputes_when_only_recompute_fits():
    from stagewise import Pipeline
    from stagewise.measure.planner_profiles import measure
    from stagewise.models import lm_loss

    ids = torch.randint(0, 128, (8, 64), generator=torch.Generator().manual_seed(0))
    layers = plan_models.small_gpt(vocab=128, seq=64)
    profiles = measure(layers, (ids, ids), lm_loss, [1, 2, 4], runs=1, repeats=1)

    def least(mode: str) -> float:  # the lowest peak of any balance and m in (2, 4, 8) under 1f1b
        peaks = []
        for m in (2, 4, 8):
            model = CostModel(with_recompute(build("1f1b", 2, m), mode), profiles.at(8 // m))
            peaks.append(model.memory(compositions_array(6, 2)).max(axis=1).min())
        return float(min(peaks))

    limit = least("always")
    assert least("never") > limit * 1.2  # activations dominate: without recompute nothing fits
    pipe = Pipeline(plan_models.small_gpt(vocab=128, seq=64), lm_loss, schedule="1f1b", microbatches="auto",
                    sample=(ids, ids), memory_limit=limit, recompute="auto", local_devices=2,
                    show_partition=False, planner={"runs": 1, "repeats": 1, "cores": 0, "max_microbatches": 8})
    try:
        c = pipe.plan.choice
        assert c.recompute != "never" and max(c.memory) <= limit
        assert any(a.op == "RECOMPUTE" for a in pipe.schedule.programs[0])
        pipe.train_step((ids, ids))
        got = compare(pipe.plan.choice, pipe.last_trace(), 0.1)["saved_bytes"]
        assert got["measured"] == pytest.approx(got["predicted"], rel=0.05)
    finally:
        pipe.close()


def test_saved_activation_bytes_match_the_prediction_for_every_synchronous_schedule():
    from stagewise import Pipeline
    from stagewise.measure.planner_profiles import measure
    from stagewise.models import lm_loss

    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    profiles = measure(plan_models.small_gpt(), (ids, ids), lm_loss, [2], runs=1, repeats=1)
    for name, mode in [(n, "never") for n in SYNCHRONOUS] + [("1f1b", "always"), ("zbv", "except_last")]:
        pipe = Pipeline(plan_models.small_gpt(), lm_loss, schedule=name, microbatches=4, local_devices=2,
                        show_partition=False, recompute=mode)
        try:
            pipe.train_step((ids, ids))
            c = predict(profiles, pipe.schedule, 8, pipe.balance, recompute=mode)
            got = compare(c, pipe.last_trace(), 0.1)["saved_bytes"]
            assert got["measured"] == pytest.approx(got["predicted"], rel=0.05), (name, mode)
            assert all(x > 0 for x in got["measured"]), name
        finally:
            pipe.close()


def test_check_proves_a_float64_model_exact_and_catches_a_broken_layer():
    import stagewise

    report = stagewise.check(plan_models.layers(), plan_models.loss, plan_models.sample(8), schedule="zbv",
                             stages=2, microbatches=4)
    assert report.ok and report.worst[1] <= 1e-10 and len(report.grad_errors) == 24
    out = stagewise_cli("check", "--layers", "plan_models:layers", "--loss", "plan_models:loss", "--sample",
                        "plan_models:sample", "--schedule", "1f1b", "--stages", "2", "--json")
    assert out.returncode == 0, out.stderr[-2000:]
    data = json.loads(out.stdout)
    assert data["ok"] and data["worst"][1] <= 1e-10 and data["dtype"] == "torch.float64"
    bad = stagewise_cli("check", "--layers", "plan_models:broken_layers", "--loss", "plan_models:loss", "--sample",
                        "plan_models:sample", "--schedule", "1f1b", "--stages", "2")
    assert bad.returncode == 1 and "FAILED" in bad.stdout, bad.stdout + bad.stderr[-2000:]


# ---- data parallelism and precision in the model ----

def test_gradient_reductions_are_priced_in_the_prediction():
    from stagewise.schedules.reduction import with_reductions

    profiles = synthetic(random.Random(11), 6)
    schedule = with_reductions(build("1f1b", 2, 4))
    prof = profiles.at(2)
    bw = 1e6
    free = CostModel(schedule, prof, replicas=2)
    paid = CostModel(schedule, prof, replicas=2, reduce_bandwidth=bw)
    balance = [3, 3]
    params = [sum(x.params for x in prof.layers[:3]), sum(x.params for x in prof.layers[3:])]
    assert paid.reduce_times(balance) == pytest.approx([p * 4 * 1.0 / bw for p in params], rel=1e-12)  # 2(D-1)/D = 1
    assert free.reduce_times(balance) == [0.0, 0.0]
    extra = paid.estimate(balance).step_s - free.estimate(balance).step_s
    reduce = paid.reduce_times(balance)
    assert min(reduce) - 1e-9 <= extra <= max(reduce) + 1e-9  # one device's reduction ends the step
    # busy is compute, as the trace measures it: the reductions are not in it
    assert paid.estimate(balance).busy_s == pytest.approx(free.estimate(balance).busy_s, rel=1e-12)
    # the search puts REDUCE actions into every candidate and charges them
    cheap = search(profiles, 2, 8, data_parallel=2, schedules=["1f1b"], microbatches=[4])
    dear = search(profiles, 2, 8, data_parallel=2, schedules=["1f1b"], microbatches=[4], reduce_bandwidth=bw)
    assert dear.settings["reduce_bandwidth"] == bw and cheap.settings["reduce_bandwidth"] is None
    assert dear.choice.step_s > cheap.choice.step_s
    again = predict(profiles, schedule, 8, dear.choice.balance, data_parallel=2, reduce_bandwidth=bw)
    assert again.step_s == pytest.approx(dear.choice.step_s, rel=1e-12)
    assert "gradient reduction at" in dear.format()


def test_the_links_are_measured_on_the_runs_world():
    from stagewise.measure.links import Links, local_links, measure_links
    from stagewise.runtime.processes import make_world

    world = make_world(2, data_parallel=2)  # four threads: two devices, two replicas
    try:
        links = measure_links(world, 1e6, 4e6)
        assert 0 < links.latency < 1 and 0 < links.bandwidth < math.inf and 0 < links.reduce_bandwidth < math.inf
    finally:
        world.close()
    assert local_links(1, 1, 1e6, 4e6) == Links()  # nothing to measure, nothing started
    here = local_links(4, 1, 1e6, 4e6, timeout=120)  # two gloo processes on this machine
    assert 0 < here.latency < 1 and 0 < here.bandwidth < math.inf and here.reduce_bandwidth == math.inf
    both = local_links(2, 2, 1e6, 4e6, timeout=120)
    assert 0 < both.reduce_bandwidth < math.inf and 0 < both.bandwidth < math.inf


def test_messages_are_priced_in_the_prediction():
    profiles = synthetic(random.Random(12), 6)
    free = search(profiles, 2, 8, schedules=["1f1b"], microbatches=[4])
    paid = search(profiles, 2, 8, schedules=["1f1b"], microbatches=[4], latency=0.5, bandwidth=1e3)
    assert paid.choice.step_s > free.choice.step_s
    assert paid.settings["latency"] == 0.5 and paid.settings["bandwidth"] == 1e3
    assert "messages 500000 us + bytes at 0.00 GB/s" in paid.format()


def test_the_profile_runs_in_the_runs_precision():
    from stagewise.measure.planner_profiles import measure
    from stagewise.models import lm_loss

    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    full = measure(plan_models.small_gpt(), (ids, ids), lm_loss, [2], runs=1, repeats=1).at(2)
    half = measure(plan_models.small_gpt(), (ids, ids), lm_loss, [2], runs=1, repeats=1, precision="bf16")
    assert half.meta["precision"] == "bf16"
    # what a stage sends is cast to bf16, as the pipeline sends it
    assert [x.output_bytes for x in half.at(2).layers[:-1]] == [x.output_bytes // 2 for x in full.layers[:-1]]


def test_a_bad_precision_fails_before_any_planning():
    from stagewise import Pipeline
    from stagewise.models import lm_loss

    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="precision must be one of"):
        Pipeline(plan_models.small_gpt(), lm_loss, schedule="auto", microbatches="auto", partition="auto",
                 sample=(ids, ids), local_devices=2, precision="fp8", show_partition=False)


def test_a_data_parallel_pipeline_plans_with_its_reductions():
    from stagewise import Pipeline
    from stagewise.models import lm_loss

    ids = torch.randint(0, 512, (8, 16), generator=torch.Generator().manual_seed(0))
    pipe = Pipeline(plan_models.small_gpt(), lm_loss, schedule="auto", microbatches="auto", partition="auto",
                    sample=(ids, ids), local_devices=2, data_parallel=2, show_partition=False,
                    planner={"runs": 1, "repeats": 1, "max_microbatches": 4, "measure_links": True}, precision="bf16",
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=1e-2))
    try:
        settings = pipe.plan.settings
        assert settings["data_parallel"] == 2 and settings["precision"] == "bf16"
        assert 0 < settings["reduce_bandwidth"] < math.inf and 0 < settings["latency"] < 1
        assert any(a.op == "REDUCE" for a in pipe.schedule.programs[0])
        assert math.isfinite(pipe.train_step((ids, ids)).item())
    finally:
        pipe.close()


def test_ties_are_the_candidates_the_profile_runs_do_not_separate():
    from stagewise.partition.plan_ties import MAX_BAND

    rng = random.Random(21)
    base = synthetic(rng, 8)

    def jittered(seed: int) -> dict:  # one profile run: every layer's times moved by up to +-30%
        r = random.Random(seed)
        out = {}
        for n, size in base.sizes.items():
            k = [r.uniform(0.7, 1.3) for _ in size.layers]
            layers = tuple(replace(x, forward=x.forward * f, backward=x.backward * f, input_grad=x.input_grad * f)
                           for x, f in zip(size.layers, k))
            out[n] = replace(size, layers=layers, weight_grad=tuple(w * f for w, f in zip(size.weight_grad, k)))
        return out

    same = ProfileSet(base.sizes, base.step_per_param, runs=2, per_run=(base.sizes, base.sizes))
    agreed = search(same, 2, 16, top=100)
    assert agreed.stats["tie_rule"] == "runs" and agreed.choice.step_s == agreed.fastest.step_s
    noisy = ProfileSet(base.sizes, base.step_per_param, runs=3, per_run=tuple(jittered(s) for s in (1, 2, 3)))
    plan = search(noisy, 2, 16, top=100)
    best = plan.fastest

    def step(run: int, c) -> float:
        sc = with_recompute(build(c.schedule, 2, c.microbatches, c.virtual_stages), c.recompute)
        return predict(noisy.run(run), sc, 16, c.balance).step_s

    tied = [c for c in plan.candidates if c.step_s <= best.step_s * (1 + MAX_BAND)
            and (c is best or any(step(k, c) <= step(k, best) for k in range(3)))]
    within = [c for c in plan.candidates if c.step_s <= best.step_s * (1 + MAX_BAND)]
    assert 1 < len(tied) < len(within) and plan.stats["tied"] == len(tied)  # some in the band are separated
    assert plan.choice == min(tied, key=preference)
    assert plan.noise == pytest.approx(max(c.step_s / best.step_s - 1 for c in tied))
    assert "one run alone predicts no slower" in plan.format() and "no ties" in agreed.format()
    assert len(ProfileSet.from_dict(noisy.to_dict()).per_run) == 3


# ---- the optimizer step and the tied-parameter sync in the model; measured traces; no processes ----

def tied_pair() -> SizeProfile:
    """4 layers of F = 1 s and B = 2 s, no bytes sent; layer 0 and layer 3 use one tied parameter of 1000
    elements (counted at layer 0); parameters 1000, 100, 100, 50."""
    params = [1000, 100, 100, 50]
    return SizeProfile(1, tuple(LayerProfile(i, "L", forward=1.0, backward=2.0, params=params[i],
                                             shared={0: 1000} if i in (0, 3) else {}) for i in range(4)))


def test_the_optimizer_step_and_the_tie_sync_are_on_the_simulated_timeline_and_in_the_step(tmp_path):
    from stagewise.measure.trace_costs import busy_seconds
    from stagewise.viz import render_png

    schedule = build("1f1b", 2, 2)
    # 1 ms per parameter; messages 0.1 s; the tie's gradient: 1000 x 4 bytes at 4000 bytes/s
    model = CostModel(schedule, tied_pair(), step_per_param=1e-3, latency=0.1, bandwidth=4000.0)
    est = model.estimate([2, 2])
    # Without the step, by hand (F = 2, B = 4 per stage, 0.1 s per message): device 0 runs F0 [0, 2], F1 [2, 4],
    # B0 [8.2, 12.2], B1 [14.2, 18.2]; device 1 runs F0 [2.1, 4.1], B0 [4.1, 8.1], F1 [8.1, 10.1], B1 [10.1, 14.1].
    # The tie's all-reduce (2 x 0.1 s latency + 4000 / 4000 s) starts when device 0 is done: 18.2 -> 19.4; then
    # the optimizer steps: device 0 holds 1100 parameters (1.1 s), device 1 its 150 and a copy of the tie (1.15 s).
    assert est.optimizer_s == pytest.approx([1.1, 1.15]) and est.tie_sync_s == pytest.approx(1.2)
    assert est.step_s == pytest.approx(19.4 + 1.15)
    steps = {e.device: e for e in model.simulation([2, 2]).timeline.events if e.op == "STEP"}
    assert (steps[0].start, steps[0].end) == pytest.approx((18.2, 19.4 + 1.1))
    assert (steps[1].start, steps[1].end) == pytest.approx((14.1, 19.4 + 1.15))
    assert steps[1].extra == pytest.approx({"optimizer_s": 1.15, "tie_sync_s": 1.2, "tie_wait_s": 4.1})
    assert steps[0].extra["tie_wait_s"] == pytest.approx(0.0)
    assert Path(render_png(model.simulation([2, 2]).timeline, str(tmp_path / "step.png"))).stat().st_size > 0
    # busy counts the STEP as a measured trace does (`busy_seconds`, the one reader of traces)
    assert est.busy_s == pytest.approx(busy_seconds(model.simulation([2, 2]).timeline, [0, 1]))
    # both terms are what separates this step from the schedule alone
    bare = CostModel(schedule, tied_pair(), latency=0.1, bandwidth=4000.0)
    assert bare.estimate([2, 2]).step_s == pytest.approx(19.4)  # the sync still waits for device 0
    untied = SizeProfile(1, tuple(replace(x, shared={}) for x in tied_pair().layers))
    alone = CostModel(schedule, untied, step_per_param=1e-3, latency=0.1, bandwidth=4000.0).estimate([2, 2])
    assert alone.step_s == pytest.approx(18.2 + 1.1) and alone.optimizer_s == pytest.approx([1.1, 0.15])
    # the bounds the search prunes with stay below the step
    assert model.lower_bounds(np.array([[2, 2]]))[0] <= est.step_s
    # and the planner reports both, for the choice it makes
    plan = search(ProfileSet({1: tied_pair()}, step_per_param=1e-3), 2, 2, schedules=["1f1b"], microbatches=[2],
                  latency=0.1, bandwidth=4000.0)
    assert plan.choice.optimizer_s and plan.choice.tie_sync_s == pytest.approx(1.2)
    assert "tied-parameter sync 1.2 s" in plan.format()


def test_a_tied_head_and_embedding_on_one_device_save_the_sync():
    """A V places the first and the last stage on device 0: no all-reduce, no waiting for another device."""
    model = CostModel(build("zbv", 2, 2), tied_pair(), step_per_param=1e-3, latency=0.1, bandwidth=4000.0)
    est = model.estimate([1, 1, 1, 1])
    assert est.tie_sync_s == 0.0 and model.tie_syncs([1, 1, 1, 1]) == ()
    assert est.optimizer_s == pytest.approx([1.05, 0.2])  # device 0: 1000 + 50, the tie once


def test_a_measured_trace_becomes_per_stage_costs_in_one_place():
    from stagewise.measure.trace_costs import busy_seconds, saved_peaks, step_costs
    from stagewise.schedules import Costs, Event, Timeline

    def ev(d, t0, t1, op, s, mb, **extra):
        return Event(d, 100 + t0, 100 + t1, op, s, mb, extra=extra)

    trace = Timeline(2, [
        ev(0, 0, 1, "F", 0, 0, saved_bytes=10), ev(0, 1, 3, "F", 0, 1, saved_bytes=20),
        ev(1, 1.5, 2.5, "F", 1, 0, saved_bytes=5, wait_s=0.5), ev(1, 2.5, 4.5, "B", 1, 0),
        ev(1, 4.5, 5.5, "F", 1, 1, saved_bytes=5), ev(0, 5, 8, "B", 0, 0), ev(1, 5.5, 7.5, "B", 1, 1),
        ev(1, 7.5, 10.6, "STEP", 1, -1), ev(0, 8, 10, "B", 0, 1), ev(0, 10, 10.5, "STEP", 0, -1),
    ], unit="s", num_stages=2)
    schedule = build("1f1b", 2, 2)
    got = step_costs(trace, schedule)
    assert got.f == pytest.approx([1.5, 1.0]) and got.b == pytest.approx([2.5, 2.0]) and got.i is None
    assert got.step == pytest.approx([0.5, 3.1]) and got.compute == pytest.approx([8.0, 6.0])
    assert got.wait == pytest.approx([0.0, 0.5]) and got.recompute is None
    assert got.costs() == Costs(f=got.f, b=got.b, step=got.step) and got.costs(step=False).step == 0.0
    assert busy_seconds(trace, [0, 1]) == pytest.approx([8.5, 9.1])
    assert saved_peaks(trace, [0, 1]) == [30.0, 5.0]
    assert step_costs(trace, schedule, rows=[1, 0]).step == pytest.approx([3.1, 0.5])  # rows: one replica's ranks
    split = Timeline(2, [ev(0, 0, 1, "F", 0, 0), ev(1, 1, 2, "F", 1, 0), ev(1, 2, 3, "I", 1, 0),
                         ev(0, 3, 5, "W", 0, 0), ev(1, 3, 4.5, "W", 1, 0)], unit="s", num_stages=2)
    zb = step_costs(split, build("zb-h1", 2, 1))
    assert zb.i == pytest.approx([0.0, 1.0]) and zb.w == pytest.approx([2.0, 1.5])
    assert zb.b == pytest.approx([2.0, 2.5])


def test_an_auto_pipeline_starts_no_process(monkeypatch):
    """`Pipeline(schedule="auto")` measures in-process only: on its own world (threads here, links and the
    data-parallel reduction included), never by starting processes as `stagewise plan` may."""
    import ast
    import multiprocessing.process

    from stagewise import Pipeline
    from stagewise.models import lm_loss

    for module in ("stagewise/measure/plan_model.py", "stagewise/pipeline.py"):
        names = {n.id if isinstance(n, ast.Name) else n.attr if isinstance(n, ast.Attribute) else a.name
                 for n in ast.walk(ast.parse((ROOT / module).read_text()))
                 for a in (n.names if isinstance(n, (ast.Import, ast.ImportFrom)) else [n])
                 if isinstance(n, (ast.Name, ast.Attribute, ast.Import, ast.ImportFrom))}
        assert not names & {"local_links", "spawn", "launch"}, module

    def refuse(*args, **kwargs):
        raise AssertionError("Pipeline(schedule='auto') started a process")

    monkeypatch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
    monkeypatch.setattr(subprocess.Popen, "__init__", refuse)
    for name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "spawnv", "spawnve", "execv", "execve", "system"):
        if hasattr(os, name):
            monkeypatch.setattr(os, name, refuse)
    ids = torch.randint(0, 512, (4, 16), generator=torch.Generator().manual_seed(0))
    pipe = Pipeline(plan_models.small_gpt(), lm_loss, schedule="auto", microbatches="auto", partition="auto",
                    sample=(ids, ids), local_devices=2, data_parallel=2, show_partition=False,
                    planner={"runs": 1, "repeats": 1, "max_microbatches": 2, "measure_links": True},
                    keep_host_memory=False)  # the runtime finds libc with `ldconfig -p`: a process, not the planner's
    try:
        assert 0 < pipe.plan.settings["reduce_bandwidth"] < math.inf and 0 < pipe.plan.settings["latency"] < 1
    finally:
        pipe.close()
