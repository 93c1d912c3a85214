"""The runtime's benchmark: pipelined training throughput on CPU, and how far it is from the simulator's ideal.

What it measures, all in one run (two processes, one intra-op thread each, started with `spawn`):

* A 10-layer GPT (embedding, 8 GPT-2 blocks, head; n_embd 256, 4 heads, vocabulary 8192, tied
  embedding/head) trained on one fixed batch of 16 x 128 random token ids with Adam.
* The single-process baseline: `nn.Sequential` forward + backward + Adam step on the same model and
  batch, with 1 intra-op thread and, for reference, 2. It runs on rank 0 while rank 1 waits in a
  (blocking, idle) barrier, so it has the machine to itself like the pipeline does. The 2-thread
  number suffers most from anything else running on the machine (its threads meet at every op).
* The pipeline (`Pipeline`, 2 stages, partition "uniform" by default) under 1f1b and gpipe with
  m = 4 and 8 micro-batches: steady-state step time (time on rank 0 between `train_step` calls; every
  step ends with a broadcast of the loss, so both ranks are done) and tokens/s, and the ratio
  pipeline / single measured within the same round.
* The simulator's ideal: from the measured timeline of the last timed step of a round, the per-stage
  mean F and B compute durations (they exclude the time spent waiting for a peer) are fed to
  `simulate(schedule, Costs(f, b))`. It prints the ideal makespan, the measured step and
  measured / ideal (the number to push towards 1), plus the bubble fraction per device, measured
  (1 - F and B compute time / wall time of that step) against simulated. Diagnostics for the gap: the
  time each device waited for its peer, the STEP action (tied-weight all-reduce + Adam), the step's
  wall time outside the traced actions, and "work", the F + B compute of all devices together
  divided by the single-process 1-thread step (above 1 when small micro-batches or two processes
  sharing the cores make the computation itself slower).

Configurations alternate round-robin (A B C ... A B C ...) over `--repeats` rounds, each round timing
`--steps` steps per configuration after `--warmup` untimed steps at the start; per-round values are the
median step, and the table shows the median over rounds with [min-max].

Run (about two minutes with the defaults on two otherwise idle cores):

    PYTHONPATH=. python benchmarks/bench_runtime.py [--steps 2 --repeats 3 --warmup 2]
        [--partitions uniform auto] [--out runs/bench/runtime.jsonl]

Every round and a summary per configuration go to the JSON lines file `--out`.
"""

from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from _common import (
    SingleProcess,
    add_run_args,
    analyse,
    bench_meta,
    build_layers,
    lm_loss,
    make_batch,
    spread,
    timed,
    write_jsonl,
)
from torch import nn

from stagewise.pipeline import Pipeline
from stagewise.runtime.launch import spawn

WORLD = 2
SINGLE = {"single 1 thread": 1, "single 2 threads": 2}


@dataclass(frozen=True)
class Settings:
    """Everything the worker processes need (picklable)."""

    schedules: tuple[str, ...]
    microbatches: tuple[int, ...]
    partitions: tuple[str, ...]
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

    def pipeline_configs(self) -> list[tuple[str, str, int, str]]:
        """(name, schedule, microbatches, partition) for every pipeline configuration."""
        return [(f"{sc} m={m} {part}", sc, m, part)
                for part in self.partitions for sc in self.schedules for m in self.microbatches]


def worker(rank: int, world: int, s: Settings) -> list[dict[str, Any]] | None:
    """Every configuration, alternating round-robin; rank 0 returns one record per (configuration, round)."""
    torch.set_num_threads(1)
    batch = make_batch(s)

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=s.lr)

    pipes: dict[str, Pipeline] = {}
    for name, sc, m, part in s.pipeline_configs():
        pipes[name] = Pipeline(build_layers(s), lm_loss, schedule=sc, microbatches=m, partition=part,
                               optimizer=adam, timeout=600.0, sample=batch)
    single = SingleProcess(s) if rank == 0 else None

    def run(name: str, n: int) -> list[float]:
        if name in SINGLE:
            times: list[float] = []
            if single is not None:
                torch.set_num_threads(SINGLE[name])
                times = timed(lambda: single.step(batch), n)
                torch.set_num_threads(1)
            dist.barrier()
            return times
        pipe = pipes[name]
        return timed(lambda: pipe.train_step(batch), n)

    names = [*SINGLE, *pipes]
    for name in names:
        run(name, s.warmup)
    records: list[dict[str, Any]] = []
    for r in range(s.repeats):
        for name in names:
            times = run(name, s.steps)
            record: dict[str, Any] = {"config": name, "round": r, "step_times_s": times}
            if name in pipes:
                trace = pipes[name].last_trace()  # a collective: every rank calls it
                pipe = pipes[name]
                record.update(schedule=pipe.schedule.name, microbatches=pipe.schedule.microbatches,
                              balance=list(pipe.balance))
                if rank == 0:
                    record.update(analyse(trace, pipe.schedule, times[-1]))
            else:
                record.update(threads=SINGLE[name])
            if rank == 0:
                record["step_s"] = statistics.median(times)
                records.append(record)
    return records if rank == 0 else None


