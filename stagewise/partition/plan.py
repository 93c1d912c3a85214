"""The planner: schedule x micro-batches x virtual stages x balance x recompute, chosen together under a memory
cap. No torch.

`search(profiles, devices, batch, ...)` walks every synchronous schedule of the registry, every
micro-batch count m, every chunk count the schedule takes and, where asked, every activation-checkpointing
mode (`recompute`: "never", "except_last", "always"; the RECOMPUTE actions go into the schedule); for each such
configuration it finds the balance with the shortest simulated step that fits the memory limit
(`CostModel`: communication, shared cores, optimizer step, saved activations and the loss's), and
returns a `Plan`: the fastest candidates, the choice among them, and how the search went.

How the search stays fast and exact:

1. **Memory first.** For a configuration, every balance's device peaks come from one vectorised sweep over
   the action lists (all balances at once); balances over the limit are dropped before any simulation,
   and a configuration whose every balance is over it is dropped whole.
2. **Exact balance by branch and bound.** The balances left are ordered by a lower bound on their step
   (the busiest device's work, the shared cores' floor, the optimizer step) and simulated in that order;
   the walk stops at the first bound above the best step found, so the answer is the best over every
   balance, exactly, having simulated few of them. Beyond `ENUMERATE_BALANCES` balances a local search
   from the min-max DP answer (`auto`'s method) takes over.
3. **Configurations by bound.** Each configuration has a bound too (m x the work of a micro-batch / P,
   the cores' floor): configurations are visited in that order and the rest are skipped once a bound
   exceeds both the `top`-th best step and the best step plus the tie band (MAX_BAND when the runs decide
   ties, else the noise; they can enter neither the table nor the tie), so pruning never drops the best.

**Noise and ties.** Profiles are measured `runs` times (`stagewise.partition.measure`), and every run is
also kept alone (`ProfileSet.per_run`). The candidates within MAX_BAND of the fastest are re-predicted
from each run's profile alone; those that some run predicts no slower than the fastest are ties (the
repeated runs do not separate them from it), and the choice is the first of them by `preference` (no
recompute, fewer actions per device, i.e. micro-batches x virtual stages, fewer virtual stages, the simpler schedule,
less
memory). Without runs to compare (one run, or a given `noise`), the band rule: candidates within the
noise of the fastest are ties, the noise being the spread of each layer's time between runs (each run
first scaled to the same total), summed over the layers, relative to the total, at most MAX_BAND. The cap
keeps a profile taken on a very busy machine from trading a much faster schedule for a simpler one.
"""

from __future__ import annotations

import itertools
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from stagewise.partition.costmodel import CostModel, Estimate, ProfileSet
from stagewise.partition.costs import format_bytes, format_seconds
from stagewise.partition.search import descend, shorter
from stagewise.partition.solver import PartitionError, min_max_partition, uniform
from stagewise.schedules import SCHEDULES, SYNCHRONOUS, Schedule, ScheduleError, build
from stagewise.schedules.recompute import MODES, with_recompute
from stagewise.schedules.reduction import with_reductions
from stagewise.schedules.timeline import Timeline

# Simpler first: ties in predicted time go to the earliest. 1F1B before GPipe (the same bubble in less memory);
# the split-backward and chunked schedules after the plain ones.
PREFERENCE = ("naive", "1f1b", "gpipe", "zb-h1", "zb-h2", "interleaved", "looped-bfs", "zbv", "v-half", "v-min",
              "dualpipev")
ENUMERATE_BALANCES = 20000  # balances of one configuration tried exactly (memory vectorised, time bounded)
MAX_MICROBATCHES = 32
MAX_BAND = 0.05  # the widest tie band, however noisy the profile
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


