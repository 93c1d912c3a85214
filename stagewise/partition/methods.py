"""Balancing methods over per-layer costs, and `resolve`, the one entry point. No torch.

| method | balances | exact? |
| --- | --- | --- |
| `uniform` | layer counts | yes |
| `by_parameters` | parameters per stage | yes |
| `by_type` | layers whose class matches a regex (DeepSpeed's `type:REGEX`) | yes |
| `by_time` | forward + backward seconds of the slowest stage | yes |
| `by_memory` | peak bytes per device under a schedule | yes with one stage per device or few balances |
| `auto` | simulated step time under a memory limit per device | yes for few balances; see `auto` |
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from stagewise.partition.costs import LayerProfile, ParamCounter, Shared, format_bytes
from stagewise.partition.solver import (
    ExactSums,
    PartitionError,
    check_balance,
    check_request,
    exact_integers,
    min_max_balance,
    min_max_partition,
    min_sum_partition,
    ranges,
    uniform,
)
from stagewise.schedules import B, Costs, F, Schedule, W, simulate

METHODS = ("uniform", "parameters", "type:REGEX", "time", "memory", "auto")


def _check_len(values: Sequence | None, num_layers: int, what: str) -> None:
    if values is not None and len(values) != num_layers:
        raise PartitionError(f"{what} has {len(values)} entries for {num_layers} layers; give one per layer")


def by_parameters(param_counts: Sequence[float], num_stages: int, *, shared: Shared | None = None) -> list[int]:
    """The balance whose largest stage holds the fewest parameters (exact).

    `param_counts[l]` counts each parameter once (a tied one at its first layer); with `shared`
    (see `ParamCounter`) a stage is also charged for its own copy of a tied parameter whose
    first user sits in another stage.
    """
    if not shared or not any(shared):
        return min_max_balance(param_counts, num_stages)
    check_request(len(param_counts), num_stages)
    exact_integers(param_counts)  # rejects negative and non-finite counts
    _check_len(shared, len(param_counts), "shared")
    counter = ParamCounter(param_counts, shared)
    return min_max_partition(lambda s, lo, hi: counter.range(lo, hi), len(param_counts), num_stages)


def by_type(class_names: Sequence[str], regex: str, num_stages: int) -> list[int]:
    """DeepSpeed's `partition_method="type:REGEX"`: balance the number of layers whose class name matches.

    A layer matches when `re.search(regex, name, re.IGNORECASE)` finds something; the other
    layers ride with their neighbours. Among the balances with the fewest matching layers in
    the fullest stage, every stage holding at least one, this returns the lexicographically
    largest: each stage runs up to (not including) the next matching layer that would exceed
    the bound, so unmatched layers join the stage before them and leading ones the first stage.
    That is DeepSpeed's greedy cut over the prefix sum of 0/1 weights, so both give the same
    balance (GPT-2 as [pre, 12 blocks, post] on 4 stages: [4, 3, 3, 4]) wherever DeepSpeed's
    has no empty stage; where DeepSpeed's greedy would leave the last stages empty, this still
    gives every stage a matching layer.
    """
    check_request(len(class_names), num_stages)
    try:
        pattern = re.compile(regex, re.IGNORECASE)
    except re.error as e:
        raise PartitionError(f"type:{regex} is not a valid regular expression: {e}") from None
    hits = [1.0 if pattern.search(name) else 0.0 for name in class_names]
    found = int(sum(hits))
    if found == 0:
        names = ", ".join(dict.fromkeys(class_names))
        raise PartitionError(f"type:{regex} matches none of the layer classes ({names})")
    if found < num_stages:
        raise PartitionError(f"type:{regex} matches {found} layers but there are {num_stages} stages; "
                             "every stage needs a matching layer")
    count = ExactSums(hits)
    return min_max_partition(lambda s, lo, hi: count(lo, hi) or math.inf, len(hits), num_stages)


def by_time(layer_times: Sequence[float], num_stages: int, *, comm_times: Sequence[float] | None = None) -> list[int]:
    """The balance whose slowest stage is fastest (exact); times in seconds per micro-batch.

    `comm_times[l]` is what a cut after layer l costs per micro-batch (its output forward and
    its gradient back); it is charged to both stages at the cut, as in PipeDream's planner,
    which assumes communication does not overlap compute.
    """
    if comm_times is None:
        return min_max_balance(layer_times, num_stages)
    L = len(layer_times)
    check_request(L, num_stages)
    _check_len(comm_times, L, "comm_times")
    exact_integers(comm_times)  # rejects negative and non-finite times
    t, c = ExactSums(layer_times), [float(x) for x in comm_times]

    def cost(s: int, lo: int, hi: int) -> float:
        return t(lo, hi) + (c[lo - 1] if lo > 0 else 0.0) + (c[hi - 1] if hi < L else 0.0)

    return min_max_partition(cost, L, num_stages)


def inflight_per_stage(schedule: Schedule) -> list[int]:
    """Most micro-batches whose activations stage s holds at once, for every stage.

    Held from the start of its forward to the end of its last backward piece (W for split
    schedules, else B), as `simulate` counts per device. A device runs its actions in order,
    so the count follows from the order alone and does not depend on the costs: 1f1b gives
    min(P - s, m), gpipe m.
    """
    held = [0] * schedule.num_stages
    peak = [0] * schedule.num_stages
    for stage, delta in (x for program in _programs(schedule) for x in program):
        held[stage] += delta
        peak[stage] = max(peak[stage], held[stage])
    return peak


def _programs(schedule: Schedule) -> list[list[tuple[int, int]]]:
    """Per device, (stage, +1) when a micro-batch's activations appear and (stage, -1) when they are freed."""
    last = W if schedule.split_backward else B
    return [[(a.stage, 1 if a.op == F else -1) for a in schedule.compute_actions(d) if a.op in (F, last)]
            for d in range(schedule.num_devices)]