def summarise(records: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """One summary per configuration; ratios are taken within a round, then summarised over rounds."""
    by_round: dict[int, dict[str, dict[str, Any]]] = {}
    for rec in records:
        by_round.setdefault(rec["round"], {})[rec["config"]] = rec
    names = list(dict.fromkeys(rec["config"] for rec in records))
    summaries = []
    for name in names:
        rows = [by_round[r][name] for r in sorted(by_round)]
        steps = [x["step_s"] for x in rows]
        summary: dict[str, Any] = {
            "config": name, "step_s": steps, "tokens_per_s": [tokens / x for x in steps],
            "vs_single_1t": [by_round[x["round"]]["single 1 thread"]["step_s"] / x["step_s"] for x in rows],
            "vs_single_2t": [by_round[x["round"]]["single 2 threads"]["step_s"] / x["step_s"] for x in rows],
        }
        if "ideal_s" in rows[0]:
            P = len(rows[0]["busy_s"])
            summary.update(
                balance=rows[0]["balance"], ideal_s=[x["ideal_s"] for x in rows],
                measured_over_ideal=[x["step_s"] / x["ideal_s"] for x in rows],
                bubble_measured=[[x["bubble_measured"][d] for x in rows] for d in range(P)],
                bubble_simulated=[[x["bubble_simulated"][d] for x in rows] for d in range(P)],
                wait_s=[[x["wait_s"][d] for x in rows] for d in range(P)],
                step_action_s=[max(x["step_action_s"]) for x in rows],
                outside_trace_s=[x["outside_trace_s"] for x in rows],
                work_over_single=[sum(x["busy_s"]) / by_round[x["round"]]["single 1 thread"]["step_s"] for x in rows],
                f_ms=[1e3 * statistics.median(x["f_s"][st] for x in rows) for st in range(len(rows[0]["f_s"]))],
                b_ms=[1e3 * statistics.median(x["b_s"][st] for x in rows) for st in range(len(rows[0]["b_s"]))],
            )
        summaries.append(summary)
    return summaries


def print_tables(summaries: list[dict[str, Any]], s: Settings) -> None:
    tokens = s.batch * s.seq_len
    print(f"\n{s.n_layer + 2}-layer GPT (n_layer={s.n_layer}, n_embd={s.n_embd}, vocab={s.vocab}), "
          f"batch {s.batch} x {s.seq_len} = {tokens} tokens, {WORLD} ranks x 1 thread; {s.repeats} rounds x "
          f"{s.steps} timed steps; median [min-max] over rounds")
    print(f"{'configuration':<24} {'balance':<8} {'step s':<22} {'tokens/s':<20} {'vs 1 thread':<18} "
          f"{'vs 2 threads':<18}")
    for x in summaries:
        bal = str(x.get("balance", "-")).replace(" ", "")
        print(f"{x['config']:<24} {bal:<8} {spread(x['step_s']):<22} {spread(x['tokens_per_s'], '.0f'):<20} "
              f"{spread(x['vs_single_1t'], '.2f'):<18} {spread(x['vs_single_2t'], '.2f'):<18}")
    pipes = [x for x in summaries if "ideal_s" in x]
    print("\nsimulated ideal from the measured per-stage F/B means (last timed step of each round); "
          "bubble = 1 - F/B compute / step wall time")
    print(f"{'configuration':<24} {'F ms/stage':<12} {'B ms/stage':<12} {'ideal s':<7} {'measured s':<10} "
          f"{'measured/ideal':<18} {'bubble meas d0/d1':<18} {'bubble sim d0/d1':<17} {'wait s d0/d1':<13} "
          f"{'STEP s':<7} {'untraced s':<10} {'work/1-thread':<13}")
    for x in pipes:
        med = statistics.median
        f = "/".join(f"{v:.1f}" for v in x["f_ms"])
        b = "/".join(f"{v:.1f}" for v in x["b_ms"])
        meas = "/".join(f"{med(v):.2f}" for v in x["bubble_measured"])
        sim = "/".join(f"{med(v):.2f}" for v in x["bubble_simulated"])
        wait = "/".join(f"{med(v):.2f}" for v in x["wait_s"])
        print(f"{x['config']:<24} {f:<12} {b:<12} {med(x['ideal_s']):<7.3f} {med(x['step_s']):<10.3f} "
              f"{spread(x['measured_over_ideal'], '.2f'):<18} {meas:<18} {sim:<17} {wait:<13} "
              f"{med(x['step_action_s']):<7.3f} {med(x['outside_trace_s']):<10.3f} "
              f"{med(x['work_over_single']):<13.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--schedules", nargs="+", default=["1f1b", "gpipe"])
    parser.add_argument("--microbatches", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--partitions", nargs="+", default=["uniform"], help="e.g. uniform auto")
    add_run_args(parser, steps=2, warmup=2, vocab=8192)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole spawned run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/runtime.jsonl"))
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")
    s = Settings(tuple(args.schedules), tuple(args.microbatches), tuple(args.partitions), args.steps, args.repeats,
                 args.warmup, args.batch, args.seq_len, args.n_layer, args.n_embd, args.n_head, args.vocab, args.lr,
                 args.seed)
    t0 = time.perf_counter()
    records = spawn(worker, WORLD, args=(s,), timeout=args.timeout, threads=1)[0]
    assert records is not None
    summaries = summarise(records, s.batch * s.seq_len)
    print_tables(summaries, s)
    elapsed = time.perf_counter() - t0
    print(f"\nwall time {elapsed:.0f} s")
    n = write_jsonl(args.out, {**bench_meta("runtime", asdict(s)), "wall_s": elapsed}, records, summaries)
    print(f"wrote {n} lines to {args.out}")


if __name__ == "__main__":
    main()
