"""The partitioner's benchmark: measured step time of the balance each partition method chooses.

The model is a small GPT (embedding, 8 GPT-2 blocks, head; n_embd 256, 4 heads) with a LARGE
vocabulary (32768 by default, tied embedding/head), so the embedding holds most parameters and the
head (a 256 x 32768 matmul plus the loss) costs several blocks' time: "uniform" is a poor cut and
the methods disagree. For 2 and 4 stages (one process per stage, one intra-op thread each, started
with `spawn`) and schedule 1f1b with m = 8 micro-batches of a fixed batch of 16 x 128 random token
ids, it builds one `Pipeline` per method ("uniform", "parameters", "time", "auto"; the last two
measure the layers on `sample=(inputs, labels)`) and trains with Adam, alternating the methods
round-robin over `--repeats` rounds of `--steps` timed steps (after `--warmup` untimed steps at
the start). Step time is the time on rank 0 between `train_step` calls (each ends with a broadcast
of the loss, so every rank is done).

Printed per stage count: the balance each method chose, the step time (median [min-max] over the
rounds' median steps), the speed-up against uniform (step ratio within each round), the step the
partitioner's own model predicts for that balance (`Planner.predict` over the profile measured by
the "time"/"auto" pipeline: compute and the tied-parameter wait, no communication and no optimizer cost, which
`profile_layers` does not measure) and its predicted speed-up, and per
stage the measured mean F + B compute per micro-batch (from the last timed step's timeline)
against the profile's prediction. With 4 ranks on a 2-core machine two processes share each
core, so those numbers are slow and noisy: read them for the ranking, not the absolute value.

Run (two to three minutes with the defaults on two cores):

    PYTHONPATH=. python benchmarks/bench_partition.py [--stages 2 4 --steps 1 --repeats 3 --warmup 1]
        [--out runs/bench/partition.jsonl]

Every round and a summary per (stages, method) go to the JSON lines file `--out`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from _common import add_run_args, bench_meta, build_layers, lm_loss, make_batch, spread, timed, write_jsonl
from torch import nn

from stagewise.measure.trace_costs import step_costs
from stagewise.partition import Planner
from stagewise.pipeline import Pipeline
from stagewise.runtime.launch import spawn
from stagewise.schedules import Schedule
from stagewise.schedules.timeline import Timeline


@dataclass(frozen=True)
class Settings:
    """Everything the worker processes need (picklable)."""

    methods: tuple[str, ...]
    schedule: str
    microbatches: int
    steps: int
    repeats: int
    warmup: int
    batch: int
    seq_len: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    lr: float
    seed: int


def stage_compute(trace: Timeline, schedule: Schedule) -> list[float]:
    """Mean F + B compute seconds per micro-batch of every stage (waiting for peers excluded)."""
    costs = step_costs(trace, schedule)
    return [f + b for f, b in zip(costs.f, costs.b)]


def worker(rank: int, world: int, s: Settings) -> list[dict[str, Any]] | None:
    """Every method's pipeline, alternating round-robin; rank 0 returns one record per (method, round)."""
    torch.set_num_threads(1)
    batch = make_batch(s)

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=s.lr)

    pipes: dict[str, Pipeline] = {}
    build_s: dict[str, float] = {}
    for method in s.methods:
        t0 = time.perf_counter()
        pipes[method] = Pipeline(build_layers(s), lm_loss, schedule=s.schedule, microbatches=s.microbatches,
                                 partition=method, optimizer=adam, timeout=600.0, sample=batch)
        build_s[method] = time.perf_counter() - t0
    profiles = next((p.profiles for p in pipes.values() if p.profiles and any(x.time > 0 for x in p.profiles)), None)
    planner = Planner(profiles, next(iter(pipes.values())).schedule) if profiles else None

    for pipe in pipes.values():
        timed(lambda p=pipe: p.train_step(batch), s.warmup)
    records: list[dict[str, Any]] = []
    for r in range(s.repeats):
        for method, pipe in pipes.items():
            times = timed(lambda p=pipe: p.train_step(batch), s.steps)
            trace = pipe.last_trace()  # a collective: every rank calls it
            if rank != 0:
                continue
            record: dict[str, Any] = {
                "stages": world, "method": method, "round": r, "balance": list(pipe.balance),
                "step_times_s": times, "step_s": statistics.median(times), "build_s": build_s[method],
                "stage_compute_s": stage_compute(trace, pipe.schedule),
            }
            if planner is not None:
                pred = planner.predict(pipe.balance)
                record.update(predicted_s=pred.makespan, predicted_stage_s=list(pred.stage_time))
            records.append(record)
    return records if rank == 0 else None


