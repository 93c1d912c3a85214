"""Pipeline x data parallel: where the gradient reductions fall, and how much of them the cooldown hides.

Runs the benchmark GPT (embedding, 8 blocks of d256, head with an 8k vocabulary; batch 16 x 128) on
P=2 pipeline devices x D=2 data replicas (4 processes of 1 thread, gloo) under 1f1b and zbv, traces one
step after warm-up, and draws it beside the simulation of the same schedule (with its REDUCE actions)
from the measured per-stage costs, the reduction included. For each rank it reports the time of its
reductions when run alone (synchronous, measured after the step) and the time the step still waited
for them: the rest is hidden (a REDUCE only starts an asynchronous all-reduce; the step part waits). In
the simulation a reduction occupies its device, and the hidden share is the part of it during which
another device of its pipeline still computes. On this 2-core machine 4 ranks share 2 cores, so
absolute times are inflated; the overlap is what this measures.

    python benchmarks/bench_dp.py [--schedules 1f1b zbv] [--microbatches 4] [--out runs/bench]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ModelSettings, build_layers, make_batch  # noqa: E402


@dataclass
class Settings(ModelSettings):
    schedules: tuple[str, ...] = ("1f1b", "zbv")
    microbatches: int = 4
    pipeline: int = 2
    data: int = 2
    warmup: int = 2


def worker(rank: int, world: int, s: Settings) -> list[dict[str, Any]] | None:
    import torch

    from stagewise import Pipeline
    from stagewise.models.gpt2 import lm_loss

    torch.manual_seed(s.seed)
    out = []
    for name in s.schedules:
        pipe = Pipeline(build_layers(s), lm_loss, schedule=name, microbatches=s.microbatches, data_parallel=s.data,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=s.lr), show_partition=False, timeout=120)
        batch = make_batch(s)
        for _ in range(s.warmup):
            pipe.train_step(batch)
        pipe.train_step(batch)
        waits = pipe.world.gather({rank: pipe.last_step.get("reduce_wait_s", 0.0)})
        trace = pipe.last_trace()
        # the same reductions alone, synchronous: what they would cost if nothing hid them
        alone = {}
        for s_, st in pipe.stages.items():
            flat = torch.cat([p.detach().reshape(-1) for p in st.parameters()])
            group = pipe.world.grid_groups().data[pipe.world.grid.coords(rank)[0]]
            times = []
            for _ in range(3):
                world = pipe.world
                world.run(lambda r, w=world, g=group: w.barrier(r, g), "sync")
                t0 = time.perf_counter()
                world.run(lambda r, w=world, f=flat, g=group: w.all_reduce(r, [f], g), "all-reduce alone")
                times.append(time.perf_counter() - t0)
            alone[s_] = min(times)
        alone = pipe.world.gather({rank: alone})
        grads = sum(p.numel() * p.element_size() for p in pipe.parameters())
        sizes = pipe.world.gather({rank: {s_: sum(p.numel() * p.element_size() for p in st.parameters())
                                          for s_, st in pipe.stages.items()}})
        pipe.close()
        if rank == 0:
            out.append({"schedule": name, "trace": trace.to_dict(), "lowered": _lists(pipe.schedule),
                        "waits": waits, "alone": alone,
                        "stage_bytes": {k: v for part in sizes.values() for k, v in part.items()}, "grads": grads})
    return out if rank == 0 else None


def _lists(schedule: Any) -> list[list[tuple]]:
    return [[tuple(a) for a in prog] for prog in schedule.programs]


def hidden_share(events: list[Any], rows_of_pipeline: dict[int, list[int]]) -> dict[int, tuple[float, float]]:
    """Per row: (seconds of REDUCE, share of them during which another row of its pipeline computes F/B/I/W)."""
    busy: dict[int, list[tuple[float, float]]] = {}
    for e in events:
        if e.op in ("F", "B", "I", "W"):
            busy.setdefault(e.device, []).append((e.start, e.end))
    out = {}
    for row, others in rows_of_pipeline.items():
        total = hidden = 0.0
        for e in events:
            if e.device != row or e.op != "REDUCE":
                continue
            total += e.end - e.start
            spans = sorted(iv for o in others for iv in busy.get(o, []))
            covered, cur = 0.0, e.start
            for a, b in spans:
                a, b = max(a, cur), min(b, e.end)
                if b > a:
                    covered += b - a
                    cur = b
            hidden += covered
        out[row] = (total, hidden / total if total > 0 else 0.0)
    return out


def analyse(record: dict[str, Any], s: Settings, png: Path | None) -> dict[str, Any]:
    from stagewise.schedules import Action, Costs, Schedule, Timeline, simulate
    from stagewise.schedules.timeline import Event

    trace = Timeline.from_dict(record["trace"])
    lists = [[Action(*a) for a in prog] for prog in record["lowered"]]
    P, D = s.pipeline, s.data
    sched = Schedule(record["schedule"], P, s.microbatches,
                     tuple(next(d for d, p in enumerate(lists) for a in p if a.stage == st and a.op == "F")
                           for st in range(len({a.stage for p in lists for a in p if a.op == "F"}))),
                     lists, split_backward=any(a.op == "W" for p in lists for a in p), lowered=True)
    S = sched.num_stages
    # measured per-stage costs from replica 0's rows (row = rank = device * D + replica)
    costs: dict[str, list[float]] = {}
    for op in ("F", "B", "I", "W", "REDUCE"):
        per = []
        for st in range(S):
            row = sched.placement[st] * D
            d = [e.end - e.start for e in trace.events if e.op == op and e.stage == st and e.device == row]
            per.append(sum(d) / len(d) if d else 0.0)
        costs[op] = per
    if sched.split_backward:
        sim = simulate(sched, Costs(f=costs["F"], i=costs["I"], w=costs["W"], reduce=costs["REDUCE"]))
    else:
        sim = simulate(sched, Costs(f=costs["F"], b=costs["B"], reduce=costs["REDUCE"]))
    rows = {r: [q for q in range(P * D) if q % D == r % D and q != r] for r in range(P * D)}
    measured = hidden_share([e for e in trace.events], rows)
    sim_rows = {d: [q for q in range(P) if q != d] for d in range(P)}
    simulated = hidden_share(sim.timeline.events, sim_rows)
    origin = trace.origin
    step = max(e.end for e in trace.events) - origin
    if png is not None:
        from stagewise.viz import render_png

        shown = Timeline(trace.num_devices, [Event(**{**asdict(e)}) for e in trace.events
                                             if e.op in ("F", "B", "I", "W", "STEP", "REDUCE")],
                         title=f"measured: {sched.name} P={P} x D={D}, {step * 1e3:.0f} ms (row = rank)", unit="s",
                         num_stages=S)
        sim.timeline.title = (f"simulated from the measured costs (device = pipeline device): "
                              f"{sim.makespan * 1e3:.0f} ms")
        sim.timeline.unit = "s"
        render_png([shown, sim.timeline], str(png))
    waits, alone = record["waits"], record["alone"]
    exposed = {r: (sum(alone[r].values()), waits[r]) for r in sorted(waits)}
    return {"schedule": sched.name, "step_s": step, "exposed": exposed, "simulated_s": sim.makespan,
            "reduce_s_per_stage": costs["REDUCE"], "stage_bytes": record["stage_bytes"],
            "measured_hidden": {r: list(v) for r, v in measured.items()},
            "simulated_hidden": {d: list(v) for d, v in simulated.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedules", nargs="+", default=list(Settings.schedules))
    ap.add_argument("--microbatches", type=int, default=Settings.microbatches)
    ap.add_argument("--out", default="runs/bench")
    args = ap.parse_args()
    s = Settings(schedules=tuple(args.schedules), microbatches=args.microbatches)
    from stagewise import spawn

    records = spawn(worker, s.pipeline * s.data, args=(s,), timeout=1200)[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    for rec in records:
        png = out / f"dp_{rec['schedule']}.png"
        r = analyse(rec, s, png)
        results.append(r)
        print(f"\n== {r['schedule']}: P={s.pipeline} x D={s.data}, m={s.microbatches}; measured step "
              f"{r['step_s'] * 1e3:.0f} ms, simulated {r['simulated_s'] * 1e3:.0f} ms; timeline {png}")
        print("reduction per stage (ms): " + ", ".join(f"{x * 1e3:.1f}" for x in r["reduce_s_per_stage"])
              + "; gradient MB per stage: " + ", ".join(f"{v / 2**20:.1f}" for _, v in
                                                        sorted(r["stage_bytes"].items())))
        for row, (alone, wait) in sorted(r["exposed"].items()):
            hidden = 1 - min(wait / alone, 1.0) if alone > 0 else 0.0
            print(f"  measured rank {row}: its reductions alone {alone * 1e3:.1f} ms; waited for at the step "
                  f"{wait * 1e3:.1f} ms: {hidden:.0%} hidden")
        for d, (total, share) in sorted(r["simulated_hidden"].items()):
            print(f"  simulated device {d}: reductions {total * 1e3:.1f} ms, {share:.0%} hidden")
    (out / "dp.json").write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
