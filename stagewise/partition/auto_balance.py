"""`auto`, the balance method that minimises the simulated step of one schedule under a memory limit, and `Planner`,
the view of the cost model it works with (a schedule plus `profile_layers` output). No torch."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from stagewise.partition.balances import compositions, descend, shorter, unique
from stagewise.partition.cost_model import CostModel
from stagewise.partition.layers import LayerProfile
from stagewise.partition.memory import Footprint, least_memory, over_limit
from stagewise.partition.profiles import SizeProfile
from stagewise.partition.solver import (
    PartitionError,
    check_balance,
    check_request,
    min_max_partition,
    min_sum_partition,
    ranges,
    uniform,
)
from stagewise.schedules import Costs, Schedule


@dataclass(frozen=True)
class Prediction:
    """What a balance is predicted to cost under a schedule."""

    balance: list[int]
    makespan: float  # seconds of the simulated step (the optimizer steps and tie syncs included)
    memory: list[float]  # peak bytes per device
    stage_time: list[float]  # forward + backward seconds per micro-batch, per stage


class Planner:
    """Per-layer profiles plus a schedule: stage costs, simulated steps and device memory of balances.

    Time is the cost model's (`CostModel`: messages between stages on different devices at
    `latency + output bytes / bandwidth`, seconds and bytes per second; the optimizer step at `step_per_param`
    seconds per parameter held; tied parameters' all-reduces); memory is `Footprint`'s, which also charges
    the weight versions an asynchronous schedule stashes (`stash_bytes_per_param`).
    """

    def __init__(self, layers: Sequence[LayerProfile], schedule: Schedule, *, bytes_per_param: float = 16.0,
                 stash_bytes_per_param: float = 4.0, latency: float = 0.0, bandwidth: float = math.inf,
                 step_per_param: float = 0.0):
        self.layers, self.schedule = list(layers), schedule
        self.model = CostModel(schedule, SizeProfile.from_layers(self.layers), bytes_per_param=bytes_per_param,
                               latency=latency, bandwidth=bandwidth, step_per_param=step_per_param)
        self.latency, self.bandwidth = self.model.latency, self.model.bandwidth
        self.footprint = Footprint(schedule, [x.params for x in self.layers], [x.saved_bytes for x in self.layers],
                                   bytes_per_param=bytes_per_param, stash_bytes_per_param=stash_bytes_per_param,
                                   shared=[x.shared for x in self.layers],
                                   input_bytes=[x.input_bytes for x in self.layers])

    def time(self, lo: int, hi: int) -> float:
        """Forward + backward seconds of layers [lo, hi) per micro-batch."""
        return self.model.forward(lo, hi) + self.model.backward(lo, hi)

    def cut(self, s: int, hi: int) -> float:
        """Seconds one message across the boundary after stage s (ending at layer hi) takes; 0 on one device."""
        sc = self.schedule
        if s + 1 >= sc.num_stages or sc.placement[s] == sc.placement[s + 1]:
            return 0.0
        return self.latency + self.layers[hi - 1].output_bytes / self.bandwidth

    def costs(self, balance: Sequence[int]) -> Costs:
        """The simulator's costs of `balance` (see `CostModel.costs`)."""
        return self.model.costs(balance)

    def makespan(self, balance: Sequence[int]) -> float:
        """Seconds of the simulated step of `balance` (cached)."""
        return self.model.simulation(balance).makespan

    def predict(self, balance: Sequence[int]) -> Prediction:
        balance = check_balance(balance, len(self.layers), self.schedule.num_stages)
        return Prediction(balance, self.makespan(balance), self.footprint.devices(balance),
                          [self.time(*r) for r in ranges(balance)])


ENUMERATE_STEPS = 400  # simulations


def auto(layers: Sequence[LayerProfile], schedule: Schedule, *, memory_limit: float | None = None,
         bytes_per_param: float = 16.0, stash_bytes_per_param: float = 4.0, latency: float = 0.0,
         bandwidth: float = math.inf, step_per_param: float = 0.0) -> list[int]:
    """The balance with the shortest simulated step under `schedule`, every device within `memory_limit` bytes.

    Exact when there are at most ENUMERATE_STEPS balances: every one that fits is simulated.
    Otherwise a small candidate set is simulated: uniform; the min-max DP answer for the
    slowest stage (forward + backward) among stages that fit; when messages cost bandwidth,
    the balances with the fewest communication seconds whose slowest stage is within 1.5x
    of that; the least-memory balance. The fastest that fits is then improved by moving one
    layer's worth from one stage to another (see `neighbours`) while the simulated step gets
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
                   latency=latency, bandwidth=bandwidth, step_per_param=step_per_param)
    L, S = len(plan.layers), schedule.num_stages
    check_request(L, S)
    fp = plan.footprint
    limit = math.inf if memory_limit is None else float(memory_limit)

    def fits(b: list[int]) -> bool:
        return limit == math.inf or max(fp.devices(b)) <= limit

    def fastest(balances: Iterable[list[int]]) -> list[int]:
        best: list[int] | None = None
        for b in balances:
            if fits(b) and (best is None or shorter(plan.makespan(b), plan.makespan(best))):
                best = b
        assert best is not None, "the least-memory balance fits"
        return best

    seeds, caps = [], [limit] * S
    if limit < math.inf:
        least = least_memory(fp, L)
        if least[1] > limit:
            raise over_limit(fp, L, limit, least)
        seeds.append(least[0])
        if schedule.virtual_stages > 1:
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
    return descend(fastest(unique(candidates + seeds)), plan.makespan, fits, shorter)
