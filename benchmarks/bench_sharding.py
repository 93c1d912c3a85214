"""Pipeline x sharded data parallel: step time and held bytes of each shard mode against shard="none", in one run.

Runs the benchmark GPT (embedding, 8 blocks of d256, head with an 8k vocabulary; batch 16 x 128) on P=2
pipeline devices x D=2 data replicas (4 processes of 1 thread, gloo) under one schedule, once per shard mode,
and reports for each: the median step after warm-up and its ratio to "none" measured in the same run; per rank,
the all-gathers (FSDP2's UNSHARD, from start to done, and the part the device waited for at its first forward),
the reduce-scatters (REDUCE) and the bytes of parameters, gradients and optimizer state held between steps
(ratio to "none"). The last step of each sharded mode is drawn as a measured timeline (row = rank) with the
all-gathers as `A` spans beside the actions (`U` starts one, `R` is the reduce-scatter, `X` the release).
Ratios, not absolute times, are what this measures: on a 2-core machine 4 ranks share 2 cores. No GPU was lent
for this benchmark, so there is no GPU figure.

    python benchmarks/bench_sharding.py [--schedule 1f1b] [--modes none full] [--steps 3]
        [--out runs/bench/sharding.jsonl] [--png-dir runs/bench]

A summary line per shard mode is appended to the JSON lines file `--out`, with the machine, the settings, the
date and the load (`_common.bench_meta`); docs/benchmarks.md is generated from such lines (`benchmarks/pages.py`).
The timelines are drawn into `--png-dir` (none without it).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import ModelSettings, add_model_args, bench_meta, build_layers, make_batch, write_jsonl  # noqa: E402


@dataclass
class Settings(ModelSettings):
    schedule: str = "1f1b"
    modes: tuple[str, ...] = ("none", "full")
    microbatches: int = 4
    pipeline: int = 2
    data: int = 2
    warmup: int = 2
    steps: int = 3


def worker(rank: int, world: int, s: Settings) -> list[dict[str, Any]] | None:
    import torch

    from stagewise import Pipeline
    from stagewise.models.gpt2 import lm_loss

    torch.set_num_threads(1)
    out = []
    batch = make_batch(s)
    for mode in s.modes:
        pipe = Pipeline(build_layers(s), lm_loss, schedule=s.schedule, microbatches=s.microbatches,
                        data_parallel=s.data, shard=mode, optimizer=lambda ps: torch.optim.Adam(ps, lr=s.lr),
                        show_partition=False, timeout=300)
        for _ in range(s.warmup):
            pipe.train_step(batch)
        times = []
        for _ in range(s.steps):
            t0 = time.perf_counter()
            pipe.train_step(batch)
            times.append(time.perf_counter() - t0)
        report = {k: v for k, v in pipe.last_step.items() if k.endswith("_s")}
        spans = pipe.sharding.last_spans.get(rank, [])
        trace = pipe.last_trace()  # a collective
        per_rank = pipe.world.gather({rank: {"times": times, "report": report, "spans": spans,
                                             "held": pipe.sharding.held_bytes()[rank]}})
        pipe.close()
        if rank == 0:
            out.append({"mode": mode, "trace": trace.to_dict(), "ranks": per_rank})
    return out if rank == 0 else None


def summarize(records: list[dict[str, Any]], s: Settings) -> list[dict[str, Any]]:
    base = next((r for r in records if r["mode"] == "none"), records[0])
    base_step = statistics.median(t for v in base["ranks"].values() for t in v["times"])
    base_held = {r: v["held"]["total"] for r, v in base["ranks"].items()}
    rows = []
    for rec in records:
        step = statistics.median(t for v in rec["ranks"].values() for t in v["times"])
        ranks = {}
        for r, v in sorted(rec["ranks"].items()):
            rep = v["report"]
            ranks[r] = {"all_gather_s": rep.get("all_gather_s", 0.0), "all_gather_wait_s": rep.get("all_gather_wait_s",
                        0.0), "reduce_scatter_s": rep.get("reduce_scatter_s", 0.0), "held": v["held"],
                        "held_ratio": v["held"]["total"] / base_held[r]}
        rows.append({"mode": rec["mode"], "schedule": s.schedule, "P": s.pipeline, "D": s.data,
                     "microbatches": s.microbatches, "step_s": step, "step_ratio": step / base_step,
                     "step_times_s": {r: v["times"] for r, v in sorted(rec["ranks"].items())}, "ranks": ranks})
    return rows


def draw(rec: dict[str, Any], png: Path) -> None:
    """The measured step of `rec` with each rank's all-gathers (issued -> done) as `A` spans in its row."""
    from stagewise.schedules.timeline import Event, Timeline
    from stagewise.viz import render_png

    trace = Timeline.from_dict(rec["trace"])
    events = [e for e in trace.events if e.op in ("F", "B", "I", "W", "STEP", "REDUCE", "UNSHARD", "RESHARD")]
    for r, v in rec["ranks"].items():
        for stages, start, done, waited in v["spans"]:
            events.append(Event(int(r), start, done, "A", stages[0], -1, 0, {"waited_s": waited}))
    step = max(e.end for e in events) - min(e.start for e in events)
    render_png(Timeline(trace.num_devices, sorted(events, key=lambda e: (e.device, e.start)),
                        title=f"measured: shard={rec['mode']}, {step * 1e3:.0f} ms (row = rank; A: all-gather)",
                        unit="s", num_stages=trace.num_stages), str(png))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--schedule", default=Settings.schedule)
    ap.add_argument("--modes", nargs="+", default=list(Settings.modes),
                    choices=["none", "optimizer", "gradients", "full"])
    ap.add_argument("--steps", type=int, default=Settings.steps, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=Settings.warmup, help="untimed steps per mode first")
    ap.add_argument("--microbatches", type=int, default=Settings.microbatches)
    add_model_args(ap, vocab=Settings.vocab)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/sharding.jsonl"),
                    help="append the results here as JSON lines")
    ap.add_argument("--png-dir", type=Path, default=None, help="draw each sharded mode's measured step here")
    args = ap.parse_args()
    if args.steps < 1 or args.warmup < 0:
        ap.error("--steps must be >= 1, --warmup >= 0")
    modes = tuple(dict.fromkeys(["none", *args.modes]))  # "none" first: the ratios' base, measured in this run
    s = Settings(schedule=args.schedule, modes=modes, steps=args.steps, warmup=args.warmup,
                 microbatches=args.microbatches, batch=args.batch, seq_len=args.seq_len, n_layer=args.n_layer,
                 n_embd=args.n_embd, n_head=args.n_head, vocab=args.vocab, lr=args.lr, seed=args.seed)
    from stagewise import spawn

    start = time.perf_counter()
    records = spawn(worker, s.pipeline * s.data, args=(s,), timeout=1800)[0]
    elapsed = time.perf_counter() - start
    rows = summarize(records, s)
    print(f"P={s.pipeline} x D={s.data}, {s.schedule}, m={s.microbatches}, the benchmark GPT; median of {s.steps} "
          "steps (CPU, gloo; no GPU was lent for this run)")
    for row in rows:
        print(f"\nshard={row['mode']}: step {row['step_s'] * 1e3:.0f} ms ({row['step_ratio']:.2f}x none)")
        for r, v in row["ranks"].items():
            held = v["held"]
            print(f"  rank {r}: held {held['total'] / 2**20:.1f} MiB ({v['held_ratio']:.2f}x none: parameters "
                  f"{held['parameters'] / 2**20:.1f}, gradients {held['gradients'] / 2**20:.1f}, optimizer "
                  f"{held['optimizer'] / 2**20:.1f}); all-gather {v['all_gather_s'] * 1e3:.1f} ms (waited "
                  f"{v['all_gather_wait_s'] * 1e3:.1f}), reduce-scatter {v['reduce_scatter_s'] * 1e3:.1f} ms")
    if args.png_dir is not None:
        args.png_dir.mkdir(parents=True, exist_ok=True)
        for rec in records:
            if rec["mode"] != "none":
                png = args.png_dir / f"sharding_{rec['mode']}_{s.schedule}.png"
                draw(rec, png)
                print(f"timeline: {png}")
    n = write_jsonl(args.out, {**bench_meta("sharding", asdict(s)), "wall_s": elapsed}, [], rows)
    print(f"appended {n} lines to {args.out}")


if __name__ == "__main__":
    main()