class Footprint:
    """Peak memory of every device under a schedule, bytes.

    A device holds the parameters of its stages (a tied parameter once per device) times
    `bytes_per_param` (weights + gradients + optimizer state: fp32 Adam is 4 + 4 + 8 = 16),
    plus `stash_bytes_per_param` for every extra weight version an asynchronous schedule keeps
    (`simulate`'s peak_weight_versions), plus the saved activations of the micro-batches in
    flight: at every point of the device's action order, the sum over its stages of
    activation bytes x micro-batches held, at its highest.
    """

    def __init__(self, schedule: Schedule, param_counts: Sequence[float], activation_bytes: Sequence[float], *,
                 bytes_per_param: float = 16.0, stash_bytes_per_param: float = 4.0, shared: Shared | None = None):
        L = len(param_counts)
        _check_len(activation_bytes, L, "activation_bytes")
        _check_len(shared, L, "shared")
        exact_integers(param_counts)  # rejects negative and non-finite counts
        self.schedule = schedule
        self.params = ParamCounter(param_counts, shared)
        self.act = ExactSums(activation_bytes)
        self.inflight = inflight_per_stage(schedule)
        self.programs = _programs(schedule)
        versions = simulate(schedule).peak_weight_versions if schedule.asynchronous else [1] * schedule.num_devices
        self.per_param = [bytes_per_param + (v - 1) * stash_bytes_per_param for v in versions]

    def stage(self, s: int, lo: int, hi: int) -> float:
        """Bytes of stage s holding layers [lo, hi): what its device needs if it held no other stage."""
        d = self.schedule.placement[s]
        return self.params.range(lo, hi) * self.per_param[d] + self.act(lo, hi) * self.inflight[s]

    def devices(self, balance: Sequence[int]) -> list[float]:
        """Peak bytes of every device for `balance`."""
        spans = ranges(balance)
        act = [self.act.prefix[hi] - self.act.prefix[lo] for lo, hi in spans]  # exact scaled integers
        out = []
        for d, program in enumerate(self.programs):
            level = peak = 0
            for s, delta in program:
                level += delta * act[s]
                peak = max(peak, level)
            static = self.params.held(spans[s] for s in self.schedule.stages_of(d)) * self.per_param[d]
            out.append(static + peak / self.act.scale)
        return out


