"""Partitioning: exact solvers against brute force, every method, the profiler and the table."""

from __future__ import annotations

import itertools
import json
import math
import os
import random
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from torch import nn

from stagewise.measure.layers import profile_layers
from stagewise.partition import (
    Footprint,
    LayerProfile,
    PartitionError,
    PartitionTable,
    Planner,
    auto,
    auto_balance,
    by_memory,
    by_parameters,
    by_time,
    by_type,
    inflight_per_stage,
    memory,
    min_max_balance,
    min_max_partition,
    min_sum_partition,
    resolve_balance,
    uniform,
)
from stagewise.partition.solver import ranges
from stagewise.schedules import build, simulate

GPT2 = ["GPT2Preprocessing"] + ["GPT2Block"] * 12 + ["GPT2Postprocessing"]
EMBED, BLOCK, LN_F = 50257 * 768 + 1024 * 768, 7087872, 2 * 768
WTE = 50257 * 768


def compositions(n: int, k: int, allow_empty: bool = False):
    """Every balance of n layers into k stages (independently of `methods.compositions`)."""
    cuts = itertools.combinations_with_replacement(range(n + 1), k - 1) if allow_empty else \
        itertools.combinations(range(1, n), k - 1)
    for cut in cuts:
        edges = (0, *cut, n)
        yield [b - a for a, b in zip(edges, edges[1:])]


def brute(cost, n: int, k: int, combine=max, allow_empty: bool = False) -> list[int]:
    """The lexicographically largest of the optimal balances, by trying them all."""
    scored = []
    for b in compositions(n, k, allow_empty):
        values = [cost(s, lo, hi) for s, (lo, hi) in enumerate(ranges(b))]
        scored.append((combine(values) if combine is max else sum(values), b))
    best = min(v for v, _ in scored)
    return max(b for v, b in scored if v == best)


def random_costs(rng: random.Random, n: int) -> list[float]:
    kind = rng.choice(["ints", "tenths", "floats", "zeros"])
    if kind == "ints":  # many exact ties
        return [float(rng.randint(0, 3)) for _ in range(n)]
    if kind == "tenths":  # 0.1 + 0.2 != 0.3 in floats: ties only an exact solver sees
        return [rng.choice([0.1, 0.2, 0.3, 0.6]) for _ in range(n)]
    if kind == "zeros":
        return [rng.choice([0.0, 0.0, 1.5, 1e-300]) for _ in range(n)]
    return [rng.uniform(0, 10) for _ in range(n)]


# ---- solvers ----

def test_algorithms_do_not_import_torch():
    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    code = "import sys, stagewise.partition; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)


def test_min_max_balance_matches_brute_force():
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 9)
        k = rng.randint(1, n)
        costs = random_costs(rng, n)
        exact = [Fraction(c) for c in costs]
        expected = brute(lambda s, lo, hi, exact=exact: sum(exact[lo:hi], Fraction(0)), n, k)
        assert min_max_balance(costs, k) == expected, (costs, k)


def test_min_max_balance_allow_empty_matches_brute_force():
    rng = random.Random(1)
    for _ in range(150):
        n = rng.randint(0, 6)
        k = rng.randint(1, 7)
        costs = random_costs(rng, n)
        exact = [Fraction(c) for c in costs]
        expected = brute(lambda s, lo, hi, exact=exact: sum(exact[lo:hi], Fraction(0)), n, k, allow_empty=True)
        got = min_max_balance(costs, k, allow_empty=True)
        assert got == expected and len(got) == k and sum(got) == n