@dataclass(frozen=True)
class Candidate:
    """One configuration with its best balance, and what it is predicted to cost."""

    schedule: str
    microbatches: int
    virtual_stages: int
    recompute: str  # the activation-checkpointing mode: "never", "except_last" or "always"
    balance: list[int]
    samples: int  # per micro-batch (the largest, when m does not divide the batch)
    step_s: float
    makespan_s: float
    bubble: float
    bubble_per_device: list[float]
    busy_s: list[float]
    memory: list[float]  # peak bytes per device
    saved_peak: list[float]  # peak saved-activation bytes per device, as the runtime counts them
    throughput: float  # tokens/s (samples/s when tokens per sample are unknown)

    @property
    def label(self) -> str:
        extra = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        mode = f" recompute={self.recompute}" if self.recompute != "never" else ""
        return f"{self.schedule}{extra} m={self.microbatches}{mode}"

    def settings(self) -> tuple[str, int, int, list[int], str]:
        """(schedule, microbatches, virtual_stages, balance, activation_checkpointing): what `Pipeline` takes."""
        return self.schedule, self.microbatches, self.virtual_stages, list(self.balance), self.recompute

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})


def preference(c: Candidate) -> tuple:
    """The tie-break order: no recompute, fewer actions per device (micro-batches x virtual stages), fewer
    virtual stages, the simpler schedule, less memory.

    Fewer actions first because what the model leaves out is paid per action and per message (the executor's
    own work, a transfer's latency, a wake-up when ranks share cores): measured on 4 ranks sharing 2 cores, the
    planner's old order (the simpler schedule first) took 1f1b m=16 over zb-h1 m=4, predicted 1% apart, and it
    measured 36% slower."""
    rank = PREFERENCE.index(c.schedule) if c.schedule in PREFERENCE else len(PREFERENCE)
    return (MODES.index(c.recompute), c.microbatches * c.virtual_stages, c.virtual_stages, rank, max(c.memory),
            c.step_s)


@dataclass
class Plan:
    """The result of `search`: the fastest candidates (fastest first), the choice among them, and the search."""

    choice: Candidate
    candidates: list[Candidate]
    noise: float  # relative; candidates within it of the fastest are ties
    settings: dict
    stats: dict = field(default_factory=dict)
    seconds: float = 0.0  # the search (the profile is in stats["profile_s"])

    @property
    def fastest(self) -> Candidate:
        return self.candidates[0]

    def to_dict(self) -> dict:
        return {"choice": self.choice.to_dict(), "candidates": [c.to_dict() for c in self.candidates],
                "noise": self.noise, "settings": self.settings, "stats": self.stats, "seconds": self.seconds}

    @classmethod
    def from_dict(cls, data: dict) -> Plan:
        return cls(Candidate.from_dict(data["choice"]), [Candidate.from_dict(c) for c in data["candidates"]],
                   data["noise"], data["settings"], data.get("stats", {}), data.get("seconds", 0.0))

    def format(self) -> str:
        """The candidates as a table, the choice marked, and why it was chosen."""
        st, se = self.stats, self.settings
        unit = "tokens/s" if se.get("tokens_per_sample") else "samples/s"
        limit = se.get("memory_limit")
        dp = se.get("data_parallel", 1)
        speed = se.get("reduce_bandwidth")
        links = f", gradient reduction at {speed / 1e9:.2f} GB/s (ring)" if dp > 1 and speed else ""
        if se.get("devices", 1) > 1 and (se.get("latency") or se.get("bandwidth")):
            bw = f"{se['bandwidth'] / 1e9:.2f} GB/s" if se.get("bandwidth") else "unlimited"
            links = f", messages {se.get('latency', 0.0) * 1e6:.0f} us + bytes at {bw}" + links
        lines = [f"plan: {se.get('devices')} devices{f' x {dp} replicas' if dp > 1 else ''}, "
                 f"batch {se.get('batch')}, memory limit {format_bytes(limit) + ' per device' if limit else 'none'}"
                 f"{', ' + str(se['cores']) + ' shared cores' if se.get('cores') else ''}"
                 f"{', ' + se['precision'] if se.get('precision', 'fp32') != 'fp32' else ''}{links}",
                 f"searched {st.get('configurations', 0)} configurations in {self.seconds:.1f} s "
                 f"(profile {st.get('profile_s', 0.0):.1f} s, {st.get('runs', 1)} runs): "
                 f"{st.get('evaluated', 0)} evaluated, {st.get('over_memory', 0)} over the memory limit, "
                 f"{st.get('pruned', 0)} pruned by the time bound, {st.get('simulations', 0)} simulations",
                 f"profile noise {st.get('noise_measured', self.noise):.1%} (per-layer spread over {st.get('runs', 1)} "
                 + ((f"profile runs): ties: {st.get('tied', 1) - 1} candidate(s) within {MAX_BAND:.0%} of the fastest "
                     f"that one run alone predicts no slower (up to {self.noise:.1%} slower)" if st.get("tied", 1) > 1
                     else f"profile runs): no ties: every run alone predicts the candidates within {MAX_BAND:.0%} "
                     "slower than the fastest")
                    if st.get("tie_rule") == "runs" else
                    f"profile runs; tie band {self.noise:.1%}): candidates within the band of the fastest are ties")
                 + ", broken toward fewer micro-batches x virtual stages, then the simpler schedule"]
        head = ["", "#", "schedule", "m", "v", "recompute", "balance", "step", unit, "bubble",
                "peak memory per device"]
        rows = [head]
        for k, c in enumerate(self.candidates, 1):
            rows.append(["*" if c == self.choice else "", str(k), c.schedule, str(c.microbatches),
                         str(c.virtual_stages),
                         c.recompute, ",".join(map(str, c.balance)), format_seconds(c.step_s),
                         f"{c.throughput:,.0f}", f"{c.bubble:.1%}", ", ".join(format_bytes(x) for x in c.memory)])
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines += ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in rows]
        c, f = self.choice, self.fastest
        why = "the fastest" if c == f else (f"within the noise of the fastest ({f.label}, "
                                             f"{c.step_s / f.step_s - 1:.1%} slower) and first by the tie-break")
        lines.append(f"choice: {c.label}, balance {c.balance}: {format_seconds(c.step_s)} per step, "
                     f"{c.throughput:,.0f} {unit} predicted; {why}")
        return "\n".join(lines)

    def compare(self, trace: Timeline, step_s: float, rows: Sequence[int] | None = None) -> dict:
        """The choice's prediction against a measured step: busy seconds, bubble and saved-activation bytes per
        device. `trace` is the step's measured timeline (`Pipeline.last_trace()`), `step_s` its wall time,
        `rows` the trace rows of the pipeline's devices (default 0..P-1; with data parallelism, one replica's)."""
        return compare(self.choice, trace, step_s, rows)


