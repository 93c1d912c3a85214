"""A measured step's trace turned into costs: the one place that reads what a step cost off a `Timeline`. No torch
(a trace is data).

- `step_costs(trace, schedule, rows)`: per stage the mean seconds of each compute action per micro-batch, and per
  device its STEP (the optimizer and the tied-parameter sync with its wait), compute and waited seconds; as the
  simulator's `Costs` through `StepCosts.costs` (`stagewise train` draws that simulation beside the trace).
- `busy_seconds(trace, rows)`: compute and STEP seconds per device, as the cost model's `busy_s` counts them.
- `held_peaks(events, rows, nbytes)`: peak bytes a device holds from each forward to its last backward piece;
  `saved_peaks(trace, rows)` with the `saved_bytes` the runtime records.
- `compare(candidate, trace, step_s, rows)`: a planner candidate's prediction against the measured step.

`rows` are the trace rows of the pipeline's devices in device order (default 0..P-1; with data parallelism the
rows are ranks, so one replica's: device d x D).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

from stagewise.partition.plan_results import Candidate
from stagewise.partition.units import format_bytes, format_seconds
from stagewise.schedules import RECOMPUTE, STEP, B, Costs, F, I, Schedule, W
from stagewise.schedules.timeline import Event, Timeline

COMPUTE = (F, B, I, W, RECOMPUTE)  # a device's computation (an overlapped pair counts by its members)


@dataclass(frozen=True)
class StepCosts:
    """What one measured step cost, per stage (mean seconds per micro-batch, 0 where none ran) and per device."""

    f: list[float]
    b: list[float]  # the whole backward: the stage's mean B where it ran B, else its I + W
    i: list[float] | None  # None unless the schedule splits the backward
    w: list[float] | None
    recompute: list[float] | None  # None when nothing recomputed (the simulator then times a RECOMPUTE as F)
    step: list[float]  # per device: mean STEP seconds (the optimizer, and the tied-parameter sync with its wait)
    compute: list[float]  # per device: F, B, I, W and RECOMPUTE seconds
    wait: list[float]  # per device: seconds its actions waited for a peer (the executor's `wait_s`)

    def costs(self, *, step: bool = True) -> Costs:
        """The simulator's costs: these per-stage means and, with `step`, every device's measured STEP."""
        return Costs(f=self.f, b=self.b, i=self.i, w=self.w, recompute=self.recompute, step=self.step if step else 0.0)


def _devices(num_devices: int, rows: Sequence[int] | None) -> dict[int, int]:
    """Trace row -> pipeline device."""
    return {r: d for d, r in enumerate(range(num_devices) if rows is None else rows)}


def step_costs(trace: Timeline, schedule: Schedule, rows: Sequence[int] | None = None) -> StepCosts:
    """The per-stage and per-device costs of the measured step `trace` of `schedule` (see `StepCosts`)."""
    device_of = _devices(schedule.num_devices, rows)
    S, P = schedule.num_stages, len(device_of)
    seconds: dict[str, list[list[float]]] = {op: [[] for _ in range(S)] for op in COMPUTE}
    steps: list[list[float]] = [[] for _ in range(P)]
    compute, wait = [0.0] * P, [0.0] * P
    for e in trace.events:
        d = device_of.get(e.device)
        if d is None:
            continue
        took = e.end - e.start
        if e.op in seconds:
            seconds[e.op][e.stage].append(took)
            compute[d] += took
        elif e.op == STEP:
            steps[d].append(took)
        wait[d] += float(e.extra.get("wait_s", 0.0))
    mean = {op: [statistics.fmean(x) if x else 0.0 for x in seconds[op]] for op in COMPUTE}
    b = [mean[B][s] if seconds[B][s] else mean[I][s] + mean[W][s] for s in range(S)]
    split = schedule.split_backward
    recomputed = any(seconds[RECOMPUTE])
    return StepCosts(mean[F], b, mean[I] if split else None, mean[W] if split else None,
                     mean[RECOMPUTE] if recomputed else None, [statistics.fmean(x) if x else 0.0 for x in steps],
                     compute, wait)


def busy_seconds(trace: Timeline, rows: Sequence[int]) -> list[float]:
    """Seconds each row computed (F, B, I, W, RECOMPUTE; an overlapped pair counts by its members) or spent in its
    STEP; a gradient reduction is communication, not counted. As `CostModel.estimate`'s `busy_s`."""
    busy = {r: 0.0 for r in rows}
    for e in trace.events:
        if e.device in busy and (e.op in COMPUTE or e.op == STEP):
            busy[e.device] += e.end - e.start
    return [busy[r] for r in rows]