def test_general_solvers_match_brute_force():
    rng = random.Random(2)
    for _ in range(200):
        n = rng.randint(1, 8)
        k = rng.randint(1, n)
        costs = random_costs(rng, n)
        overhead = [rng.choice([0.0, 1.0, 2.5]) for _ in range(k)]
        forbidden = {(rng.randrange(k), rng.randrange(n)) for _ in range(2)}

        def cost(s: int, lo: int, hi: int, costs=costs, overhead=overhead, forbidden=forbidden) -> float:
            # per-stage overhead, stage-dependent weight and some forbidden stages
            if (s, lo) in forbidden and hi - lo > 1:
                return math.inf
            return overhead[s] + (1 + s % 2) * sum(costs[lo:hi])

        for solve, combine in ((min_max_partition, max), (min_sum_partition, sum)):
            expected = brute(cost, n, k, combine)
            if math.isinf(min(max(cost(s, lo, hi) for s, (lo, hi) in enumerate(ranges(b)))
                              for b in compositions(n, k))):
                with pytest.raises(PartitionError, match="no partition"):
                    solve(cost, n, k)
            else:
                assert solve(cost, n, k) == expected, (costs, k, solve.__name__)


def test_solver_handles_large_inputs_quickly():
    rng = random.Random(3)
    costs = [rng.uniform(0, 1) for _ in range(2000)]
    balance = min_max_balance(costs, 16)
    assert sum(balance) == 2000 and len(balance) == 16
    worst = max(math.fsum(costs[lo:hi]) for lo, hi in ranges(balance))
    assert worst <= max(math.fsum(costs[lo:hi]) for lo, hi in ranges(uniform(2000, 16)))
    assert min_max_partition(lambda s, lo, hi: hi - lo, 200, 8) == [25] * 8


def test_solver_errors():
    with pytest.raises(PartitionError, match="cannot cut 3 layers into 4 stages"):
        min_max_balance([1.0, 2.0, 3.0], 4)
    with pytest.raises(PartitionError, match="number of stages must be an integer >= 1, got 0"):
        min_max_balance([1.0], 0)
    with pytest.raises(PartitionError, match="cost of layer 1 is -2.0; layer costs must be finite and >= 0"):
        min_max_balance([1.0, -2.0], 1)
    with pytest.raises(PartitionError, match="cost of layer 0 is nan"):
        by_time([float("nan")], 1)
    with pytest.raises(PartitionError, match="cannot cut 2 layers into 3 stages"):
        min_max_partition(lambda s, lo, hi: 1.0, 2, 3)
    with pytest.raises(PartitionError, match="no partition of 2 layers into 2 stages has a finite maximum stage cost"):
        min_max_partition(lambda s, lo, hi: math.inf, 2, 2)


# ---- by type (DeepSpeed's type:REGEX) ----

def deepspeed_greedy(weights: list[int], num_stages: int) -> list[int] | None:
    """DeepSpeed's cut, restated: the smallest bound b for which filling every stage with as many layers
    as fit (stage weight <= b) covers all layers in `num_stages` stages; None when a stage comes out empty."""
    prefix = list(itertools.accumulate(weights, initial=0))
    for bound in itertools.count(max(weights)):
        parts, lo = [], 0
        while lo < len(weights) and len(parts) < num_stages:
            hi = max(j for j in range(lo, len(weights) + 1) if prefix[j] - prefix[lo] <= bound)
            parts.append(hi - lo)
            lo = hi
        if lo == len(weights):
            parts += [0] * (num_stages - len(parts))
            return parts if all(parts) else None


def test_by_type_reproduces_the_seed_and_deepspeed():
    assert by_type(GPT2, "GPT2Block", 4) == [4, 3, 3, 4]  # the seed's [0, 4) [4, 7) [7, 10) [10, 14)
    assert by_type(GPT2, "GPT2Block", 3) == [5, 4, 5]
    assert by_type(GPT2, "GPT2Block", 2) == [7, 7]
    assert by_type(GPT2, "gpt2block", 4) == [4, 3, 3, 4]  # case-insensitive
    assert by_type(GPT2, "Block$", 12) == [2] + [1] * 10 + [2]
    assert resolve_balance("type:GPT2Block", 14, 4, names=GPT2) == [4, 3, 3, 4]
    rng = random.Random(4)
    compared = 0
    for _ in range(300):
        n = rng.randint(2, 14)
        names = [rng.choice(["Block", "Norm", "Block"]) for _ in range(n)]
        matches = names.count("Block")
        k = rng.randint(1, max(1, min(matches, 6)))
        if matches < k or matches == 0:
            continue
        got = by_type(names, "block", k)
        weights = [int(x == "Block") for x in names]
        assert all(sum(weights[lo:hi]) >= 1 for lo, hi in ranges(got))  # a matching layer in every stage
        ds = deepspeed_greedy(weights, k)
        if ds is not None:
            assert got == ds, (names, k)
            compared += 1
    assert compared > 100


