"""The partition table: which layers each stage holds, with parameters, time and memory, as data and as text."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

from stagewise.partition.auto_balance import Planner
from stagewise.partition.layers import LayerProfile, ParamCounter, Shared
from stagewise.partition.solver import check_balance, ranges
from stagewise.partition.units import format_bytes, format_count, format_seconds
from stagewise.schedules import Schedule


def compress_names(names: Sequence[str]) -> list[str]:
    """Runs of one class name as `Name xN`: [A, B, B, B] -> ["A", "B x3"]."""
    out: list[tuple[str, int]] = []
    for name in names:
        if out and out[-1][0] == name:
            out[-1] = (name, out[-1][1] + 1)
        else:
            out.append((name, 1))
    return [name if n == 1 else f"{name} x{n}" for name, n in out]


@dataclass(frozen=True)
class StageRecord:
    """One row of the table: stage `stage` on device `device` holds layers [start, stop)."""

    stage: int
    device: int
    start: int
    stop: int
    layers: list[str]  # class names, runs compressed ("GPT2Block x3")
    params: int | None  # parameters the stage holds, a tied parameter counted once per stage
    time: float | None  # forward + backward seconds per micro-batch
    memory: float | None  # bytes the stage needs on its own (see Footprint.stage)


@dataclass(frozen=True)
class PartitionTable:
    """A balance with what every stage holds and costs; totals count a tied parameter once."""

    balance: list[int]
    stages: list[StageRecord]
    total_params: int | None  # every parameter once, tied ones included
    schedule: str | None = None
    device_memory: list[float] | None = None  # peak bytes per device under the schedule
    makespan: float | None = None  # simulated seconds for the schedule's micro-batches

    @classmethod
    def build(cls, balance: Sequence[int], names: Sequence[str], *, params: Sequence[float] | None = None,
              shared: Shared | None = None, times: Sequence[float] | None = None,
              placement: Sequence[int] | None = None, memory: Sequence[float] | None = None) -> PartitionTable:
        """A table from per-layer `names`, `params` (tied ones counted at their first layer, see
        ParamCounter) and `times` (seconds), with `placement[s]` the device of stage s (default s)
        and `memory` an optional figure per stage in bytes."""
        balance = check_balance(balance, len(names), len(balance))
        counter = ParamCounter(params, shared) if params is not None else None
        stages = []
        for s, (lo, hi) in enumerate(ranges(balance)):
            stages.append(StageRecord(
                stage=s, device=placement[s] if placement is not None else s, start=lo, stop=hi,
                layers=compress_names(names[lo:hi]),
                params=round(counter.range(lo, hi)) if counter else None,
                time=math.fsum(times[lo:hi]) if times is not None else None,
                memory=float(memory[s]) if memory is not None else None))
        return cls(balance, stages, round(counter.total) if counter else None)

    @classmethod
    def from_profiles(cls, balance: Sequence[int], layers: Sequence[LayerProfile], schedule: Schedule | None = None,
                      **planner: float) -> PartitionTable:
        """A table from `profile_layers` output; with a schedule, also memory per stage and device and the
        simulated step time (`planner` options: bytes_per_param, stash_bytes_per_param, latency, bandwidth,
        step_per_param)."""
        names = [x.name for x in layers]
        params = [x.params for x in layers]
        shared = [x.shared for x in layers]
        times = [x.time for x in layers]
        if schedule is None:
            return cls.build(balance, names, params=params, shared=shared, times=times)
        plan = Planner(layers, schedule, **planner)
        predicted = plan.predict(balance)
        memory = [plan.footprint.stage(s, lo, hi) for s, (lo, hi) in enumerate(ranges(predicted.balance))]
        table = cls.build(balance, names, params=params, shared=shared, times=times,
                          placement=schedule.placement, memory=memory)
        return cls(table.balance, table.stages, table.total_params, schedule.name, predicted.memory,
                   predicted.makespan)

    @classmethod
    def of(cls, balance: Sequence[int], profiles: Sequence[LayerProfile] | None, schedule: Schedule) -> PartitionTable:
        """The table `Pipeline` and `GPipe` print: measured when the profiles carry times, from names and
        parameter counts when they do not, layer numbers only without profiles (layer factories)."""
        if profiles is None:
            return cls.build(balance, [f"layer {i}" for i in range(sum(balance))], placement=schedule.placement)
        if any(p.time > 0 for p in profiles):
            return cls.from_profiles(balance, profiles, schedule)
        return cls.build(balance, [p.name for p in profiles], params=[p.params for p in profiles],
                         shared=[p.shared for p in profiles], placement=schedule.placement)

    def to_dict(self) -> dict:
        """JSON-ready: `balance`, `stages` (one record each), totals and the schedule's predictions."""
        return {"balance": list(self.balance), "stages": [asdict(r) for r in self.stages],
                "total_params": self.total_params, "schedule": self.schedule,
                "device_memory": self.device_memory, "makespan": self.makespan}

    def format(self) -> str:
        """A readable table, one line per stage, like DeepSpeed's partition printout."""
        rows = []
        for r in self.stages:
            row = [f"stage {r.stage}", f"device {r.device}", f"layers [{r.start}, {r.stop})", ", ".join(r.layers)]
            if r.params is not None:
                row.append(f"params {format_count(r.params)}")
            if r.time is not None:
                row.append(f"time {format_seconds(r.time)}")
            if r.memory is not None:
                row.append(f"memory {format_bytes(r.memory)}")
            rows.append(row)
        widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        total = [f"total  {sum(self.balance)} layers in {len(self.balance)} stages"]
        if self.total_params is not None:
            total.append(f"params {format_count(self.total_params)} (tied parameters counted once)")
        if self.device_memory is not None:
            peaks = ", ".join(format_bytes(m) for m in self.device_memory)
            total.append(f"peak memory per device {peaks}")
        if self.makespan is not None:
            total.append(f"step {format_seconds(self.makespan)} simulated under {self.schedule}")
        return "\n".join(lines + ["  ".join(total)])