def compare(c: Candidate, trace: Timeline, step_s: float, rows: Sequence[int] | None = None) -> dict:
    """See `Plan.compare`."""
    P = len(c.busy_s)
    rows = list(rows) if rows is not None else list(range(P))
    busy = measured_busy(trace, rows)
    saved = measured_saved_peaks(trace, rows)
    return {
        "step_s": {"predicted": c.step_s, "measured": step_s},
        "busy_s": {"predicted": list(c.busy_s), "measured": busy},
        "bubble": {"predicted": list(c.bubble_per_device),
                   "measured": [1.0 - b / step_s if step_s > 0 else 0.0 for b in busy]},
        "saved_bytes": {"predicted": list(c.saved_peak), "measured": saved,
                        "ratio": [m / p if p else (1.0 if not m else math.inf) for m, p in zip(saved, c.saved_peak)]},
    }


def format_comparison(result: dict) -> str:
    """`compare`'s result as a few lines."""
    def row(name: str, key: str, fmt: Callable[[float], str]) -> str:
        p, m = result[key]["predicted"], result[key]["measured"]
        return f"  {name:<22} predicted {', '.join(map(fmt, p)):<40} measured {', '.join(map(fmt, m))}"

    s = result["step_s"]
    return "\n".join([
        f"prediction vs measured (per device): step predicted {format_seconds(s['predicted'])}, measured "
        f"{format_seconds(s['measured'])} ({s['measured'] / s['predicted']:.2f}x)",
        row("busy", "busy_s", format_seconds),
        row("bubble", "bubble", lambda x: f"{x:.1%}"),
        row("saved activations", "saved_bytes", format_bytes)])