def summarise(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One summary per method; speed-ups are taken within a round, then summarised over rounds."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for rec in records:
        by_round.setdefault(rec["round"], {})[rec["method"]] = rec
    summaries = []
    for method in dict.fromkeys(rec["method"] for rec in records):
        rows = [by_round[r][method] for r in sorted(by_round)]
        S = len(rows[0]["balance"])
        summary: dict[str, Any] = {
            "stages": rows[0]["stages"], "method": method, "balance": rows[0]["balance"],
            "step_s": [x["step_s"] for x in rows],
            "stage_compute_ms": [1e3 * statistics.median(x["stage_compute_s"][st] for x in rows) for st in range(S)],
        }
        if "uniform" in by_round[rows[0]["round"]]:
            summary["speedup_vs_uniform"] = [by_round[x["round"]]["uniform"]["step_s"] / x["step_s"] for x in rows]
        if "predicted_s" in rows[0]:
            summary["predicted_s"] = rows[0]["predicted_s"]
            summary["predicted_stage_ms"] = [1e3 * x for x in rows[0]["predicted_stage_s"]]
            if "uniform" in by_round[rows[0]["round"]]:
                summary["predicted_speedup"] = by_round[rows[0]["round"]]["uniform"]["predicted_s"] / rows[0][
                    "predicted_s"]
        summaries.append(summary)
    return summaries


def print_table(summaries: list[dict[str, Any]], s: Settings) -> None:
    stages = summaries[0]["stages"]
    print(f"\n{stages} stages ({stages} ranks x 1 thread), {s.schedule} m={s.microbatches}, "
          f"{s.n_layer + 2}-layer GPT vocab {s.vocab}, batch {s.batch} x {s.seq_len}; {s.repeats} rounds x "
          f"{s.steps} timed steps; median [min-max] over rounds")
    print(f"{'method':<11} {'balance':<13} {'step s':<22} {'speed-up vs uniform':<20} {'predicted s':<12} "
          f"{'pred. speed-up':<15} {'stage F+B ms/mb measured':<27} {'predicted':<20}")
    for x in summaries:
        bal = str(x["balance"]).replace(" ", "")
        up = spread(x["speedup_vs_uniform"], ".2f") if "speedup_vs_uniform" in x else "-"
        pred = f"{x['predicted_s']:.3f}" if "predicted_s" in x else "-"
        pred_up = f"{x['predicted_speedup']:.2f}" if "predicted_speedup" in x else "-"
        meas = "/".join(f"{v:.0f}" for v in x["stage_compute_ms"])
        pred_st = "/".join(f"{v:.0f}" for v in x["predicted_stage_ms"]) if "predicted_stage_ms" in x else "-"
        print(f"{x['method']:<11} {bal:<13} {spread(x['step_s']):<22} {up:<20} {pred:<12} {pred_up:<15} "
              f"{meas:<27} {pred_st:<20}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4], help="pipeline sizes (one rank per stage)")
    parser.add_argument("--methods", nargs="+", default=["uniform", "parameters", "time", "auto"])
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=8)
    add_run_args(parser, steps=1, warmup=1, vocab=32768)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for each spawned run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/partition.jsonl"))
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    s = Settings(tuple(args.methods), args.schedule, args.microbatches, args.steps, args.repeats, args.warmup,
                 args.batch, args.seq_len, args.n_layer, args.n_embd, args.n_head, args.vocab, args.lr, args.seed)
    meta = bench_meta("partition", asdict(s))
    start = time.perf_counter()
    for stages in args.stages:
        t0 = time.perf_counter()
        records = spawn(worker, stages, args=(s,), timeout=args.timeout, threads=1)[0]
        assert records is not None
        summaries = summarise(records)
        print_table(summaries, s)
        elapsed = time.perf_counter() - t0
        print(f"{stages} stages: wall time {elapsed:.0f} s", flush=True)
        write_jsonl(args.out, meta, records, [])
        write_jsonl(args.out, {**meta, "wall_s": elapsed}, [], summaries)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; appended to {args.out}")


if __name__ == "__main__":
    main()
