"""Timelines: what ran where and when. Simulations and measured runs share this shape."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class Event:
    """One action on one device, from `start` to `end` (in the timeline's unit)."""

    device: int
    start: float
    end: float
    op: str
    stage: int
    microbatch: int
    version: int = 0
    extra: dict = field(default_factory=dict)  # measured extras: bytes sent, activation bytes, ...

    @property
    def label(self) -> str:
        if self.op == "OVERLAP_F_B":  # an overlapped pair: its members' labels, such as F3+B1
            return "+".join(f"{op}{mb}" for op, _, mb in self.extra.get("pair", ())) or "F+B"
        if self.op in ("STEP", "REDUCE"):
            return self.op[0]
        if self.op in ("UNSHARD", "RESHARD"):  # all-gather, release (sharded data parallel)
            return "U" if self.op == "UNSHARD" else "X"
        if self.op == "RECOMPUTE":
            return f"C{self.microbatch}"
        return f"{self.op}{self.microbatch}"


@dataclass
class Timeline:
    """Events of every device; `unit` is "s" for measured runs and "" for cost units."""

    num_devices: int
    events: list[Event]
    title: str = ""
    unit: str = ""
    num_stages: int = 0

    @property
    def makespan(self) -> float:
        if not self.events:
            return 0.0
        return max(e.end for e in self.events) - min(e.start for e in self.events)

    @property
    def origin(self) -> float:
        return min((e.start for e in self.events), default=0.0)

    def busy(self, device: int) -> float:
        """Time the device was doing something: the union of its events (an overlapped pair and the
        members it contains count once)."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted((e.start, e.end) for e in self.events if e.device == device):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total

    def bubble_per_device(self) -> list[float]:
        span = self.makespan
        return [1.0 - self.busy(d) / span if span > 0 else 0.0 for d in range(self.num_devices)]

    def to_dict(self) -> dict:
        return {"num_devices": self.num_devices, "title": self.title, "unit": self.unit,
                "num_stages": self.num_stages, "events": [asdict(e) for e in self.events]}

    @classmethod
    def from_dict(cls, data: dict) -> Timeline:
        return cls(data["num_devices"], [Event(**e) for e in data["events"]], data.get("title", ""),
                   data.get("unit", ""), data.get("num_stages", 0))