def measured_busy(trace: Timeline, rows: Sequence[int]) -> list[float]:
    """Seconds each row computed (F, B, I, W, RECOMPUTE and the optimizer STEP; an overlapped pair counts by its
    members; a gradient reduction is communication, not counted), as `CostModel.estimate`'s `busy_s`."""
    busy = {r: 0.0 for r in rows}
    for e in trace.events:
        if e.device in busy and e.op in ("F", "B", "I", "W", "RECOMPUTE", "STEP"):
            busy[e.device] += e.end - e.start
    return [busy[r] for r in rows]


def measured_saved_peaks(trace: Timeline, rows: Sequence[int]) -> list[float]:
    """Peak saved-activation bytes per row: each forward's `saved_bytes` (a RECOMPUTE's: what the micro-batch
    holds after it) held until that (stage, micro-batch)'s last backward piece (B, or W where split), swept in
    the order the row ran its actions."""
    out = []
    for r in rows:
        held: dict[tuple[int, int], float] = {}
        level = peak = 0.0
        events = (e for e in trace.events if e.device == r and e.op in ("F", "RECOMPUTE", "B", "W"))
        for e in sorted(events, key=lambda e: e.start):
            key = (e.stage, e.microbatch)
            if e.op in ("F", "RECOMPUTE"):
                now = float(e.extra.get("saved_bytes", 0))
                level += now - held.get(key, 0.0)
                held[key] = now
                peak = max(peak, level)
            else:
                level -= held.pop(key, 0.0)
        out.append(peak)
    return out


# ---- the search ----

def compositions_array(num_layers: int, num_stages: int) -> np.ndarray:
    """Every balance of `num_layers` into `num_stages` non-empty stages, shape (count, stages)."""
    if num_stages == 1:
        return np.array([[num_layers]], dtype=np.int64)
    cuts = np.array(list(itertools.combinations(range(1, num_layers), num_stages - 1)), dtype=np.int64)
    cuts = cuts.reshape(-1, num_stages - 1)
    edges = np.concatenate([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), num_layers)], axis=1)
    return np.diff(edges, axis=1)


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
            if busiest[k] > best.makespan_s:
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
        extra = model.forward(lo, hi) if model.recompute else 0.0
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
    over `data_parallel` replicas, then into m micro-batches. `recompute`: the activation-checkpointing modes
    to try (a mode that changes nothing for a schedule, say "except_last" where every backward follows its
    forward, gives the same schedule and is kept once). `balance(schedule)` fixes the balance per
    schedule instead of searching it. `noise` overrides the profiles' own estimate. With `data_parallel` > 1
    every candidate carries its gradient reductions (REDUCE actions), timed at `reduce_bandwidth` (bytes/s in
    ring units, see `stagewise.partition.link_speed`; infinite: free). Raises PartitionError when nothing
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
            raise ValueError(f"the planner models the activation-checkpointing modes {', '.join(MODES)}, not {mode!r}")
    limit = math.inf if memory_limit is None else float(memory_limit)
    by_runs = noise is None and len(profiles.per_run) > 1  # ties decided by the runs (see `unresolved`)
    # how far from the best a candidate can still tie: it must not be pruned before the tie is decided
    band = MAX_BAND if by_runs else min(MAX_BAND, max(p.noise for p in profiles.sizes.values())) if noise is None \
        else noise
    tokens = tokens_per_sample or 1
    groups = []
    for name in names:
        for v in virtual_stage_options(name, devices, L, virtual_stages):
            for m in ms:
                for r in recompute:
                    samples = -(-per_replica // m)
                    prof = profiles.at(samples)
                    least = [min(x.backward, (x.input_grad or 0.0) + w) for x, w in
                             zip(prof.layers, prof.weight_grad)] if prof.weight_grad else [x.backward for x in
                                                                                          prof.layers]
                    work = sum(x.forward + b + (x.forward if r == "always" else 0.0)
                               for x, b in zip(prof.layers, least))
                    floor = m * work * data_parallel / min(cores, devices * data_parallel) if cores else 0.0
                    total = sum(x.params for x in prof.layers)
                    lb = max(m * work / devices, floor) + total * profiles.step_per_param / devices
                    groups.append((lb, name, v, m, r, samples))
    if not groups:
        raise PartitionError(f"no schedule of {', '.join(names)} fits {L} layers on {devices} devices "
                             "(chunked schedules need devices x virtual stages layers)")
    groups.sort(key=lambda g: (g[0], MODES.index(g[4]), PREFERENCE.index(g[1]) if g[1] in PREFERENCE else 99, g[3]))
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
        if (name, v, m, schedule.actions) in seen:
            continue  # the mode changes nothing here (or gives what another mode already gave)
        seen.add((name, v, m, schedule.actions))
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
        found.append(Candidate(name, m, v, r, est.balance, samples, est.step_s, est.makespan_s, est.bubble,
                               est.bubble_per_device, est.busy_s, est.memory, est.saved_peak,
                               batch * tokens / est.step_s if est.step_s > 0 else math.inf))
    if not found:
        smallest = f"; the smallest peak seen is {format_bytes(least_memory)}" if least_memory < math.inf else ""
        raise PartitionError(f"no configuration fits the memory limit of {format_bytes(limit)} per device"
                             f"{smallest}" + (f" ({len(failed)} could not be built)" if failed else ""))
    found.sort(key=lambda c: (c.step_s, preference(c)))
    best = found[0]
    measured_noise = profiles.at(best.samples).noise
    if by_runs:
        tied = unresolved(found, profiles, built, per_replica, options)
        width = max(c.step_s / best.step_s - 1 for c in tied)
    else:
        width = min(MAX_BAND, measured_noise) if noise is None else noise
        tied = [c for c in found if c.step_s <= best.step_s * (1 + width)]
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
            "tie_rule": "runs" if by_runs else "band",
            "noise_measured": measured_noise,
            "noise_per_size": {str(k): p.noise for k, p in sorted(profiles.sizes.items())}}
    return Plan(choice, shown, width, settings, info, time.perf_counter() - t0)


