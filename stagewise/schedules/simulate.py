"""Discrete-event simulation of a schedule under per-stage costs and communication costs."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from stagewise.schedules.actions import STEP, Action, B, F, I, Schedule, W
from stagewise.schedules.engine import execute
from stagewise.schedules.timeline import Event, Timeline

PerStage = float | Sequence[float]


@dataclass(frozen=True)
class Costs:
    """Time of each action per stage (a number for all stages, or a list indexed by stage).

    `b` is the full backward; `i` and `w` its two halves for split schedules (default b/2
    each). A message between stages on different devices costs
    `latency + bytes[s] / bandwidth`, where `bytes[s]` is what crosses the boundary s -> s+1
    (the gradient going back is the same size).
    """

    f: PerStage = 1.0
    b: PerStage | None = None
    i: PerStage | None = None
    w: PerStage | None = None
    step: float = 0.0
    latency: float = 0.0
    bytes: PerStage = 0.0
    bandwidth: float = float("inf")

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


@dataclass
class Simulation:
    """The result of `simulate`: a timeline and the numbers read off it."""

    schedule: Schedule
    timeline: Timeline
    makespan: float
    bubble_fraction: float  # idle share of all devices over the makespan, 0..1
    bubble_per_device: list[float]
    peak_inflight: list[float]  # activations held, in whole-stage micro-batches (chunk count / chunks)
    peak_weight_versions: list[int]
    costs: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        sc = self.schedule
        return {
            "schedule": sc.name, "stages": sc.num_stages, "devices": sc.num_devices,
            "microbatches": sc.microbatches, "chunks": sc.chunks, "makespan": self.makespan,
            "bubble_fraction": self.bubble_fraction, "bubble_per_device": self.bubble_per_device,
            "peak_inflight": self.peak_inflight, "peak_weight_versions": self.peak_weight_versions,
            "costs": self.costs,
        }


def simulate(schedule: Schedule, costs: Costs | None = None) -> Simulation:
    """Run the schedule's compute actions against `costs`; communication adds transfer delays."""
    costs = costs or Costs()
    S = schedule.num_stages
    table = costs.table(S)
    step = costs.step

    def duration(a: Action) -> float:
        return step if a.op == STEP else table[a.op][a.stage]

    has_comm = costs.latency > 0 or (costs.bandwidth != float("inf") and costs.bytes != 0.0)
    starts, ends = execute(schedule, duration, costs.transfer(S) if has_comm else None)
    events: list[Event] = []
    for d in range(schedule.num_devices):
        for a, t0, t1 in zip(schedule.compute_actions(d), starts[d], ends[d]):
            events.append(Event(d, t0, t1, a.op, a.stage, a.microbatch, a.version))
    timeline = Timeline(schedule.num_devices, events, title=schedule.describe(), num_stages=S)
    makespan = max((e.end for e in events), default=0.0)
    busy = [0.0] * schedule.num_devices
    for e in events:
        busy[e.device] += e.end - e.start
    per_device = [1.0 - b / makespan if makespan > 0 else 0.0 for b in busy]
    overall = 1.0 - sum(busy) / (makespan * schedule.num_devices) if makespan > 0 else 0.0
    return Simulation(
        schedule, timeline, makespan, overall, per_device,
        peak_inflight(schedule, events), peak_weight_versions(schedule, events),
        {k: v for k, v in table.items()} | {"step": step, "latency": costs.latency},
    )


def _peak(deltas: list[tuple[float, int, int]]) -> int:
    """Peak of a running sum; at equal times releases (-1, ordered first) precede acquisitions."""
    level = peak = 0
    for _, _order, delta in sorted(deltas):
        level += delta
        peak = max(peak, level)
    return peak


def peak_inflight(schedule: Schedule, events: list[Event]) -> list[float]:
    """Most micro-batch activations each device holds at once (forward started, last backward piece not done)."""
    last = W if schedule.split_backward else B
    deltas: list[list[tuple[float, int, int]]] = [[] for _ in range(schedule.num_devices)]
    for e in events:
        if e.op == F:
            deltas[e.device].append((e.start, 1, 1))
        elif e.op == last:
            deltas[e.device].append((e.end, 0, -1))
    v = schedule.chunks
    return [_peak(x) / v if v > 1 else float(_peak(x)) for x in deltas]


def peak_weight_versions(schedule: Schedule, events: list[Event]) -> list[int]:
    """Most weight versions a device keeps at once: the newest, plus any still used by some action."""
    S = schedule.num_stages
    born: list[dict[int, float]] = [{0: 0.0} for _ in range(S)]
    last_use: list[dict[int, float]] = [{} for _ in range(S)]
    for e in events:
        if e.op == STEP:
            born[e.stage][e.version] = e.end
        else:
            lu = last_use[e.stage]
            lu[e.version] = max(lu.get(e.version, 0.0), e.end)
    result = [0] * schedule.num_devices
    for s in range(S):
        versions = sorted(born[s])
        deltas = []
        for k, v in enumerate(versions):
            end = last_use[s].get(v, born[s][v])
            if k + 1 < len(versions):
                end = max(end, born[s][versions[k + 1]])
                deltas.append((end, 0, -1))
            deltas.append((born[s][v], 1, 1))
        d = schedule.placement[s]
        result[d] = max(result[d], _peak(deltas))
    return result