def _neighbours(balance: list[int], reach: int) -> list[list[int]]:
    """Balances with 1..reach layers moved from one stage to another, every stage keeping a layer.

    Moving layers from stage i to stage j shifts every boundary in between: the stages between
    keep their sizes but slide, which is what changes memory across devices in a V or
    round-robin placement, where neighbouring stages live on different devices.
    """
    out = []
    S = len(balance)
    for i in range(S):
        for j in range(S):
            for step in range(1, reach + 1):
                if i != j and balance[i] > step:
                    b = list(balance)
                    b[i] -= step
                    b[j] += step
                    out.append(b)
    return out


def _shorter(a: float, b: float) -> bool:
    """a is a real improvement on b, not float noise from summing the same costs in another order."""
    return a < b - 1e-9 * abs(b)


def _descend(start: list[int], objective: Callable[[list[int]], Any], ok: Callable[[list[int]], bool],
             better: Callable[[Any, Any], bool] = operator.lt, reach: int = 1, rounds: int = 200) -> list[int]:
    """Steepest descent over `_neighbours` while the objective improves (the first best move on ties)."""
    current, value = list(start), objective(start)
    for _ in range(rounds):
        step = None
        for b in _neighbours(current, reach):
            if ok(b):
                v = objective(b)
                if better(v, value):
                    value, step = v, b
        if step is None:
            break
        current = step
    return current


def _unique(balances: list[list[int]]) -> list[list[int]]:
    return [list(b) for b in dict.fromkeys(tuple(b) for b in balances)]


# Up to this many balances are tried one by one, which makes the answer exact; beyond, a local search.
ENUMERATE_MEMORY = 5000  # device-peak evaluations (a walk over the action lists each)
ENUMERATE_STEPS = 400  # simulations


def compositions(num_layers: int, num_stages: int) -> Iterator[list[int]]:
    """Every balance with a layer per stage, lexicographically largest first."""
    if num_stages == 1:
        yield [num_layers]
        return
    for first in range(num_layers - num_stages + 1, 0, -1):
        for rest in compositions(num_layers - first, num_stages - 1):
            yield [first, *rest]


def _least_memory(fp: Footprint, num_layers: int) -> tuple[list[int], float, bool]:
    """The balance with the lowest peak device memory, that peak, and whether it is certainly the lowest.

    With one stage per device: the min-max DP over the stage footprints, exact. With several
    stages per device (interleaved, zbv) device peaks do not split into stage terms: every
    balance is tried when there are at most ENUMERATE_MEMORY of them (exact); otherwise the DP
    answer and the uniform balance are improved by moving one or two layers' worth from one
    stage to another while the sorted device peaks fall, which is not guaranteed to reach the
    minimum (within about 1% of it on GPT-2-like profiles).
    """
    sc = fp.schedule
    S = sc.num_stages
    if sc.chunks == 1:
        start = min_max_partition(fp.stage, num_layers, S)
        return start, max(fp.devices(start)), True
    if math.comb(num_layers - 1, S - 1) <= ENUMERATE_MEMORY:
        best, low = None, math.inf
        for b in compositions(num_layers, S):
            peak = max(fp.devices(b))
            if peak < low:  # strictly: the lexicographically largest among equals, as the solvers
                best, low = b, peak
        assert best is not None
        return best, low, True

    def key(b: list[int]) -> list[float]:
        return sorted(fp.devices(b), reverse=True)

    seeds = _unique([min_max_partition(fp.stage, num_layers, S), uniform(num_layers, S)])
    best = min((_descend(b, key, lambda b: True, reach=2) for b in seeds), key=key)
    return best, max(fp.devices(best)), False