def unresolved(found: Sequence[Candidate], profiles: ProfileSet, schedules: dict[tuple[str, int, int, str], Schedule],
               per_replica: int, options: dict) -> list[Candidate]:
    """The candidates the repeated profile runs do not separate from the fastest (`found[0]`): those within
    MAX_BAND of it that some run, taken alone, predicts no slower than the fastest. The fastest is one of them.

    Each run is a whole profile of the model: a slow layer in one run moves every candidate that holds it, so
    this is the noise the tie is about, measured on the candidates themselves rather than summed over the
    layers."""
    best = found[0]
    pool = [c for c in found if c.step_s <= best.step_s * (1 + MAX_BAND)]
    steps: dict[int, list[float]] = {id(c): [] for c in pool}
    for k in range(len(profiles.per_run)):
        run = profiles.run(k)
        for c in pool:
            schedule = schedules[(c.schedule, c.virtual_stages, c.microbatches, c.recompute)]
            model = CostModel(schedule, run.at(-(-per_replica // c.microbatches)),
                              step_per_param=run.step_per_param, **options)
            steps[id(c)].append(model.estimate(c.balance).step_s)
    ahead = steps[id(best)]
    return [c for c in pool if c is best or any(x <= y for x, y in zip(steps[id(c)], ahead))]


def predict(profiles: ProfileSet, schedule: Schedule, batch: int, balance: Sequence[int], *, data_parallel: int = 1,
            recompute: str = "never", tokens_per_sample: int | None = None, **model: float) -> Candidate:
    """The prediction for one given configuration (no search): what `compare` holds a measured step to.
    `schedule` is as the pipeline runs it (with its RECOMPUTE actions, if any; `recompute` names the mode);
    `model` options go to `CostModel` (bytes_per_param, latency, bandwidth, cores, reduce_bandwidth)."""
    per_replica = -(-batch // data_parallel)
    samples = -(-per_replica // schedule.microbatches)
    cm = CostModel(schedule, profiles.at(samples), step_per_param=profiles.step_per_param, replicas=data_parallel,
                   **model)
    e = cm.estimate(list(balance))
    return Candidate(schedule.name, schedule.microbatches, schedule.virtual_stages, recompute, e.balance, samples,
                     e.step_s,
                     e.makespan_s, e.bubble, e.bubble_per_device, e.busy_s, e.memory, e.saved_peak,
                     batch * (tokens_per_sample or 1) / e.step_s if e.step_s > 0 else math.inf)