def test_by_type_errors():
    with pytest.raises(PartitionError, match=r"type:Attention matches none of the layer classes "
                                             r"\(GPT2Preprocessing, GPT2Block, GPT2Postprocessing\)"):
        by_type(GPT2, "Attention", 4)
    with pytest.raises(PartitionError, match="type:Post matches 1 layers but there are 2 stages"):
        by_type(GPT2, "Post", 2)
    with pytest.raises(PartitionError, match=r"type:\( is not a valid regular expression"):
        resolve_balance("type:(", 14, 4, names=GPT2)
    with pytest.raises(PartitionError, match="cannot cut 14 layers into 15 stages"):
        by_type(GPT2, "Block", 15)


# ---- by parameters, by time ----

def test_by_parameters_balances_gpt2():
    params = [EMBED] + [BLOCK] * 12 + [WTE + LN_F]  # untied, as in the seed: big embedding and head
    balance = by_parameters(params, 4)
    assert balance == [1, 6, 6, 1]

    def worst(b: list[int]) -> int:
        return max(sum(params[lo:hi]) for lo, hi in ranges(b))

    assert worst(balance) < 0.75 * worst(uniform(14, 4))
    assert resolve_balance("parameters", 14, 4, params=params) == balance
    # Tied: the head's weight is counted at the embedding; a stage holding the head still keeps a copy.
    tied = [EMBED] + [BLOCK] * 12 + [LN_F]
    shared = [{0: WTE}] + [{}] * 12 + [{0: WTE}]
    assert by_parameters(tied, 4) != balance  # ignoring the copy, the head looks free
    assert by_parameters(tied, 4, shared=shared) == balance
    assert by_parameters(tied, 1, shared=shared) == [14]


def test_by_time_and_communication():
    assert by_time([1.0] * 8, 4) == [2, 2, 2, 2]
    assert by_time([4.0, 1, 1, 1, 1], 2) == [1, 4]
    # A cut after layer 1 is expensive: with communication charged to both sides, it moves.
    assert by_time([1.0] * 4, 2) == [2, 2]
    assert by_time([1.0] * 4, 2, comm_times=[0.0, 5.0, 0.0, 0.0]) == [3, 1]
    assert resolve_balance("time", 4, 2, times=[1.0] * 4) == [2, 2]


# ---- memory ----

def gpt2_profiles(rng: random.Random | None = None, tied: bool = True) -> list[LayerProfile]:
    rng = rng or random.Random(5)
    out = []
    for i, name in enumerate(GPT2):
        params = EMBED if i == 0 else BLOCK if name == "GPT2Block" else (LN_F if tied else WTE + LN_F)
        shared = {0: WTE} if tied and i in (0, 13) else {}
        out.append(LayerProfile(
            i, name, forward=rng.uniform(0.8, 1.2) * (3e-3 if i == 13 else 1e-3),
            backward=rng.uniform(1.6, 2.4) * (3e-3 if i == 13 else 1e-3), params=params,
            param_bytes=4 * params, output_bytes=(8 * 1024 * 50257 * 4 if i == 13 else 8 * 1024 * 768 * 4),
            saved_bytes=(8 * 1024 * 768 * 4 * (1 if i == 0 else 12 if name == "GPT2Block" else 3)), shared=shared))
    return out


