"""Discrete-event simulation of a schedule under per-stage costs and communication costs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from stagewise.schedules.actions import OPS, OVERLAP_F_B, RECOMPUTE, REDUCE, STEP, UNSHARD, B, F, I, W
from stagewise.schedules.execution import compile_schedule, pair_rows, timed_execution
from stagewise.schedules.programs import OP_CODE
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Event, Timeline

PerStage = float | Sequence[float]
PerDevice = float | Sequence[float]
TieSync = tuple[Sequence[int], float]  # (devices holding a copy of a tied parameter, seconds of its all-reduce)


@dataclass(frozen=True)
class Costs:
    """Time of each action per stage (a number for all stages, or a list indexed by stage).

    `b` is the full backward; `i` and `w` its two halves for split schedules (default b/2
    each); `reduce` a data-parallel gradient reduction of the stage (REDUCE actions, see
    `with_reductions`), for example its gradient bytes x 2 (D-1)/D / bandwidth for a ring. A message
    between stages on different devices costs `latency + bytes[s] / bandwidth`, where `bytes[s]` is
    what crosses the boundary s -> s+1 (the gradient going back is the same size). `overlap`: whether
    an overlapped pair (OVERLAP_F_B, DualPipe's F and B of two micro-batches) really overlaps and takes
    max(F, B), or runs one after the other and takes F + B (the default, as on a CPU).

    `step` is each device's optimizer step (its STEP actions; a number for all devices). `tie_sync` lists the
    all-reduces of tied parameters' gradients the runtime runs at the step (`SyncTiedGrads`), each as (the
    devices holding a copy, seconds): one starts when all its devices have finished their other work (and
    earlier syncs), and their optimizer steps follow it. It is drawn inside the STEP events, as the measured
    STEP contains it (extras `tie_wait_s`, `tie_sync_s`, `optimizer_s`); synchronous schedules only (one STEP
    per device, its last action), as the runtime refuses ties with the asynchronous ones.
    """

    f: PerStage = 1.0
    b: PerStage | None = None
    i: PerStage | None = None
    w: PerStage | None = None
    step: PerDevice = 0.0
    tie_sync: Sequence[TieSync] = ()
    reduce: PerStage = 0.0
    unshard: PerStage = 0.0  # UNSHARD actions (sharded data parallel): a stage's all-gather, its exposed time
    recompute: PerStage | None = None  # RECOMPUTE actions (activation checkpointing); default: the forward's cost
    latency: float = 0.0
    bytes: PerStage = 0.0
    bandwidth: float = float("inf")
    overlap: bool = False

    def table(self, num_stages: int) -> dict[str, list[float]]:
        """Per-stage lists for F, B, I and W."""
        f = _per_stage(self.f, num_stages, "f")
        if self.b is None:
            if self.i is not None and self.w is not None:
                b = [x + y for x, y in zip(_per_stage(self.i, num_stages, "i"), _per_stage(self.w, num_stages, "w"))]
            else:
                b = [2.0 * x for x in f]
        else:
            b = _per_stage(self.b, num_stages, "b")
        i = _per_stage(self.i, num_stages, "i") if self.i is not None else [x / 2 for x in b]
        w = _per_stage(self.w, num_stages, "w") if self.w is not None else [x - y for x, y in zip(b, i)]
        return {F: f, B: b, I: i, W: w}

    def transfer(self, num_stages: int):
        nbytes = _per_stage(self.bytes, max(num_stages - 1, 1), "bytes")
        bw, lat = self.bandwidth, self.latency

        def delay(src: int, dst: int) -> float:
            return lat + nbytes[min(src, dst)] / bw

        return delay


def _per_stage(value: PerStage, n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(x) for x in value]
    if len(values) != n:
        raise ValueError(f"cost {name!r} has {len(values)} values for {n} stages")
    return values


class Simulation:
    """The result of `simulate`: a timeline and the numbers read off it.

    `start`/`end` hold the time of every compute action (rows of `compile_schedule`:
    device-major, in program order); `timeline` turns them into events when first asked. An
    overlapped pair spans its members: they run one after the other inside it, or both from
    its start when `Costs.overlap`.
    """

    def __init__(self, schedule: Schedule, start: np.ndarray, end: np.ndarray, makespan: float,
                 bubble_fraction: float, bubble_per_device: list[float], peak_inflight: list[float],
                 peak_weight_versions: list[int], costs: dict, step_extra: dict[int, dict] | None = None) -> None:
        self.schedule = schedule
        self.start, self.end = start, end
        self.makespan = makespan
        self.bubble_fraction = bubble_fraction  # idle share of all devices over the makespan, 0..1
        self.bubble_per_device = bubble_per_device
        self.peak_inflight = peak_inflight  # activations held, in whole-stage micro-batches
        self.peak_weight_versions = peak_weight_versions
        self.costs = costs
        self.step_extra = step_extra or {}  # row -> what a STEP event holds: optimizer_s, tie_wait_s, tie_sync_s
        self._timeline: Timeline | None = None

    @property
    def timeline(self) -> Timeline:
        if self._timeline is None:
            c = compile_schedule(self.schedule)
            p = c.programs
            ops = [OPS[k] for k in p.op.tolist()]
            events = list(map(Event, c.device.tolist(), self.start.tolist(), self.end.tolist(), ops,
                              p.stage.tolist(), p.microbatch.tolist(), p.version.tolist()))
            overlapped = bool(self.costs.get("overlap", False))
            for r in pair_rows(c)[0].tolist():
                f, b = events[r + 1], events[r + 2]
                events[r].extra = {"pair": [[f.op, f.stage, f.microbatch], [b.op, b.stage, b.microbatch]],
                                   "overlapped": overlapped}
                f.extra = {"in_pair": True}
                b.extra = {"in_pair": True}
            for r, extra in self.step_extra.items():
                events[r].extra = dict(extra)
            self._timeline = Timeline(self.schedule.num_devices, events, title=self.schedule.describe(),
                                      num_stages=self.schedule.num_stages)
        return self._timeline

    def to_dict(self) -> dict:
        sc = self.schedule
        return {
            "schedule": sc.name, "stages": sc.num_stages, "devices": sc.num_devices,
            "microbatches": sc.microbatches, "virtual_stages": sc.virtual_stages, "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction, "bubble_per_device": self.bubble_per_device,
            "peak_inflight": self.peak_inflight, "peak_weight_versions": self.peak_weight_versions,
            "costs": self.costs,
        }


def simulate(schedule: Schedule, costs: Costs | None = None) -> Simulation:
    """Run the schedule's compute actions against `costs`; communication adds transfer delays."""
    costs = costs or Costs()
    S, P = schedule.num_stages, schedule.num_devices
    table = costs.table(S)
    c = compile_schedule(schedule)
    op, st = c.programs.op, c.programs.stage
    per_op = np.zeros((len(OPS), max(S, 1)))
    for name, values in table.items():
        per_op[OP_CODE[name], :S] = values
    per_op[OP_CODE[REDUCE], :S] = _per_stage(costs.reduce, S, "reduce")
    per_op[OP_CODE[UNSHARD], :S] = _per_stage(costs.unshard, S, "unshard")  # RESHARD frees memory: no time
    recompute = table[F] if costs.recompute is None else _per_stage(costs.recompute, S, "recompute")
    per_op[OP_CODE[RECOMPUTE], :S] = recompute
    cost = per_op[op, np.clip(st, 0, max(S - 1, 0))]
    steps = np.flatnonzero(op == OP_CODE[STEP])
    step_of = np.asarray(_per_stage(costs.step, P, "step"))  # per device: a STEP's stage need not be its device
    cost[steps] = step_of[c.device[steps]]
    pair, fm, bm = pair_rows(c)
    cost_f, cost_b = cost[fm], cost[bm]
    if len(pair):  # the pair's row takes the time of both members; they follow it at no cost
        cost[pair] = np.maximum(cost_f, cost_b) if costs.overlap else cost_f + cost_b
        cost[fm] = cost[bm] = 0.0
    has_comm = costs.latency > 0 or (costs.bandwidth != float("inf") and costs.bytes != 0.0)
    delay = None
    if has_comm and S > 1:
        transfer = costs.transfer(S)
        delay = np.array([transfer(b, b + 1) for b in range(S - 1)])
    start, end = timed_execution(schedule, cost, delay)
    step_extra = _tie_syncs(schedule, c, steps, start, end, step_of, costs.tie_sync)
    makespan = float(end.max(initial=0.0))
    busy = np.bincount(c.device, weights=end - start, minlength=P)
    if len(pair):  # where the members run inside their pair
        t0 = start[pair]
        start[fm], end[fm] = t0, t0 + cost_f
        start[bm] = t0 if costs.overlap else t0 + cost_f
        end[bm] = start[bm] + cost_b
    per_device = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy.tolist()]
    overall = 1.0 - float(busy.sum()) / (makespan * P) if makespan > 0 else 0.0
    return Simulation(
        schedule, start, end, makespan, overall, per_device,
        _peak_inflight(schedule, c, start, end), _peak_weight_versions(schedule, c, start, end),
        {k: v for k, v in table.items()} | {"step": costs.step, "latency": costs.latency, "overlap": costs.overlap,
                                           "tie_sync": [[list(g), t] for g, t in costs.tie_sync]},
        step_extra,
    )