def _over_limit(fp: Footprint, num_layers: int, limit: float, least: tuple[list[int], float, bool]) -> PartitionError:
    sc = fp.schedule
    balance, peak, exact = least
    what = "the smallest achievable peak is" if exact else "the smallest peak found (by local search) is"
    return PartitionError(
        f"no partition of {num_layers} layers into {sc.num_stages} stages fits the memory limit of "
        f"{format_bytes(limit)} per device under {sc.name} with {sc.microbatches} micro-batches: "
        f"{what} {format_bytes(peak)} ({peak:.0f} bytes), with balance {balance}")


def by_memory(param_counts: Sequence[float], activation_bytes: Sequence[float], schedule: Schedule, *,
              bytes_per_param: float = 16.0, stash_bytes_per_param: float = 4.0, shared: Shared | None = None,
              limit: float | None = None) -> list[int]:
    """The balance with the lowest peak memory per device under `schedule` (see `Footprint`).

    `activation_bytes[l]`: bytes layer l saves for its backward per micro-batch. Raises
    PartitionError naming the smallest peak when even that exceeds `limit` (bytes).
    """
    L = len(param_counts)
    check_request(L, schedule.num_stages)
    fp = Footprint(schedule, param_counts, activation_bytes, bytes_per_param=bytes_per_param,
                   stash_bytes_per_param=stash_bytes_per_param, shared=shared)
    least = _least_memory(fp, L)
    if limit is not None and least[1] > limit:
        raise _over_limit(fp, L, limit, least)
    return least[0]


@dataclass(frozen=True)
class Prediction:
    """What a balance is predicted to cost under a schedule."""

    balance: list[int]
    makespan: float  # seconds for the schedule's micro-batches, simulated
    memory: list[float]  # peak bytes per device
    stage_time: list[float]  # forward + backward seconds per micro-batch, per stage


class Planner:
    """Per-layer profiles plus a schedule: stage costs, simulated step times and device memory of balances.

    Communication between stages on different devices costs `latency + output bytes / bandwidth`
    (seconds; bandwidth in bytes per second), as `simulate` models it.
    """

    def __init__(self, layers: Sequence[LayerProfile], schedule: Schedule, *, bytes_per_param: float = 16.0,
                 stash_bytes_per_param: float = 4.0, latency: float = 0.0, bandwidth: float = math.inf):
        self.layers, self.schedule = list(layers), schedule
        self.latency, self.bandwidth = float(latency), float(bandwidth)
        self.forward = ExactSums([x.forward for x in self.layers])
        self.backward = ExactSums([x.backward for x in self.layers])
        # the I/W split of zero-bubble schedules, when the profile measured it
        measured = schedule.split_backward and all(x.input_grad is not None for x in self.layers)
        self.input_grad = ExactSums([x.input_grad or 0.0 for x in self.layers]) if measured else None
        self.footprint = Footprint(schedule, [x.params for x in self.layers], [x.saved_bytes for x in self.layers],
                                   bytes_per_param=bytes_per_param, stash_bytes_per_param=stash_bytes_per_param,
                                   shared=[x.shared for x in self.layers])
        self._makespans: dict[tuple[int, ...], float] = {}

    def time(self, lo: int, hi: int) -> float:
        """Forward + backward seconds of layers [lo, hi) per micro-batch."""
        return self.forward(lo, hi) + self.backward(lo, hi)

    def cut(self, s: int, hi: int) -> float:
        """Seconds one message across the boundary after stage s (ending at layer hi) takes; 0 on one device."""
        sc = self.schedule
        if s + 1 >= sc.num_stages or sc.placement[s] == sc.placement[s + 1]:
            return 0.0
        return self.latency + self.layers[hi - 1].output_bytes / self.bandwidth

    def costs(self, balance: Sequence[int]) -> Costs:
        spans = ranges(balance)
        sent = [float(self.layers[hi - 1].output_bytes) for _, hi in spans[:-1]]
        b = [self.backward(*r) for r in spans]
        i = None
        if self.input_grad is not None:
            # The first stage's input needs no gradient, so its I is empty and W runs the whole
            # backward (as the runtime does); elsewhere I is the layers' input-gradient time.
            i = [0.0 if lo == 0 else min(self.input_grad(lo, hi), b[k]) for k, (lo, hi) in enumerate(spans)]
        return Costs(f=[self.forward(*r) for r in spans], b=b, i=i,
                     latency=self.latency, bytes=sent or 0.0, bandwidth=self.bandwidth)

    def makespan(self, balance: Sequence[int]) -> float:
        key = tuple(balance)
        if key not in self._makespans:
            self._makespans[key] = simulate(self.schedule, self.costs(balance)).makespan
        return self._makespans[key]

    def predict(self, balance: Sequence[int]) -> Prediction:
        balance = check_balance(balance, len(self.layers), self.schedule.num_stages)
        return Prediction(balance, self.makespan(balance), self.footprint.devices(balance),
                          [self.time(*r) for r in ranges(balance)])


