"""The planner's results: a `Candidate` (one configuration, its best balance and what it is predicted to cost) and
the `Plan` (the fastest candidates, the choice among them, how the search went) with its table. No torch.

`plan_search` produces them, `plan_ties` chooses among the candidates; `stagewise.measure.trace_costs.compare`
holds a candidate to a measured step.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from stagewise.partition.units import format_bytes, format_seconds


@dataclass(frozen=True)
class Candidate:
    """One configuration with its best balance, and what it is predicted to cost."""

    schedule: str
    microbatches: int
    virtual_stages: int
    recompute: str  # the recompute mode: "never", "except_last" or "always"
    balance: list[int]
    samples: int  # per micro-batch (the largest, when m does not divide the batch)
    step_s: float
    makespan_s: float
    bubble: float
    bubble_per_device: list[float]
    busy_s: list[float]  # per device: compute and the STEP (tie sync and optimizer)
    memory: list[float]  # peak bytes per device
    saved_peak: list[float]  # peak saved-activation bytes per device, as the runtime counts them
    throughput: float  # tokens/s (samples/s when tokens per sample are unknown)
    optimizer_s: list[float] = field(default_factory=list)  # the optimizer step per device
    tie_sync_s: float = 0.0  # the tied parameters' gradient all-reduces, summed

    @property
    def label(self) -> str:
        extra = f" v={self.virtual_stages}" if self.virtual_stages > 1 else ""
        mode = f" recompute={self.recompute}" if self.recompute != "never" else ""
        return f"{self.schedule}{extra} m={self.microbatches}{mode}"

    def settings(self) -> tuple[str, int, int, list[int], str]:
        """(schedule, microbatches, virtual_stages, balance, recompute): what `Pipeline` takes."""
        return self.schedule, self.microbatches, self.virtual_stages, list(self.balance), self.recompute

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Candidate:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


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
        band = st.get("max_band", 0.0)  # the widest tie band the search allowed (`plan_ties.MAX_BAND`)
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
                 + ((f"profile runs): ties: {st.get('tied', 1) - 1} candidate(s) within {band:.0%} of the fastest "
                     f"that one run alone predicts no slower (up to {self.noise:.1%} slower)" if st.get("tied", 1) > 1
                     else f"profile runs): no ties: every run alone predicts the candidates within {band:.0%} "
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
        step = ""
        if c.optimizer_s:
            step = f" (optimizer step up to {format_seconds(max(c.optimizer_s))}" + (
                f", tied-parameter sync {format_seconds(c.tie_sync_s)}" if c.tie_sync_s else "") + ")"
        lines.append(f"choice: {c.label}, balance {c.balance}: {format_seconds(c.step_s)} per step{step}, "
                     f"{c.throughput:,.0f} {unit} predicted; {why}")
        return "\n".join(lines)