def test_inflight_per_stage_follows_the_schedules():
    assert inflight_per_stage(build("1f1b", 4, 8)) == [4, 3, 2, 1]
    assert inflight_per_stage(build("1f1b", 4, 2)) == [2, 2, 2, 1]
    assert inflight_per_stage(build("gpipe", 3, 5)) == [5, 5, 5]
    for name in ("1f1b", "interleaved", "zbv", "gpipe", "zb-h1"):
        sc = build(name, 4, 8)
        fp = Footprint(sc, [0] * sc.num_stages, [1.0] * sc.num_stages, bytes_per_param=0)
        # one byte per stage and micro-batch: the device peak is the simulator's in-flight chunk count
        assert fp.devices([1] * sc.num_stages) == [x * sc.virtual_stages for x in simulate(sc).peak_inflight]


def test_by_memory_is_optimal_and_respects_the_limit():
    layers = gpt2_profiles()
    params, acts, shared = [x.params for x in layers], [x.saved_bytes for x in layers], [x.shared for x in layers]
    sc = build("1f1b", 4, 8)
    fp = Footprint(sc, params, acts, shared=shared)
    balance = by_memory(params, acts, sc, shared=shared)
    peaks = {tuple(b): max(fp.devices(b)) for b in compositions(14, 4)}
    assert max(fp.devices(balance)) == min(peaks.values())
    assert max(fp.devices(balance)) < max(fp.devices(uniform(14, 4)))
    assert resolve_balance("memory", 14, 4, layers=layers, schedule=sc) == balance
    limit = min(peaks.values()) * 1.01
    assert max(fp.devices(by_memory(params, acts, sc, shared=shared, limit=limit))) <= limit
    with pytest.raises(PartitionError, match=r"no partition of 14 layers into 4 stages fits the memory limit of "
                                             r"1.00 GiB per device under 1f1b with 8 micro-batches: the smallest "
                                             r"achievable peak is .* GiB \(\d+ bytes\), with balance \[.*\]"):
        by_memory(params, acts, sc, shared=shared, limit=2**30)
    # Several stages per device: memory adds up per device. Few balances: all are tried, exact.
    for name in ("interleaved", "zbv"):
        sc = build(name, 2, 8)
        fp = Footprint(sc, params, acts, shared=shared)
        balance = by_memory(params, acts, sc, shared=shared)
        assert max(fp.devices(balance)) == min(max(fp.devices(b)) for b in compositions(14, 4))
        with pytest.raises(PartitionError, match="the smallest achievable peak is"):
            by_memory(params, acts, sc, shared=shared, limit=1.0)


def test_by_memory_local_search_with_several_stages_per_device(monkeypatch):
    monkeypatch.setattr(memory, "ENUMERATE_MEMORY", 0)
    layers = gpt2_profiles()
    params, acts, shared = [x.params for x in layers], [x.saved_bytes for x in layers], [x.shared for x in layers]
    for name in ("interleaved", "zbv"):
        sc = build(name, 2, 8)
        fp = Footprint(sc, params, acts, shared=shared)
        balance = by_memory(params, acts, sc, shared=shared)
        best = min(max(fp.devices(b)) for b in compositions(14, 4))
        assert best <= max(fp.devices(balance)) <= 1.02 * best
        assert max(fp.devices(balance)) <= max(fp.devices(uniform(14, 4)))
        with pytest.raises(PartitionError, match=r"the smallest peak found \(by local search\) is"):
            by_memory(params, acts, sc, shared=shared, limit=1.0)


def test_asynchronous_schedules_pay_for_stashed_weights():
    sc = build("pipedream", 2, 4)
    fp = Footprint(sc, [100, 100], [0, 0], bytes_per_param=16, stash_bytes_per_param=4)
    versions = [fp.per_param[d] for d in range(2)]
    assert versions[0] > versions[1] == 16  # the first stage keeps more weight versions


# ---- auto ----