def auto(layers: Sequence[LayerProfile], schedule: Schedule, *, memory_limit: float | None = None,
         bytes_per_param: float = 16.0, stash_bytes_per_param: float = 4.0, latency: float = 0.0,
         bandwidth: float = math.inf) -> list[int]:
    """The balance with the shortest simulated step under `schedule`, every device within `memory_limit` bytes.

    Exact when there are at most ENUMERATE_STEPS balances: every one that fits is simulated.
    Otherwise a small candidate set is simulated: uniform; the min-max DP answer for the
    slowest stage (forward + backward) among stages that fit; when messages cost bandwidth,
    the balances with the fewest communication seconds whose slowest stage is within 1.5x
    of that; the least-memory balance. The fastest that fits is then improved by moving one
    layer's worth from one stage to another (see `_neighbours`) while the simulated step gets
    shorter; on GPT-2-like profiles this lands within about 1% of the best. The DP's bottleneck
    is exact with one stage per device (the memory limit is then a per-stage limit); with
    several (interleaved, zbv) the device limit is shared among its stages in the proportions
    of the least-memory balance, which keeps the answer within the limit but may miss
    balances that spread memory differently. The step itself also depends on warm-up,
    placement and communication, which is why candidates are compared by simulation.

    Ties: a balance replaces the best so far only when its step is shorter by more than 1e-9
    (relative; float noise decides nothing), and uniform comes first, so the result never
    simulates slower than uniform when uniform fits. Raises PartitionError when no balance
    fits, naming the smallest peak.
    """
    plan = Planner(layers, schedule, bytes_per_param=bytes_per_param, stash_bytes_per_param=stash_bytes_per_param,
                   latency=latency, bandwidth=bandwidth)
    L, S = len(plan.layers), schedule.num_stages
    check_request(L, S)
    fp = plan.footprint
    limit = math.inf if memory_limit is None else float(memory_limit)

    def fits(b: list[int]) -> bool:
        return limit == math.inf or max(fp.devices(b)) <= limit

    def fastest(balances: Iterable[list[int]]) -> list[int]:
        best: list[int] | None = None
        for b in balances:
            if fits(b) and (best is None or _shorter(plan.makespan(b), plan.makespan(best))):
                best = b
        assert best is not None, "the least-memory balance fits"
        return best

    seeds, caps = [], [limit] * S
    if limit < math.inf:
        least = _least_memory(fp, L)
        if least[1] > limit:
            raise _over_limit(fp, L, limit, least)
        seeds.append(least[0])
        if schedule.chunks > 1:
            # Share the device limit among its stages in the proportions of the least-memory balance;
            # per-stage footprints add up to at least the device peak, so each DP answer fits.
            stage_mem = [fp.stage(s, lo, hi) for s, (lo, hi) in enumerate(ranges(least[0]))]
            per_device = [0.0] * schedule.num_devices
            for s, m in enumerate(stage_mem):
                per_device[schedule.placement[s]] += m
            caps = [m * limit / per_device[schedule.placement[s]] if per_device[schedule.placement[s]] > 0
                    else limit for s, m in enumerate(stage_mem)]
    if math.comb(L - 1, S - 1) <= ENUMERATE_STEPS:
        return fastest([uniform(L, S), *compositions(L, S)])

    def capped(s: int, lo: int, hi: int) -> float:
        return plan.time(lo, hi) if caps[s] == math.inf or fp.stage(s, lo, hi) <= caps[s] else math.inf

    candidates = [uniform(L, S)]
    try:
        quick = min_max_partition(capped, L, S)
        candidates.append(quick)
        bottleneck = max(plan.time(lo, hi) for lo, hi in ranges(quick))
        if plan.bandwidth < math.inf and any(x.output_bytes for x in plan.layers):
            for slack in (0.0, 0.05, 0.1, 0.25, 0.5):
                bound = bottleneck * (1.0 + slack)

                def talk(s: int, lo: int, hi: int, bound: float = bound) -> float:
                    return plan.cut(s, hi) if capped(s, lo, hi) <= bound else math.inf

                candidates.append(min_sum_partition(talk, L, S))
    except PartitionError:
        pass  # the per-stage budgets were tighter than needed; the least-memory seed still fits
    return _descend(fastest(_unique(candidates + seeds)), plan.makespan, fits, _shorter)