def _tie_syncs(schedule: Schedule, c, steps: np.ndarray, start: np.ndarray, end: np.ndarray, step_of: np.ndarray,
               ties: Sequence[TieSync]) -> dict[int, dict]:
    """Move the STEP rows' ends (in place) past the tied parameters' all-reduces; what each STEP holds, by row.

    Each device's STEP starts when its other work is done; the all-reduces run in order, each once every device
    of it is free, and a device's optimizer step starts after its last one."""
    if not len(steps) or (not ties and not np.any(step_of)):
        return {}
    if not ties:
        return {r: {"optimizer_s": float(end[r] - start[r])} for r in steps.tolist()}
    row = {int(d): int(r) for d, r in zip(c.device[steps].tolist(), steps.tolist())}
    last = np.r_[c.device[1:] != c.device[:-1], True]
    if schedule.asynchronous or len(row) != len(steps) or not last[steps].all():
        raise ValueError(f"{schedule.name}: tied-parameter syncs are modelled for synchronous schedules, whose every "
                         "device ends with its one STEP")
    free = {d: float(start[r]) for d, r in row.items()}
    synced: dict[int, float] = {}
    for devices, seconds in ties:
        missing = [d for d in devices if d not in row]
        if missing:
            raise ValueError(f"{schedule.name}: device {missing[0]} holds a tied parameter but has no STEP")
        done = max(free[d] for d in devices) + float(seconds)
        for d in devices:
            free[d], synced[d] = done, synced.get(d, 0.0) + float(seconds)
    out = {}
    for d, r in row.items():
        end[r] = free[d] + step_of[d]
        out[r] = {"optimizer_s": float(step_of[d])}
        if d in synced:  # waiting for the other holders, then the all-reduces
            out[r].update(tie_wait_s=max(0.0, free[d] - float(start[r]) - synced[d]), tie_sync_s=synced[d])
    return out