@pytest.mark.parametrize("search", ["enumerate", "heuristic"])
@pytest.mark.parametrize("name,devices", [("1f1b", 4), ("gpipe", 4), ("interleaved", 2), ("zbv", 2), ("zb-h1", 4)])
def test_auto_is_no_worse_than_uniform(name: str, devices: int, search: str, monkeypatch):
    if search == "heuristic":
        monkeypatch.setattr(auto_balance, "ENUMERATE_STEPS", 0)
    sc = build(name, devices, 8)
    for seed in range(2):
        layers = gpt2_profiles(random.Random(seed))
        plan = Planner(layers, sc, latency=2e-5, bandwidth=25e9)
        balance = auto(layers, sc, latency=2e-5, bandwidth=25e9)
        assert plan.makespan(balance) <= plan.makespan(uniform(14, sc.num_stages))
        assert plan.makespan(balance) <= plan.makespan(by_type(GPT2, "GPT2Block", sc.num_stages))
        best = min(plan.makespan(b) for b in compositions(14, 4))
        assert plan.makespan(balance) <= best * (1 + 1e-9 if search == "enumerate" else 1.02)
    got = resolve_balance("auto", 14, sc.num_stages, layers=layers, schedule=sc, latency=2e-5, bandwidth=25e9)
    assert got == balance


def test_auto_finds_the_best_balance_on_a_small_case():
    rng = random.Random(6)
    layers = [LayerProfile(i, "L", forward=rng.uniform(1, 5), backward=rng.uniform(2, 10)) for i in range(9)]
    sc = build("1f1b", 3, 6)
    plan = Planner(layers, sc)
    best = min(plan.makespan(b) for b in compositions(9, 3))
    assert plan.makespan(auto(layers, sc)) == pytest.approx(best, rel=1e-9)


@pytest.mark.parametrize("search", ["enumerate", "heuristic"])
@pytest.mark.parametrize("name,devices", [("1f1b", 4), ("interleaved", 2), ("zbv", 2)])
def test_auto_respects_the_memory_limit(name: str, devices: int, search: str, monkeypatch):
    if search == "heuristic":
        monkeypatch.setattr(auto_balance, "ENUMERATE_STEPS", 0)
        monkeypatch.setattr(memory, "ENUMERATE_MEMORY", 0)
    layers = gpt2_profiles()
    sc = build(name, devices, 8)
    plan = Planner(layers, sc)
    fast = auto(layers, sc)
    least = resolve_balance("memory", 14, sc.num_stages, layers=layers, schedule=sc)
    low, high = max(plan.footprint.devices(least)), max(plan.footprint.devices(fast))
    assert low < high
    limit = (low + high) / 2
    balance = auto(layers, sc, memory_limit=limit)
    assert max(plan.footprint.devices(balance)) <= limit
    assert plan.makespan(balance) >= plan.makespan(fast)
    if search == "enumerate":
        fitting = [b for b in compositions(14, 4) if max(plan.footprint.devices(b)) <= limit]
        assert plan.makespan(balance) <= min(plan.makespan(b) for b in fitting) * (1 + 1e-9)
    with pytest.raises(PartitionError, match="fits the memory limit of .* per device"):
        auto(layers, sc, memory_limit=low * 0.9)


def test_auto_scales_to_many_layers():
    rng = random.Random(7)
    layers = [LayerProfile(i, "Block", forward=rng.uniform(1, 2), backward=rng.uniform(2, 4),
                           params=rng.randint(1, 10**6), saved_bytes=rng.randint(1, 10**6),
                           output_bytes=rng.randint(1, 10**5)) for i in range(60)]
    for name, devices in (("1f1b", 8), ("interleaved", 4)):
        sc = build(name, devices, 16)
        plan = Planner(layers, sc, latency=1e-2, bandwidth=1e6)
        balance = auto(layers, sc, latency=1e-2, bandwidth=1e6)
        assert plan.makespan(balance) < plan.makespan(uniform(60, sc.num_stages))


# ---- resolve ----

