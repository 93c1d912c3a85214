"""GPipe's training step on CPU partitions against the same model unpipelined, in one process.

What it measures, all in one run with one intra-op thread (`torch.set_num_threads(1)`):

* A small GPT (embedding, `--n-layer` GPT-2 blocks, untied head) as an `nn.Sequential`, on a fixed batch
  of random token ids. A step is forward + loss (`lm_loss`) + backward; no optimizer step.
* The plain module: `model(x)`, the loss, `loss.backward()` on the calling thread.
* `stagewise.GPipe` on 2 and 4 CPU partitions (balance: the layers split as evenly as their count allows),
  with chunks 4 and 8 and checkpoint "except_last" (GPipe's default): the same step through the pipeline.

Configurations alternate round-robin over `--repeats` rounds, each timing `--steps` steps after
`--warmup` untimed ones in the first round; a round's value is its median step. The ratio GPipe / plain
is taken per round (both measured within the same round) and reported as median [min-max] over rounds,
so that load from elsewhere on the machine cancels as far as it can.

    PYTHONPATH=. python benchmarks/bench_gpipe.py [--steps 5 --repeats 5] [--out runs/bench/gpipe.jsonl]

Every round (kind "round": one configuration's median step in one round) and a summary per configuration
(kind "summary") are appended to the JSON lines file `--out`, with the machine, the settings, the date and the
load (`_common.bench_meta`); docs/benchmarks.md is generated from such lines (`benchmarks/pages.py`).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import stagewise
from stagewise.models import config, gpt2_layers, lm_loss
from stagewise.runtime.host_memory import keep_freed_host_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import bench_meta, write_jsonl  # noqa: E402


def build(args: argparse.Namespace) -> list[nn.Module]:
    torch.manual_seed(args.seed)
    cfg = config("gpt2-mini", n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_head, vocab_size=args.vocab,
                 n_positions=args.seq_len, tie_word_embeddings=False)
    return gpt2_layers(cfg)


def spread(values: Sequence[float], spec: str) -> str:
    """Median [min-max]."""
    return f"{statistics.median(values):{spec}} [{min(values):{spec}}-{max(values):{spec}}]"


def even(layers: int, parts: int) -> list[int]:
    base, extra = divmod(layers, parts)
    return [base + (1 if j < extra else 0) for j in range(parts)]


def step_of(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> Any:
    def step() -> None:
        model.zero_grad(set_to_none=True)
        lm_loss(model(batch[0]), batch[1]).backward()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=5, help="timed steps per configuration and round")
    parser.add_argument("--repeats", type=int, default=5, help="rounds over all configurations")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per configuration before round 1")
    parser.add_argument("--partitions", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--chunks", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=6)
    parser.add_argument("--n-embd", type=int, default=128)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=2048)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/gpipe.jsonl"),
                        help="append the results here as JSON lines")
    args = parser.parse_args()
    if args.steps < 1 or args.repeats < 1 or args.warmup < 0:
        parser.error("--steps and --repeats must be >= 1, --warmup >= 0")

    torch.set_num_threads(1)
    keep_freed_host_memory()  # what GPipe sets for CPU partitions: the plain module gets it too
    gen = torch.Generator().manual_seed(args.seed + 1)
    batch = (torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen),
             torch.randint(0, args.vocab, (args.batch, args.seq_len), generator=gen))
    steps: dict[str, Any] = {"plain": step_of(nn.Sequential(*build(args)), batch)}
    shape: dict[str, dict[str, Any]] = {"plain": {"partitions": 1, "chunks": 1, "balance": [len(build(args))]}}
    layers = len(build(args))
    for p in args.partitions:
        for m in args.chunks:
            model = stagewise.GPipe(nn.Sequential(*build(args)), even(layers, p), devices=["cpu"] * p, chunks=m,
                                    show_partition=False)
            steps[f"gpipe P={p} chunks={m}"] = step_of(model, batch)
            shape[f"gpipe P={p} chunks={m}"] = {"partitions": p, "chunks": m, "balance": even(layers, p),
                                                "checkpoint": "except_last"}
    start = time.perf_counter()
    for fn in steps.values():
        for _ in range(args.warmup):
            fn()
    rounds: dict[str, list[float]] = {name: [] for name in steps}
    records = []
    for k in range(args.repeats):
        for name, fn in steps.items():
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                fn()
                times.append(time.perf_counter() - t0)
            rounds[name].append(statistics.median(times))
            records.append({"config": name, "round": k, "step_times_s": times, "step_s": rounds[name][-1]})
    elapsed = time.perf_counter() - start
    plain = rounds["plain"]
    print(f"GPT: {args.n_layer} blocks, n_embd {args.n_embd}, vocab {args.vocab}, batch {args.batch} x "
          f"{args.seq_len}; 1 intra-op thread; median [min-max] over {args.repeats} rounds of {args.steps} steps")
    print(f"{'configuration':<24} {'step (ms)':>24} {'/ plain (same round)':>26}")
    summary = []
    for name, values in rounds.items():
        ratios = [v / b for v, b in zip(values, plain)]
        print(f"{name:<24} {spread([v * 1e3 for v in values], '.1f'):>24} {spread(ratios, '.3f'):>26}")
        summary.append({"config": name, **shape[name], "step_s": values, "ratio_to_plain": ratios,
                        "median_step_s": statistics.median(values), "median_ratio": statistics.median(ratios)})
    settings = {k: v for k, v in vars(args).items() if k != "out"}
    n = write_jsonl(args.out, {**bench_meta("gpipe", {**settings, "threads": 1}), "wall_s": elapsed}, records,
                    summary)
    print(f"appended {n} lines to {args.out}")


if __name__ == "__main__":
    main()
