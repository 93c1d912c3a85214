"""How good is the planner's choice? Its top candidates measured against each other, in one run.

For each model (gpt2-tiny, tied, and the benchmark GPT of `bench_vs_torch.py`, untied) and pipeline size P
(one process per device, one intra-op thread each, gloo, started with `spawn`), the planner profiles the
model and searches (`Pipeline(schedule="auto", microbatches="auto", partition="auto")`, profile included in
the build time); then its top `--top` candidates are built as explicit pipelines in the same processes and
timed in alternation (A B C D E, the order reversed every round; `--block-warmup` untimed steps before each
timed block of `--steps`). Reported per candidate: predicted step, measured step (median [min-max] over
rounds), predicted and measured rank; and the measured gap between the planner's choice and the candidate
that measured fastest (the target: within 3%).

    PYTHONPATH=. python benchmarks/bench_planner.py [--models gpt2-tiny bench-gpt] [--stages 2 4]
        [--top 5] [--steps 2 --repeats 3 --block-warmup 1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

MODELS = {  # name -> (n_layer, n_embd, n_head, vocab, tie)
    "gpt2-tiny": (4, 128, 4, 8192, True),
    "bench-gpt": (8, 256, 4, 8192, False),
}


@dataclass(frozen=True)
class Settings:
    model: str
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    tie: bool
    batch: int
    seq_len: int
    seed: int
    lr: float
    top: int
    steps: int
    repeats: int
    block_warmup: int
    runs: int
    timeout: float


def worker(rank: int, world: int, s: Settings) -> dict[str, Any] | None:
    import torch
    import torch.distributed as dist
    from _common import build_layers, lm_loss, make_batch

    from stagewise.pipeline import Pipeline

    torch.set_num_threads(1)
    batch = make_batch(s)

    def adam(params: list) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=s.lr)

    t0 = time.perf_counter()
    first = Pipeline(build_layers(s), lm_loss, schedule="auto", microbatches="auto", partition="auto", sample=batch,
                     optimizer=adam, timeout=s.timeout, show_partition=False,
                     planner={"top": s.top, "runs": s.runs})
    build_s = time.perf_counter() - t0
    plan = first.plan
    pipes = []
    for c in plan.candidates[:s.top]:
        if c == plan.choice:
            pipes.append(first)
            continue
        schedule, m, virtual_stages, balance, mode = c.settings()
        pipes.append(Pipeline(build_layers(s), lm_loss, schedule=schedule, microbatches=m,
                              virtual_stages=virtual_stages,
                              partition=balance, recompute=mode, optimizer=adam, timeout=s.timeout,
                              show_partition=False))
    if plan.choice not in plan.candidates[:s.top]:
        pipes.append(first)
    for p in pipes:  # the first step of each, untimed
        p.train_step(batch)
    times: dict[int, list[float]] = {k: [] for k in range(len(pipes))}
    order = list(range(len(pipes)))
    for r in range(s.repeats):
        for k in (order if r % 2 == 0 else order[::-1]):
            for _ in range(s.block_warmup):
                pipes[k].train_step(batch)
            dist.barrier()
            t = time.perf_counter()
            for _ in range(s.steps):
                pipes[k].train_step(batch)
            dist.barrier()
            times[k].append((time.perf_counter() - t) / s.steps)
    for p in pipes:
        p.close()
    if rank != 0:
        return None
    shown = list(plan.candidates[:s.top]) + ([plan.choice] if plan.choice not in plan.candidates[:s.top] else [])
    return {"plan": plan.to_dict(), "build_s": build_s,
            "rows": [{"candidate": c.to_dict(), "measured_s": times[k]} for k, c in enumerate(shown)]}


def report(P: int, s: Settings, result: dict[str, Any]) -> dict[str, Any]:
    med = statistics.median
    rows = result["rows"]
    plan = result["plan"]
    tokens = s.batch * s.seq_len
    measured = [med(r["measured_s"]) for r in rows]
    predicted = [r["candidate"]["step_s"] for r in rows]
    mrank = {k: i + 1 for i, k in enumerate(sorted(range(len(rows)), key=lambda k: measured[k]))}
    prank = {k: i + 1 for i, k in enumerate(sorted(range(len(rows)), key=lambda k: predicted[k]))}
    chosen = next(k for k, r in enumerate(rows) if r["candidate"] == plan["choice"])
    best = min(range(len(rows)), key=lambda k: measured[k])
    gap = measured[chosen] / measured[best] - 1
    print(f"\n== {s.model} P={P} (batch {s.batch} x {s.seq_len}; {s.repeats} rounds x {s.steps} steps; plan built in "
          f"{result['build_s']:.1f} s with the profile; noise {plan['stats'].get('noise_measured', 0):.1%}, tie band "
          f"{plan['noise']:.1%})")
    print(f"{'':2}{'candidate':<34} {'balance':<18} {'predicted':<10} {'pred rank':<9} "
          f"{'measured s, median [min-max]':<30} {'meas rank':<9} {'tokens/s':<8} {'meas/pred':<9}")
    for k, r in enumerate(rows):
        c = r["candidate"]
        v = c["virtual_stages"]
        label = f"{c['schedule']}{' v=' + str(v) if v > 1 else ''} m={c['microbatches']}" + (
            f" recompute={c['recompute']}" if c["recompute"] != "never" else "")
        ms = r["measured_s"]
        print(f"{'*' if k == chosen else '':2}{label:<34} {','.join(map(str, c['balance'])):<18} "
              f"{predicted[k]:<10.3f} {prank[k]:<9} {f'{measured[k]:.3f} [{min(ms):.3f}-{max(ms):.3f}]':<30} "
              f"{mrank[k]:<9} {tokens / measured[k]:<8.0f} {measured[k] / predicted[k]:<9.2f}")
    print(f"chosen (*) vs the measured best ({rows[best]['candidate']['schedule']} m="
          f"{rows[best]['candidate']['microbatches']}): {gap:+.1%}; {'within' if gap <= 0.03 else 'outside'} 3%")
    return {"model": s.model, "P": P, "gap": gap, "predicted": predicted, "measured": measured,
            "measured_rounds": [r["measured_s"] for r in rows], "labels": [r["candidate"] for r in rows],
            "chosen": chosen, "best": best, "build_s": result["build_s"], "noise": plan["stats"].get("noise_measured")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--top", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-warmup", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3, help="profile runs (the noise estimate)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--timeout", type=float, default=1800.0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/planner.jsonl"))
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import bench_meta

    from stagewise.runtime.launch import spawn

    results = []
    start = time.perf_counter()
    for name in args.models:
        n_layer, n_embd, n_head, vocab, tie = MODELS[name]
        s = Settings(name, n_layer, n_embd, n_head, vocab, tie, args.batch, args.seq_len, 0, 1e-4, args.top,
                     args.steps, args.repeats, args.block_warmup, args.runs, args.timeout)
        for P in args.stages:
            t0 = time.perf_counter()
            result = spawn(worker, P, args=(s,), timeout=args.timeout, threads=1)[0]
            results.append(report(P, s, result))
            print(f"wall time {time.perf_counter() - t0:.0f} s", flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            with args.out.open("a") as fh:
                fh.write(json.dumps({**bench_meta("planner", asdict(s)), **results[-1], "plan": result["plan"]},
                                    default=str) + "\n")
    print("\n== summary: the planner's choice against the measured best of its top candidates")
    for r in results:
        print(f"{r['model']:<10} P={r['P']}: gap {r['gap']:+.1%}")
    print(f"total wall time {time.perf_counter() - start:.0f} s; appended to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