def test_resolve_keeps_the_old_calls_and_explains_errors():
    assert resolve_balance("uniform", 10, 4) == [3, 3, 2, 2]
    assert resolve_balance([4, 3, 3, 4], 14, 4) == [4, 3, 3, 4]
    assert resolve_balance("type:GPT2Block", 14, 4, names=GPT2) == [4, 3, 3, 4]
    with pytest.raises(ValueError, match="cannot cut 9 layers into 16 stages"):
        resolve_balance("uniform", 9, 16)
    with pytest.raises(ValueError, match=r"balance \[4, 4\] covers 8 layers but the model has 9"):
        resolve_balance([4, 4], 9, 2)
    with pytest.raises(ValueError, match=r"balance \[4, 4\] has 2 entries for 3 stages"):
        resolve_balance([4, 4], 8, 3)
    with pytest.raises(ValueError, match=r"balance \[8, 0\] leaves stage 1 without layers"):
        resolve_balance([8, 0], 8, 2)
    with pytest.raises(ValueError, match="unknown partition method 'fastest'; use one of uniform, parameters"):
        resolve_balance("fastest", 8, 2)
    with pytest.raises(ValueError, match="partition 'memory' needs layer profiles: pass layers="):
        resolve_balance("memory", 8, 2)
    with pytest.raises(ValueError, match="partition 'auto' needs a schedule"):
        resolve_balance("auto", 14, 4, layers=gpt2_profiles())
    with pytest.raises(ValueError, match="partition 'type:Block' needs layer class names"):
        resolve_balance("type:Block", 8, 2)
    with pytest.raises(ValueError, match="names has 3 entries for 14 layers"):
        resolve_balance("type:Block", 14, 2, names=["a", "b", "c"])
    with pytest.raises(ValueError, match="schedule 1f1b has 4 stages, not 2"):
        resolve_balance("memory", 14, 2, layers=gpt2_profiles(), schedule=build("1f1b", 4, 4))


# ---- profiler ----

class Pair(nn.Module):
    """Returns a tuple, to check that structured outputs chain to the next layer."""

    def __init__(self, lin: nn.Linear):
        super().__init__()
        self.lin = lin

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.lin(x), x * 2