def held_peaks(events: Iterable[Event], rows: Sequence[int], nbytes: Callable[[Event], float]) -> list[float]:
    """Peak bytes per row held from each forward until its (stage, micro-batch)'s last backward piece (B, or W
    where split), swept in the order the row ran its actions: a forward holds `nbytes(forward)`, a RECOMPUTE
    what `nbytes` says the micro-batch holds after it."""
    by_row: dict[int, list[Event]] = {r: [] for r in rows}
    for e in events:
        if e.device in by_row and e.op in (F, RECOMPUTE, B, W):
            by_row[e.device].append(e)
    out = []
    for r in rows:
        held: dict[tuple[int, int], float] = {}
        level = peak = 0.0
        for e in sorted(by_row[r], key=lambda e: e.start):
            key = (e.stage, e.microbatch)
            if e.op in (F, RECOMPUTE):
                now = float(nbytes(e))
                level += now - held.get(key, 0.0)
                held[key] = now
                peak = max(peak, level)
            else:
                level -= held.pop(key, 0.0)
        out.append(peak)
    return out


def saved_peaks(trace: Timeline, rows: Sequence[int]) -> list[float]:
    """Peak saved-activation bytes per row, from the `saved_bytes` the runtime records on F and RECOMPUTE events."""
    return held_peaks(trace.events, rows, lambda e: float(e.extra.get("saved_bytes", 0)))


def compare(c: Candidate, trace: Timeline, step_s: float, rows: Sequence[int] | None = None) -> dict:
    """A candidate's prediction (`Plan.choice`, or `predict`'s) against a measured step: step, busy seconds,
    bubble, the STEP (optimizer and tie sync) and saved-activation bytes per device. `trace` is the step's
    measured timeline (`Pipeline.last_trace()`), `step_s` its wall time, `rows` as in the module docstring."""
    P = len(c.busy_s)
    rows = list(rows) if rows is not None else list(range(P))
    busy = busy_seconds(trace, rows)
    saved = saved_peaks(trace, rows)
    out = {
        "step_s": {"predicted": c.step_s, "measured": step_s},
        "busy_s": {"predicted": list(c.busy_s), "measured": busy},
        "bubble": {"predicted": list(c.bubble_per_device),
                   "measured": [1.0 - b / step_s if step_s > 0 else 0.0 for b in busy]},
        "saved_bytes": {"predicted": list(c.saved_peak), "measured": saved,
                        "ratio": [m / p if p else (1.0 if not m else math.inf) for m, p in zip(saved, c.saved_peak)]},
    }
    if c.optimizer_s:
        steps = {r: 0.0 for r in rows}
        for e in trace.events:
            if e.device in steps and e.op == STEP:
                steps[e.device] += e.end - e.start
        out["optimizer_s"] = {"predicted": list(c.optimizer_s), "measured": [steps[r] for r in rows],
                              "note": "predicted: the optimizer's compute; measured: the whole STEP action, the "
                                      "step's collectives and their waits included"}
    return out


def format_comparison(result: dict) -> str:
    """`compare`'s result as a few lines."""
    def row(name: str, key: str, fmt: Callable[[float], str]) -> str:
        p, m = result[key]["predicted"], result[key]["measured"]
        return f"  {name:<22} predicted {', '.join(map(fmt, p)):<40} measured {', '.join(map(fmt, m))}"

    s = result["step_s"]
    lines = [
        f"prediction vs measured (per device): step predicted {format_seconds(s['predicted'])}, measured "
        f"{format_seconds(s['measured'])} ({s['measured'] / s['predicted']:.2f}x)",
        row("busy", "busy_s", format_seconds),
        row("bubble", "bubble", lambda x: f"{x:.1%}"),
        row("saved activations", "saved_bytes", format_bytes)]
    if "optimizer_s" in result:
        lines.append(row("optimizer step (STEP)*", "optimizer_s", format_seconds))
        lines.append("  * predicted: the optimizer's own compute; measured: the whole STEP action, with the step's "
                     "collectives (tie sync, gradient norm, counts) and the waits for the other stages in them")
    return "\n".join(lines)