def resolve(partition: str | Sequence[int], num_layers: int, num_stages: int, *,
            names: Sequence[str] | None = None, params: Sequence[float] | None = None,
            times: Sequence[float] | None = None, layers: Sequence[LayerProfile] | None = None,
            schedule: Schedule | None = None, memory_limit: float | None = None, bytes_per_param: float = 16.0,
            latency: float = 0.0, bandwidth: float = math.inf) -> list[int]:
    """Turn `partition` into a balance (one layer count per stage).

    `partition` is a list of layer counts, or one of "uniform", "parameters" (needs `params`
    or `layers`), "type:REGEX" (needs `names` or `layers`), "time" (needs `times` or
    `layers`), "memory" and "auto" (need `layers`, from `profile_layers`, and `schedule`).
    Profiles also bring tied parameters, counted once per stage that holds them.
    """
    if not isinstance(partition, str):
        return check_balance(partition, num_layers, num_stages)
    check_request(num_layers, num_stages)
    for given, what in ((names, "names"), (params, "params"), (times, "times"), (layers, "layers")):
        _check_len(given, num_layers, what)
    if schedule is not None and schedule.num_stages != num_stages:
        raise PartitionError(f"schedule {schedule.name} has {schedule.num_stages} stages, not {num_stages}")

    def need(what: str, value: object, hint: str) -> None:
        if value is None:
            raise PartitionError(f"partition {partition!r} needs {what}: pass {hint}")

    if partition == "uniform":
        return uniform(num_layers, num_stages)
    if partition == "parameters":
        if params is not None:
            return by_parameters(params, num_stages)
        need("parameter counts", layers, "params= or layers= (profile_layers)")
        return by_parameters([x.params for x in layers], num_stages, shared=[x.shared for x in layers])
    if partition.startswith("type:"):
        if names is None and layers is not None:
            names = [x.name for x in layers]
        need("layer class names", names, "names= or layers=")
        return by_type(names, partition[len("type:"):], num_stages)
    if partition == "time":
        if times is not None:
            return by_time(times, num_stages)
        need("per-layer times", layers, "times= or layers= (profile_layers)")
        comm = None
        if latency > 0 or bandwidth < math.inf:
            comm = [latency + x.output_bytes / bandwidth for x in layers]
        return by_time([x.time for x in layers], num_stages, comm_times=comm)
    if partition in ("memory", "auto"):
        need("layer profiles", layers, "layers= (profile_layers)")
        need("a schedule", schedule, "schedule= (stagewise.schedules.build)")
        if partition == "memory":
            return by_memory([x.params for x in layers], [x.saved_bytes for x in layers], schedule,
                             bytes_per_param=bytes_per_param, shared=[x.shared for x in layers], limit=memory_limit)
        return auto(layers, schedule, memory_limit=memory_limit, bytes_per_param=bytes_per_param,
                    latency=latency, bandwidth=bandwidth)
    raise PartitionError(f"unknown partition method {partition!r}; use one of {', '.join(METHODS)} "
                         "or a list of layer counts")