class Merge(nn.Module):
    def forward(self, xs: tuple[torch.Tensor, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"y": torch.tanh(xs[0]) + xs[1]}


class Head(nn.Module):
    def __init__(self, shared: nn.Linear):
        super().__init__()
        self.shared = shared

    def forward(self, d: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.shared(d["y"])


def test_profile_layers_measures_a_small_sequential():
    torch.manual_seed(0)
    first = nn.Linear(16, 16)
    model = nn.Sequential(first, nn.ReLU(), Pair(nn.Linear(16, 16)), Merge(), Head(first))
    sample = torch.randn(4, 16)
    before = torch.get_rng_state()
    profiles = profile_layers(model, sample, repeats=2)
    assert torch.equal(before, torch.get_rng_state())
    assert all(p.grad is None for p in model.parameters())
    assert [p.name for p in profiles] == ["Linear", "ReLU", "Pair", "Merge", "Head"]
    assert all(p.forward > 0 and p.backward > 0 for p in profiles)
    assert [p.params for p in profiles] == [272, 0, 272, 0, 0]  # the head's Linear is `first`: counted once
    assert sum(p.params for p in profiles) == sum(p.numel() for p in model.parameters())
    assert profiles[0].shared == profiles[4].shared == {0: 256, 1: 16}
    assert profiles[0].param_bytes == 272 * 4
    assert [p.output_bytes for p in profiles] == [256, 256, 512, 256, 256]
    assert profiles[0].saved_bytes == 256  # the input, for the weight gradient
    assert all(p.saved_bytes > 0 for p in profiles)
    # The tie is charged once when both users share a stage, twice when they do not.
    table = PartitionTable.from_profiles([5], profiles)
    assert table.stages[0].params == table.total_params == 544
    assert [r.params for r in PartitionTable.from_profiles([2, 3], profiles).stages] == [272, 544]
    # Every cut leaves 544 on one side (the copy); ties go to the lexicographically largest balance.
    assert resolve_balance("parameters", 5, 2, layers=profiles) == [4, 1]


# ---- table ----

def test_partition_table_text_and_json():
    layers = gpt2_profiles()
    sc = build("1f1b", 4, 8)
    table = PartitionTable.from_profiles([4, 3, 3, 4], layers, sc)
    d = json.loads(json.dumps(table.to_dict()))
    assert d["balance"] == [4, 3, 3, 4]
    assert [(r["stage"], r["device"], r["start"], r["stop"]) for r in d["stages"]] == \
        [(0, 0, 0, 4), (1, 1, 4, 7), (2, 2, 7, 10), (3, 3, 10, 14)]
    # The seed's STAGE_PARAMS, but with the tie kept the total is GPT-2's 124M, not 163M.
    assert [r["params"] for r in d["stages"]] == [60647424, 21263616, 21263616, 59862528]
    assert d["total_params"] == 124439808
    assert d["stages"][0]["layers"] == ["GPT2Preprocessing", "GPT2Block x3"]
    assert len(d["device_memory"]) == 4 and d["makespan"] > 0 and d["schedule"] == "1f1b"
    text = table.format()
    lines = text.splitlines()
    assert lines[0].startswith("stage 0  device 0  layers [0, 4)")
    assert "GPT2Preprocessing, GPT2Block x3" in lines[0] and "params 60.647M" in lines[0]
    assert "GPT2Block x3, GPT2Postprocessing" in lines[3]
    assert "params 124.440M (tied parameters counted once)" in lines[4]
    zbv = PartitionTable.from_profiles([4, 3, 3, 4], layers, build("zbv", 2, 4))
    assert [r.device for r in zbv.stages] == [0, 1, 1, 0]
    plain = PartitionTable.build([7, 7], GPT2)
    assert plain.format().splitlines()[0] == "stage 0  device 0  layers [0, 7)   GPT2Preprocessing, GPT2Block x6"
    assert plain.to_dict()["total_params"] is None
    with pytest.raises(ValueError, match=r"balance \[7, 6\] covers 13 layers but the model has 14"):
        PartitionTable.build([7, 6], GPT2)


def test_profile_measures_the_input_gradient_and_the_loss_with_the_last_layer():
    torch.manual_seed(0)
    layers = [nn.Embedding(50, 16), nn.Linear(16, 16), nn.Linear(16, 50)]
    tokens = torch.randint(0, 50, (4, 8))
    labels = torch.randint(0, 50, (4, 8))

    def loss(out, y):
        return nn.functional.cross_entropy(out.reshape(-1, 50), y.reshape(-1))

    plain = profile_layers(layers, tokens, repeats=2)
    with_loss = profile_layers(layers, tokens, repeats=2, loss_fn=loss, labels=labels)
    assert plain[0].input_grad == 0.0  # token ids need no gradient
    for p in plain[1:] + with_loss[1:]:
        assert p.input_grad is not None and 0.0 < p.input_grad <= p.backward
    # the loss keeps its own tensors for the backward (log-softmax of the logits)
    assert with_loss[-1].saved_bytes > plain[-1].saved_bytes
    assert with_loss[-1].output_bytes == 4  # a float32 scalar
    assert [p.params for p in with_loss] == [p.params for p in plain]


def test_auto_models_the_input_and_weight_gradient_pieces_of_split_schedules():
    layers = [LayerProfile(i, "L", forward=1.0, backward=2.0, input_grad=1.5) for i in range(8)]
    plan = Planner(layers, build("zbv", 2, 4))
    costs = plan.costs([2, 2, 2, 2]).table(4)
    assert costs["I"] == [0.0, 3.0, 3.0, 3.0]  # the first stage's input needs no gradient: all of it is W
    assert costs["W"] == [4.0, 1.0, 1.0, 1.0]
    unmeasured = [LayerProfile(i, "L", forward=1.0, backward=2.0) for i in range(8)]
    assert Planner(unmeasured, build("zbv", 2, 4)).costs([2, 2, 2, 2]).table(4)["I"] == [2.0] * 4
    assert Planner(layers, build("1f1b", 2, 4)).costs([4, 4]).i is None  # unsplit backward
