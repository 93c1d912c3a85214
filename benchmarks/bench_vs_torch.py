"""stagewise against torch.distributed.pipelining: the same model, weights, batch, partition and threads.

For each pipeline size P (one process per device, one intra-op thread each, gloo, started with
`spawn`) the SAME spawned processes build, per configuration (schedule, m):

* a stagewise `Pipeline` with an explicit balance (stagewise's "uniform" cut, which is what both
  libraries get), and
* a torch.distributed.pipelining pipeline with that balance: one manual `PipelineStage` per stage
  over the same layers (fresh copies with the same initial weights), on the same stage-to-device
  placement, under the matching schedule class: gpipe -> ScheduleGPipe, 1f1b -> Schedule1F1B,
  interleaved -> ScheduleInterleaved1F1B (2 stages per rank, looped), zbv -> ScheduleZBVZeroBubble
  (2 stages per rank in a V). Losses are micro-batch means and torch scales the gradients by 1/m
  (`scale_grads=True`), which is stagewise's weighting for equal micro-batches.

Both train with Adam on one fixed batch of 16 x 128 random token ids (fixed seed) of a GPT
(embedding, 8 GPT-2 blocks of d256 with 4 heads, head with an 8k vocabulary; the head is NOT tied
to the embedding by default, since torch.distributed.pipelining has no cross-stage ties; `--tie`
ties it for stagewise only and skips torch).

Checks and measurements:

* Every process runs under the malloc settings a stagewise `Pipeline` sets on CPU (process-wide, see
  `stagewise.runtime.host_memory`): torch's pipeline and the single process too, so they compare fairly.
* The first step of every pipeline runs from the initial weights: its loss is printed for both
  libraries and the single-process model and must agree within 1e-5 (relative, float32).
* Timing alternates the libraries (A B A B, the order swapped every round) over `--repeats` rounds;
  each timed block is `--block-warmup` untimed steps, then `--steps` consecutive training steps
  followed by a barrier, timed on rank 0, so a step is the block time / steps with every rank done.
  The untimed steps measure the steady state a training run lives in: the first step after
  switching pipelines re-touches memory the other pipeline used and was up to 1.7x slower, for
  either library, which no training run pays. Tokens/s is median [min-max] over
  rounds; the stagewise/torch ratio is taken within each round, and best/best is the ratio of the
  fastest rounds (robust to a slow round on a shared machine). The single-process baseline (rank 0,
  1 thread, nn.Sequential + Adam, the other ranks idle in a barrier) runs `--repeats` steps before the
  rounds (run inside them, the block right after it was often much slower, whichever library it was).
* Efficiency (stagewise): the last traced step against the simulator's ideal from that step's
  measured per-stage F, B (I, W) means and the mean optimizer STEP; measured against simulated
  bubble per device; measured peak saved-activation bytes per device (from the forwards'
  `saved_bytes`) against the prediction `peak_inflight` x saved bytes per micro-batch, and against
  the simulated timeline swept with each (stage, micro-batch)'s measured bytes.
* With `--planner`, the planner's choice (`Pipeline(schedule="auto", microbatches="auto", partition="auto")`:
  schedule, m, virtual_stages and balance chosen together from one profile, built once per P and kept) runs in the
  rotation of every configuration, so that it alternates with each of torch's; it is compared with torch's
  best configuration on the even split (ratios within that configuration's rounds, median [min-max]). With
  `--single-threads 2` a single process with 2 intra-op threads (rank 0; the other ranks wait) runs in
  every rotation too, the baseline for "2 ranks x 1 thread against 1 process x 2 threads". `--no-even`
  skips stagewise on the even split (the parity rows).
* Unless `--no-auto`, stagewise also runs each schedule with `partition="auto"` (it measures the
  layers on `sample=`); the best of those per (P, m) is compared with torch's best schedule on the
  even split and with torch's same schedule on the even split (ratios within each round, then the
  median). P ranks of one thread on C cores can at most reach min(P, C) x the single process: that
  bound is printed next to them.

Output: the tables, JSON lines (`--out`, one line per round and per summary) and a PNG chart of
tokens/s per configuration (`--png`).

Run (about 8 minutes with the defaults on two cores; P=4 runs 4 processes on 2 cores, so it is
slower and noisier and runs fewer configurations by default):

    PYTHONPATH=. python benchmarks/bench_vs_torch.py [--stages 2 4] [--schedules gpipe 1f1b interleaved zbv]
        [--microbatches 4 8] [--p4-microbatches 8] [--steps 2 --repeats 3 --warmup 2 --block-warmup 1]
        [--no-auto]
    stagewise bench [same options]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # _common and the vs_torch_* modules live next to this file

from vs_torch_pipes import TORCH_SCHEDULES, Settings  # noqa: E402
from vs_torch_report import draw_chart, print_planner, print_tables, summarise  # noqa: E402
from vs_torch_rounds import worker  # noqa: E402

# torch and stagewise are imported inside the functions so that `stagewise --help` stays fast.

LOSS_RTOL = 1e-5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The benchmark's options (also `stagewise bench`'s)."""
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4], help="pipeline sizes P (one rank each)")
    parser.add_argument("--schedules", nargs="+", default=list(TORCH_SCHEDULES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[4, 8], help="m for P < 4")
    parser.add_argument("--p4-microbatches", nargs="+", type=int, default=[8],
                        help="m for P >= 4 (4 processes on 2 cores are slow: fewer configurations)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (alternating the libraries)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per pipeline, the loss check included")
    parser.add_argument("--block-warmup", type=int, default=1,
                        help="untimed steps before every timed block (the first step after switching pipelines is "
                             "slow for either library)")
    parser.add_argument("--no-auto", dest="auto", action="store_false", help="skip stagewise partition=auto")
    parser.add_argument("--planner", action="store_true",
                        help="also run the planner's choice (schedule, m, balance) in every configuration's rotation")
    parser.add_argument("--no-even", dest="even", action="store_false",
                        help="skip stagewise on the even split (the parity rows)")
    parser.add_argument("--single-threads", dest="single_threads", type=int, default=0,
                        help="also run one process with this many threads in every rotation (e.g. 2)")
    parser.add_argument("--tie", action="store_true", help="tie embedding and head (stagewise only; no torch)")
    parser.add_argument("--compile", action="store_true",
                        help="also run stagewise with compiled stages (Pipeline(compile=True)) on the even split, and "
                             "print the compiled / uncompiled step-time ratio")
    from _common import add_model_args

    add_model_args(parser, vocab=8192)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for each spawned run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/vs_torch.jsonl"))
    parser.add_argument("--png", type=Path, default=Path("runs/bench/vs_torch.png"))


def print_compiled(P: int, records: list[dict[str, Any]]) -> None:
    """Compiled against uncompiled stages: the step-time ratio within each round (neighbouring blocks), median
    [min-max] over the rounds."""
    step = {(r["config"], r["round"]): r["step_s"] for r in records if r["library"] == "stagewise"}
    for (config, rnd) in sorted(k for k in step if k[0].endswith(" compiled")):
        if rnd:
            continue
        plain = config[: -len(" compiled")]
        ratios = [step[(config, r)] / step[(plain, r)] for c, r in step if c == config and (plain, r) in step]
        if ratios:
            print(f"P={P} {plain}: compiled / uncompiled step time {statistics.median(ratios):.3f} "
                  f"[{min(ratios):.3f}-{max(ratios):.3f}] over {len(ratios)} rounds", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run every pipeline size, print the tables and goals, write the JSON lines and the chart; 1 if the first
    losses disagree."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--steps, --repeats and --warmup must be >= 1 (the first step checks the loss)")
    if args.block_warmup < 0:
        parser.error("--block-warmup must be >= 0")
    from _common import bench_meta, write_jsonl

    from stagewise.runtime.launch import spawn

    start = time.perf_counter()
    all_summaries: dict[int, list[dict[str, Any]]] = {}
    all_goals = []
    failures = []
    for P in args.stages:
        ms = args.microbatches if P < 4 else args.p4_microbatches
        s = Settings(tuple((sc, m) for sc in args.schedules for m in ms), args.auto, not args.tie, args.planner,
                     args.even, args.single_threads, args.steps,
                     args.repeats, args.warmup, args.block_warmup, args.batch, args.seq_len, args.n_layer,
                     args.n_embd, args.n_head, args.vocab, args.lr, args.seed, args.tie, args.timeout, args.compile)
        t0 = time.perf_counter()
        result = spawn(worker, P, args=(s,), timeout=args.timeout, threads=1)[0]
        summaries = summarise(result["records"], s.batch * s.seq_len)
        all_summaries[P] = summaries
        goals = print_tables(P, result, summaries, s)
        goals["planner"] = print_planner(P, result, summaries, s)
        all_goals.append(goals)
        ref = result["first_loss"]["single"]["single"]
        for name, losses in result["first_loss"].items():
            for lib, value in losses.items():
                if abs(value - ref) > LOSS_RTOL * abs(ref):
                    failures.append(f"P={P} {name} {lib}: first loss {value:.8f} vs single {ref:.8f}")
        if s.compile:
            print_compiled(P, result["records"])
        elapsed = time.perf_counter() - t0
        print(f"P={P}: wall time {elapsed:.0f} s", flush=True)
        meta = bench_meta("vs_torch", asdict(s))
        write_jsonl(args.out, meta, result["records"], summaries, stages=P, wall_s=elapsed,
                    first_loss=result["first_loss"])
    print("\n== goals")
    for g in all_goals:
        P = g["P"]
        if g["parity"]:
            worst = min(g["parity"], key=lambda t: t[1])
            ok = sum(v >= 0.99 for _, v, _ in g["parity"])
            ok_best = sum(b >= 0.99 for _, _, b in g["parity"])
            print(f"P={P} parity (stagewise/torch >= 0.99, even split): {ok}/{len(g['parity'])} configurations by the "
                  f"median ratio ({ok_best} by best/best); lowest {worst[1]:.3f} ({worst[0]}); median of the medians "
                  f"{statistics.median(v for _, v, _ in g['parity']):.3f}")
        eff = [(n, v) for n, v in g["efficiency"] if not n.endswith("auto")]
        if eff:
            ok = sum(v <= 1.03 for _, v in eff)
            worst = max(eff, key=lambda t: t[1])
            print(f"P={P} efficiency (measured step within 3% of the simulated ideal): {ok}/{len(eff)}; "
                  f"highest measured/ideal {worst[1]:.3f} ({worst[0]})")
        if g.get("planner"):
            x = g["planner"]
            print(f"P={P} the planner's choice ({x['choice']}) vs torch's best on the even split ({x['torch_best']}): "
                  f"{x['ratio']:.3f}x" + (f" (goal 1.15x: {'reached' if x['ratio'] >= 1.15 else 'not reached'})"
                                           if P == 2 else "")
                  + (f"; vs one process x {x['threads']} threads: {x['vs_single']:.3f}x (goal 1.15x)"
                     if x.get("vs_single") else ""))
        if g["auto"]:
            target = 1.1 if P == 2 else 1.3
            for m, a, t, ratio, same, of_bound in g["auto"]:
                same_txt = f"; vs torch's {a.split()[0]} on the even split {same:.3f}x" if same is not None else ""
                print(f"P={P} m={m} auto (best: {a}) vs torch even (best: {t}): {ratio:.3f}x, goal {target}x "
                      f"{'reached' if ratio >= target else 'not reached'}{same_txt}; stagewise at {of_bound:.0%} of "
                      "the cores' bound")
    draw_chart(all_summaries, args.png)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; appended to {args.out}; chart {args.png}")
    if failures:
        print(f"FAILED: first-step losses differ by more than {LOSS_RTOL:g} (relative):\n" + "\n".join(failures),
              file=sys.stderr)
        return 1
    print(f"first-step losses agree within {LOSS_RTOL:g} (relative) for every pipeline and the single process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
