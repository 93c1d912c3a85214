"""Asynchronous vs flushing schedules: throughput and what the model learns from the same samples.

Run: `python benchmarks/bench_async.py [--steps 40 --microbatches 4]`. Two ranks with one
thread each train the same small GPT (same initial weights, same batches of the built-in
corpus) with gpipe, 1f1b, pipedream and 2bw, alternating the schedules over `--repeats`
rounds; prints tokens/s (median, min-max) relative to 1f1b and the mean loss of the last
steps, and appends JSON lines to `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

SCHEDULES = ["gpipe", "1f1b", "pipedream", "2bw"]


def worker(rank: int, world: int, schedule: str, steps: int, m: int, lr: float) -> dict:
    import torch

    from stagewise import Pipeline
    from stagewise.data import LengthSortedBatches, builtin_corpus, cache_root, pad_id, token_windows, train_bpe
    from stagewise.models import config, gpt2_layers, lm_loss

    texts = builtin_corpus()
    tok = train_bpe(texts, vocab_size=8192)
    windows = token_windows(texts, tok, 128, cache_dir=cache_root() / "tokens")
    batches = LengthSortedBatches(windows, 16, pad_id(tok), seed=0, drop_last=True)
    data = [b for _, b in zip(range(steps), batches)]
    torch.manual_seed(0)
    layers = gpt2_layers(config("gpt2-tiny", vocab_size=tok.get_vocab_size(), tie_word_embeddings=False))
    pipe = Pipeline(layers, lm_loss, schedule=schedule, microbatches=m,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=lr), timeout=120)
    start = time.perf_counter()
    losses = pipe.train(iter(data), steps=steps)
    took = time.perf_counter() - start
    tokens = sum(int((labels != -100).sum()) for _, labels in data)
    return {"tokens_per_s": tokens / took, "losses": losses, "seconds": took}


def main() -> None:
    from _common import bench_meta

    from stagewise import spawn

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/bench/async.jsonl")
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {s: [] for s in SCHEDULES}
    for r in range(args.repeats):
        for s in SCHEDULES:  # alternate: A B C D A B C D ...
            res = spawn(worker, 2, args=(s, args.steps, args.microbatches, args.lr), timeout=900)[0]
            runs[s].append(res)
            print(f"round {r} {s:<10} {res['tokens_per_s']:8.0f} tokens/s", flush=True)
    base = statistics.median(x["tokens_per_s"] for x in runs["1f1b"])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    print(f"\n2 ranks x 1 thread, gpt2-tiny, batch 16 x 128, m={args.microbatches}, {args.steps} steps, "
          f"Adam lr {args.lr}")
    print(f"{'schedule':<10} {'tokens/s (median, min-max)':>28} {'vs 1f1b':>8} {'first loss':>11} "
          f"{'last-5 loss':>12}")
    meta = bench_meta("async", {k: v for k, v in vars(args).items() if k != "out"})
    with open(args.out, "a") as f:
        for s in SCHEDULES:
            tps = [x["tokens_per_s"] for x in runs[s]]
            losses = runs[s][0]["losses"]
            last = sum(losses[-5:]) / len(losses[-5:])
            med = statistics.median(tps)
            print(f"{s:<10} {med:>10.0f} ({min(tps):.0f}-{max(tps):.0f}) {med / base:>12.2f}x "
                  f"{losses[0]:>11.3f} {last:>12.3f}")
            f.write(json.dumps({**meta, "kind": "summary", "schedule": s, "tokens_per_s": tps, "losses": losses,
                                "microbatches": args.microbatches, "steps": args.steps}) + "\n")


if __name__ == "__main__":
    main()
