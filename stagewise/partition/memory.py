"""The memory model: saved activations in flight per stage and peak bytes per device under a schedule. No torch."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from stagewise.partition.balances import compositions, descend, unique
from stagewise.partition.layers import ParamCounter, Shared
from stagewise.partition.solver import (
    ExactSums,
    PartitionError,
    check_request,
    exact_integers,
    min_max_partition,
    ranges,
    uniform,
)
from stagewise.partition.units import format_bytes
from stagewise.schedules import RECOMPUTE, B, F, Schedule, W, simulate


def check_len(values: Sequence | None, num_layers: int, what: str) -> None:
    """PartitionError unless `values` (when given) has one entry per layer."""
    if values is not None and len(values) != num_layers:
        raise PartitionError(f"{what} has {len(values)} entries for {num_layers} layers; give one per layer")


def holding_events(schedule: Schedule) -> list[np.ndarray]:
    """Per device, in action order, one row per action that changes what the device holds: (stage, dA, dX, dM).

    dA and dX are how the bytes held change, in multiples of the stage's saved activations A and of its input X:
    a forward keeps A, or only X when it recomputes (a RECOMPUTE of its stage and micro-batch follows); a
    RECOMPUTE adds A back; the last backward piece (B, or W where the backward was split: dualpipev mixes both)
    frees what was held. dM counts micro-batches in flight (+1 at a forward, -1 at the last backward piece).
    An I frees nothing and is left out. Computed once per schedule.
    """
    return schedule.programs.cached("holding_events", lambda: _holding_events(schedule))


def _holding_events(schedule: Schedule) -> list[np.ndarray]:
    out = []
    for d in range(schedule.num_devices):
        acts = [a for a in schedule.compute_actions(d) if a.op in (F, B, W, RECOMPUTE)]
        redone = {(a.stage, a.microbatch) for a in acts if a.op == RECOMPUTE}
        rows = []
        for a in acts:
            again = (a.stage, a.microbatch) in redone
            if a.op == F:
                rows.append((a.stage, 0, 1, 1) if again else (a.stage, 1, 0, 1))
            elif a.op == RECOMPUTE:
                rows.append((a.stage, 1, 0, 0))
            else:
                rows.append((a.stage, -1, -1 if again else 0, -1))
        out.append(np.array(rows, dtype=np.int64).reshape(-1, 4))
    return out


def inflight_per_stage(schedule: Schedule) -> list[int]:
    """Most micro-batches whose activations stage s holds at once, for every stage.

    Held from the start of its forward to the end of its last backward piece (W for split
    schedules, else B), as `simulate` counts per device. A device runs its actions in order,
    so the count follows from the order alone and does not depend on the costs: 1f1b gives
    min(P - s, m), gpipe m.
    """
    held = [0] * schedule.num_stages
    peak = [0] * schedule.num_stages
    for events in holding_events(schedule):
        for stage, _, _, delta in events.tolist():
            held[stage] += delta
            peak[stage] = max(peak[stage], held[stage])
    return peak


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
                 bytes_per_param: float = 16.0, stash_bytes_per_param: float = 4.0, shared: Shared | None = None,
                 input_bytes: Sequence[float] | None = None):
        L = len(param_counts)
        check_len(activation_bytes, L, "activation_bytes")
        check_len(shared, L, "shared")
        exact_integers(param_counts)  # rejects negative and non-finite counts
        self.schedule = schedule
        self.params = ParamCounter(param_counts, shared)
        self.act = ExactSums(activation_bytes)
        self.inflight = inflight_per_stage(schedule)
        # with recomputes, what a forward keeps is its input (`input_bytes`); lists: summed as exact Python ints
        self.events = [e.tolist() for e in holding_events(schedule)]
        self.inputs = [float(x) for x in input_bytes] if input_bytes is not None else [0.0] * L
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
        kept = [self.inputs[lo] * self.act.scale for lo, _ in spans]  # a stage's input: its first layer's
        for d, events in enumerate(self.events):
            level = peak = 0
            for s, da, di, _ in events:
                level += da * act[s] + di * kept[s]
                peak = max(peak, level)
            static = self.params.held(spans[s] for s in self.schedule.stages_of(d)) * self.per_param[d]
            out.append(static + peak / self.act.scale)
        return out


# Up to this many balances are tried one by one, which makes the answer exact; beyond, a local search.
ENUMERATE_MEMORY = 5000  # device-peak evaluations (a walk over the action lists each)


def least_memory(fp: Footprint, num_layers: int) -> tuple[list[int], float, bool]:
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
    if sc.virtual_stages == 1:
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

    seeds = unique([min_max_partition(fp.stage, num_layers, S), uniform(num_layers, S)])
    best = min((descend(b, key, lambda b: True, reach=2) for b in seeds), key=key)
    return best, max(fp.devices(best)), False


def over_limit(fp: Footprint, num_layers: int, limit: float, least: tuple[list[int], float, bool]) -> PartitionError:
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
    least = least_memory(fp, L)
    if limit is not None and least[1] > limit:
        raise over_limit(fp, L, limit, least)
    return least[0]