def _segment_peaks(group: np.ndarray, time: np.ndarray, first: np.ndarray, delta: np.ndarray, n: int) -> np.ndarray:
    """Peak running sum of `delta` per group, in time order; at equal times `first` = 0 goes first."""
    out = np.zeros(n, dtype=np.int64)
    if not len(group):
        return out
    order = np.lexsort((first, time, group))
    g, dl = group[order], delta[order]
    level = np.cumsum(dl)
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    base = np.r_[0, level[starts[1:] - 1]] if len(starts) > 1 else np.zeros(1, dtype=np.int64)
    level = level - np.repeat(base, np.diff(np.r_[starts, len(g)]))
    peaks = np.maximum.reduceat(level, starts)
    out[g[starts]] = np.maximum(peaks, 0)
    return out


def _peak_inflight(schedule: Schedule, c, start: np.ndarray, end: np.ndarray) -> list[float]:
    """Most micro-batch activations each device holds at once (forward started, last backward piece not done).

    The last piece is B, or W where the backward was split (a schedule may mix both)."""
    op = c.programs.op
    f, b = op == OP_CODE[F], (op == OP_CODE[B]) | (op == OP_CODE[W])
    group = np.concatenate([c.device[f], c.device[b]])
    time = np.concatenate([start[f], end[b]])
    first = np.concatenate([np.ones(f.sum(), dtype=np.int64), np.zeros(b.sum(), dtype=np.int64)])
    delta = np.concatenate([np.ones(f.sum(), dtype=np.int64), -np.ones(b.sum(), dtype=np.int64)])
    peaks = _segment_peaks(group, time, first, delta, schedule.num_devices)
    v = schedule.virtual_stages
    return [x / v if v > 1 else float(x) for x in peaks.tolist()]


def _peak_weight_versions(schedule: Schedule, c, start: np.ndarray, end: np.ndarray) -> list[int]:
    """Most weight versions a device keeps at once: the newest, plus any still used by some action.

    Version k of a stage lives from the STEP that creates it (version 0: from time 0) until
    both its last use and the birth of version k+1 have passed.
    """
    S, P = schedule.num_stages, schedule.num_devices
    p = c.programs
    step = p.op == OP_CODE[STEP]
    ver, st = p.version, p.stage
    V = int(max(ver.max(initial=0), 0)) + 1
    born = np.full(S * V, np.nan)
    born[np.arange(S) * V] = 0.0
    born[st[step] * V + ver[step]] = end[step]
    use = ~step & (p.op != OP_CODE[OVERLAP_F_B])
    last_use = np.full(S * V, -np.inf)
    np.maximum.at(last_use, st[use] * V + ver[use], end[use])
    exists = np.flatnonzero(~np.isnan(born))
    s_of, v_of = exists // V, exists % V
    b = born[exists]
    order = np.lexsort((v_of, s_of))
    s_of, b, exists = s_of[order], b[order], exists[order]
    nxt_same = np.r_[s_of[1:] == s_of[:-1], False]
    next_born = np.r_[b[1:], np.inf]
    dies = np.maximum(np.where(np.isneginf(last_use[exists]), b, last_use[exists]), next_born)
    has_end = nxt_same
    group = np.concatenate([s_of, s_of[has_end]])
    time = np.concatenate([b, dies[has_end]])
    first = np.concatenate([np.ones(len(b), dtype=np.int64), np.zeros(int(has_end.sum()), dtype=np.int64)])
    delta = np.concatenate([np.ones(len(b), dtype=np.int64), -np.ones(int(has_end.sum()), dtype=np.int64)])
    per_stage = _segment_peaks(group, time, first, delta, S)
    result = np.zeros(P, dtype=np.int64)
    np.maximum.at(result, np.asarray(schedule.placement, dtype=np.int64), per_stage)
    return [int(x) for x in result.tolist()]
