"""The planner's search: schedule x micro-batches x virtual stages x balance x recompute, chosen together under a
memory cap. No torch.

`search(profiles, devices, batch, ...)` walks every synchronous schedule of the registry, every micro-batch count
m, every virtual-stage count the schedule takes and, where asked, every recompute mode
(`recompute`: "never", "except_last", "always"; the RECOMPUTE actions go into the schedule); for each such
configuration it finds the balance with the shortest predicted step that fits the memory limit (`CostModel`:
communication, shared cores, the optimizer step and tied-parameter syncs, saved activations and the loss's),
and returns a `Plan` (`plan_results`): the fastest candidates, the choice among them (`plan_ties`), and how the
search went.

How the search stays fast and exact:

1. **Memory first.** For a configuration, every balance's device peaks come from one vectorised sweep over
   the action lists (all balances at once); balances over the limit are dropped before any simulation,
   and a configuration whose every balance is over it is dropped whole.
2. **Exact balance by branch and bound.** The balances left are ordered by a lower bound on their step
   (`CostModel.lower_bounds`: every device's work and optimizer step, the shared cores' floor) and simulated in
   that order; the walk stops at the first bound above the best step found, so the answer is the best over
   every balance, exactly, having simulated few of them. Beyond `ENUMERATE_BALANCES` balances a local search
   from the min-max DP answer (`auto`'s method) takes over.
3. **Configurations by bound.** Each configuration has a bound too (`cost_model.configuration_bound`: m x the
   work of a micro-batch and the optimizer step, over P or the shared cores): configurations are visited in
   that order and the rest are skipped once a bound exceeds both the `top`-th best step and the best step plus
   the tie band (`plan_ties.pruning_band`; they can enter neither the table nor the tie), so pruning never drops
   the best.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from stagewise.partition.balances import compositions_array, descend, shorter
from stagewise.partition.cost_model import CostModel, Estimate, configuration_bound
from stagewise.partition.plan_results import Candidate, Plan
from stagewise.partition.plan_ties import MAX_BAND, by_runs, preference, pruning_band, schedule_rank, ties
from stagewise.partition.profiles import ProfileSet
from stagewise.partition.solver import PartitionError, min_max_partition, uniform
from stagewise.partition.units import format_bytes
from stagewise.schedules import SCHEDULES, SYNCHRONOUS, Schedule, ScheduleError, build
from stagewise.schedules.recompute import MODES, with_recompute
from stagewise.schedules.reduction import with_reductions

ENUMERATE_BALANCES = 20000  # balances of one configuration tried exactly (memory vectorised, time bounded)
MAX_MICROBATCHES = 32
MAX_VIRTUAL_STAGES = 4  # for the schedules that take any number of virtual stages (interleaved, looped-bfs)


def default_microbatches(per_replica: int, devices: int, cap: int = MAX_MICROBATCHES) -> list[int]:
    """The m tried by default: divisors of the per-replica batch (equal micro-batches) from P (fewer leave
    devices idle) up to `cap`; just the largest divisor below P when none is that large."""
    divisors = [m for m in range(1, min(per_replica, cap) + 1) if per_replica % m == 0]
    wide = [m for m in divisors if m >= devices]
    return wide or divisors[-1:]


def virtual_stage_options(name: str, devices: int, num_layers: int,
                          virtual_stages: Sequence[int] | None = None) -> list[int]:
    """Chunks per device to try for schedule `name`: its default, and 2..MAX_VIRTUAL_STAGES for those that take any;
    only as many as leave every stage a layer."""
    default = SCHEDULES[name].default_virtual_stages
    if virtual_stages is not None:
        options = list(virtual_stages)
    elif default > 1 and name in ("interleaved", "looped-bfs"):
        options = list(range(2, MAX_VIRTUAL_STAGES + 1))
    else:
        options = [default]
    return [v for v in options if devices * v <= num_layers]


@dataclass
class _Stats:
    simulations: int = 0
    over_memory: int = 0
    pruned: int = 0


def best_balance(model: CostModel, limit: float = math.inf, *, fixed: Sequence[int] | None = None,
                 bound: float = math.inf, exhaustive: bool = False, stats: _Stats | None = None
                 ) -> tuple[Estimate | None, str]:
    """The balance with the shortest predicted step that fits `limit` bytes per device, and "" — or None and
    why not ("memory": no balance fits; "bound": none can beat `bound`). `fixed` evaluates one balance only.
    Exact up to ENUMERATE_BALANCES balances (see the module docstring); `exhaustive` simulates every one."""
    stats = stats or _Stats()
    S, L = model.schedule.num_stages, model.num_layers
    if fixed is not None:
        arr = np.array([list(fixed)], dtype=np.int64)
        if model.memory(arr).max() > limit:
            return None, "memory"
        stats.simulations += 1
        return model.estimate(list(fixed)), ""
    if math.comb(L - 1, S - 1) > ENUMERATE_BALANCES:
        return _local_search(model, limit, stats)
    comps = compositions_array(L, S)
    peak = model.memory(comps).max(axis=1)
    fits = peak <= limit
    if not fits.any():
        return None, "memory"
    comps, peak = comps[fits], peak[fits]
    lbs = model.lower_bounds(comps)
    if not exhaustive and lbs.min() > bound:
        return None, "bound"
    busiest = model.busiest(comps)
    best: Estimate | None = None
    for k in np.lexsort((peak, lbs)).tolist():
        if best is not None and not exhaustive:
            if lbs[k] > best.step_s:
                break  # every balance left is bounded above the best
            if busiest[k] > best.makespan_s and not shorter(lbs[k], best.step_s):
                continue  # at best a tie on the step (the cores' floor) that it would lose on the makespan
        stats.simulations += 1
        e = model.estimate(comps[k].tolist())
        if best is None or _better(e, best):
            best = e
    return best, ""


def _better(e: Estimate, best: Estimate) -> bool:
    """A shorter step; on a tie (the shared cores' floor binds both), a shorter schedule alone, then less memory."""
    if shorter(e.step_s, best.step_s) or shorter(best.step_s, e.step_s):
        return shorter(e.step_s, best.step_s)
    if shorter(e.makespan_s, best.makespan_s) or shorter(best.makespan_s, e.makespan_s):
        return shorter(e.makespan_s, best.makespan_s)
    return max(e.memory) < max(best.memory)


def _local_search(model: CostModel, limit: float, stats: _Stats) -> tuple[Estimate | None, str]:
    """Many balances: the min-max DP answer (stage time), uniform and the least-memory balance found by descent,
    the fastest of those that fit, then steepest descent over neighbouring balances (`auto`'s method)."""
    S, L = model.schedule.num_stages, model.num_layers

    def peaks(b: list[int]) -> list[float]:
        return sorted(model.memory(np.array([b], dtype=np.int64))[0].tolist(), reverse=True)

    def step(b: list[int]) -> float:
        stats.simulations += 1
        return model.estimate(b).step_s

    def stage_time(s: int, lo: int, hi: int) -> float:
        extra = model.forward(lo, hi) if model.recomputes[s] else 0.0  # its forwards run again
        return model.forward(lo, hi) + model.backward(lo, hi) + extra

    seeds = [uniform(L, S), min_max_partition(stage_time, L, S)]
    fitting = [b for b in seeds if peaks(b)[0] <= limit]
    if not fitting:
        least = descend(seeds[0], peaks, lambda b: True, reach=2)
        if peaks(least)[0] > limit:
            return None, "memory"
        fitting = [least]
    best = descend(min(fitting, key=step), step, lambda b: peaks(b)[0] <= limit, shorter)
    return model.estimate(best), ""


def search(profiles: ProfileSet, devices: int, batch: int, *, data_parallel: int = 1,
           schedules: Sequence[str] | None = None, microbatches: Sequence[int] | None = None,
           virtual_stages: Sequence[int] | None = None, recompute: Sequence[str] = ("never",),
           memory_limit: float | None = None, balance: Callable[[Schedule], Sequence[int]] | None = None,
           bytes_per_param: float = 16.0, latency: float = 0.0, bandwidth: float = math.inf,
           cores: int | None = None, tokens_per_sample: int | None = None, top: int = 5,
           noise: float | None = None, exhaustive: bool = False, reduce_bandwidth: float = math.inf) -> Plan:
    """Search schedule x m x virtual stages x balance x recompute for the shortest predicted step within
    `memory_limit` bytes per device; see the module docstring. `batch` is the global batch (samples), split
    over `data_parallel` replicas, then into m micro-batches. `recompute`: the recompute modes
    to try (a mode that changes nothing for a schedule, say "except_last" where every backward follows its
    forward, gives the same schedule and is kept once). `balance(schedule)` fixes the balance per
    schedule instead of searching it. `noise` overrides the profiles' own estimate. With `data_parallel` > 1
    every candidate carries its gradient reductions (REDUCE actions), timed at `reduce_bandwidth` (bytes/s in
    ring units, see `stagewise.measure.links`; infinite: free). Raises PartitionError when nothing
    fits, naming the smallest peak seen."""
    t0 = time.perf_counter()
    names = list(SYNCHRONOUS if schedules is None else schedules)
    for n in names:
        if n not in SCHEDULES:
            raise ScheduleError(f"unknown schedule {n!r}; choose from {', '.join(SYNCHRONOUS)}")
        if SCHEDULES[n].asynchronous:
            raise ScheduleError(f"the planner compares synchronous schedules (one step per batch); {n!r} is not")
    per_replica = -(-batch // data_parallel)
    ms = sorted(set(microbatches)) if microbatches else default_microbatches(per_replica, devices)
    ms = [m for m in ms if 1 <= m <= per_replica]
    if not ms:
        raise PartitionError(f"no micro-batch count fits a batch of {per_replica} samples per replica")
    L = profiles.num_layers
    for mode in recompute:
        if mode not in MODES:
            raise ValueError(f"the planner models the recompute modes {', '.join(MODES)}, not {mode!r}")
    limit = math.inf if memory_limit is None else float(memory_limit)
    band = pruning_band(profiles, noise)
    tokens = tokens_per_sample or 1
    groups = []
    for name in names:
        for v in virtual_stage_options(name, devices, L, virtual_stages):
            for m in ms:
                for r in recompute:
                    samples = -(-per_replica // m)
                    lb = configuration_bound(profiles.at(samples), m, r, devices, replicas=data_parallel, cores=cores,
                                             step_per_param=profiles.step_per_param)
                    groups.append((lb, name, v, m, r, samples))
    if not groups:
        raise PartitionError(f"no schedule of {', '.join(names)} fits {L} layers on {devices} devices "
                             "(chunked schedules need devices x virtual stages layers)")
    groups.sort(key=lambda g: (g[0], MODES.index(g[4]), schedule_rank(g[1]), g[3]))
    stats = _Stats()
    found: list[Candidate] = []
    least_memory, failed, configurations = math.inf, [], 0
    options = {"bytes_per_param": bytes_per_param, "latency": latency, "bandwidth": bandwidth, "cores": cores,
               "replicas": data_parallel, "reduce_bandwidth": reduce_bandwidth}  # every CostModel of the search
    seen: set = set()
    built: dict[tuple[str, int, int, str], Schedule] = {}
    for lb, name, v, m, r, samples in groups:
        configurations += 1
        steps = sorted(c.step_s for c in found)
        threshold = math.inf if len(steps) < top else max(steps[top - 1], steps[0] * (1 + band))
        if not exhaustive and lb > threshold:
            stats.pruned += 1
            continue
        try:
            plain = build(name, devices, m, v)
            schedule = with_recompute(plain, r)
            if data_parallel > 1:
                schedule = with_reductions(schedule)
        except ScheduleError as err:
            failed.append(f"{name} v={v} m={m} recompute={r}: {err}")
            continue
        if (name, v, m, schedule.programs) in seen:
            continue  # the mode changes nothing here (or gives what another mode already gave)
        seen.add((name, v, m, schedule.programs))
        built[(name, v, m, r)] = schedule
        model = CostModel(schedule, profiles.at(samples), step_per_param=profiles.step_per_param, **options)
        fixed = list(balance(schedule)) if balance is not None else None
        est, why = best_balance(model, limit, fixed=fixed, bound=threshold, exhaustive=exhaustive, stats=stats)
        if est is None:
            if why == "memory":
                stats.over_memory += 1
                comps = np.array([fixed], np.int64) if fixed else compositions_array(L, schedule.num_stages) \
                    if math.comb(L - 1, schedule.num_stages - 1) <= ENUMERATE_BALANCES else None
                if comps is not None:
                    least_memory = min(least_memory, float(model.memory(comps).max(axis=1).min()))
            else:
                stats.pruned += 1
            continue
        found.append(candidate(est, name, m, v, r, samples, batch * tokens))
    if not found:
        smallest = f"; the smallest peak seen is {format_bytes(least_memory)}" if least_memory < math.inf else ""
        raise PartitionError(f"no configuration fits the memory limit of {format_bytes(limit)} per device"
                             f"{smallest}" + (f" ({len(failed)} could not be built)" if failed else ""))
    found.sort(key=lambda c: (c.step_s, preference(c)))
    best = found[0]
    measured_noise = profiles.at(best.samples).noise
    tied, width = ties(found, profiles, built, per_replica, options, noise)
    choice = min(tied, key=preference)
    shown = found[:top]
    if choice not in shown:
        shown.append(choice)
    settings = {"devices": devices, "data_parallel": data_parallel, "batch": batch, "memory_limit": memory_limit,
                "schedules": names, "microbatches": ms, "recompute": list(recompute), "cores": cores,
                "tokens_per_sample": tokens_per_sample, "bytes_per_param": bytes_per_param, "latency": latency,
                "bandwidth": bandwidth if bandwidth < math.inf else None, "top": top,
                "reduce_bandwidth": reduce_bandwidth if reduce_bandwidth < math.inf else None}
    info = {"configurations": configurations, "evaluated": len(found), "over_memory": stats.over_memory,
            "pruned": stats.pruned, "simulations": stats.simulations, "failed": failed, "tied": len(tied),
            "runs": profiles.runs, "profile_s": profiles.seconds,
            "tie_rule": "runs" if by_runs(profiles, noise) else "band", "max_band": MAX_BAND,
            "noise_measured": measured_noise,
            "noise_per_size": {str(k): p.noise for k, p in sorted(profiles.sizes.items())}}
    return Plan(choice, shown, width, settings, info, time.perf_counter() - t0)


def predict(profiles: ProfileSet, schedule: Schedule, batch: int, balance: Sequence[int], *, data_parallel: int = 1,
            recompute: str = "never", tokens_per_sample: int | None = None, **model: float) -> Candidate:
    """The prediction for one given configuration (no search): what `stagewise.measure.trace_costs.compare` holds a
    measured step to.
    `schedule` is as the pipeline runs it (with its RECOMPUTE actions, if any; `recompute` names the mode);
    `model` options go to `CostModel` (bytes_per_param, latency, bandwidth, cores, reduce_bandwidth)."""
    per_replica = -(-batch // data_parallel)
    samples = -(-per_replica // schedule.microbatches)
    cm = CostModel(schedule, profiles.at(samples), step_per_param=profiles.step_per_param, replicas=data_parallel,
                   **model)
    return candidate(cm.estimate(list(balance)), schedule.name, schedule.microbatches, schedule.virtual_stages,
                     recompute, samples, batch * (tokens_per_sample or 1))


def candidate(e: Estimate, schedule: str, microbatches: int, virtual_stages: int, recompute: str, samples: int,
              tokens: float) -> Candidate:
    """The candidate of one configuration from its estimate; `tokens` per step give its throughput."""
    return Candidate(schedule, microbatches, virtual_stages, recompute, e.balance, samples, e.step_s, e.makespan_s,
                     e.bubble, e.bubble_per_device, e.busy_s, e.memory, e.saved_peak,
                     tokens / e.step_s if e.step_s > 0 else math.inf, e.optimizer_s, e.tie_sync_s)
