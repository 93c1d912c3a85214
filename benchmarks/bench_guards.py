"""What the per-step guards cost (`stagewise.runtime.guards`): the batch agreement check across processes, the
non-finite records around each action, the non-finite check at the step, and the launcher's status writes.

The benchmark GPT of `_common` (10 layers: embedding, 8 GPT-2 blocks, head; n_embd 256, vocabulary 8192;
a batch of 16 x 128 tokens; Adam) on 2 gloo processes with 1 intra-op thread each, 1f1b, with
`STAGEWISE_STATUS_DIR` set as `stagewise run` sets it. Two measures:

* Time inside the guards: every guard entry point is wrapped by a timer; per step, the seconds spent
  in them on each rank, against the step's wall time (rank 0). This one is exact and does not
  depend on the noise of a shared machine.
* A/B: the same pipeline with the guards switched off (their entry points made no-ops), rounds
  alternating on and off; the median step time of each. On a busy machine the spread of the steps
  is far larger than the difference, so this is only a sanity check of the first measure.

    PYTHONPATH=. python benchmarks/bench_guards.py [--steps 4 --repeats 3 --microbatches 4 8]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _common import add_run_args, bench_meta, build_layers, lm_loss, make_batch

from stagewise import Pipeline, spawn
from stagewise.runtime import guards

WORLD = 2
ENTRY = [(guards.BatchCheck, "fields"), (guards.BatchCheck, "agree"), (guards.RankWatch, "begin"),
         (guards.RankWatch, "end"), (guards.NonFiniteGuard, "__call__")]


def _instrument(spent: dict[str, float], enabled: list[bool]) -> None:
    """Wrap every guard entry point: time it when enabled, skip it (a no-op) when not."""
    for cls, name in ENTRY:
        real = getattr(cls, name)

        def wrapper(*args: Any, _real: Any = real, _key: str = f"{cls.__name__}.{name}") -> Any:
            if not enabled[0]:
                return None
            t0 = time.perf_counter()
            try:
                return _real(*args)
            finally:
                spent[_key] = spent.get(_key, 0.0) + time.perf_counter() - t0

        setattr(cls, name, wrapper)


def worker(rank: int, world: int, args: argparse.Namespace, status_dir: str) -> dict[str, Any]:
    os.environ["STAGEWISE_STATUS_DIR"] = status_dir
    torch.set_num_threads(1)
    spent: dict[str, float] = {}
    enabled = [True]
    _instrument(spent, enabled)
    batch = make_batch(args)
    out: dict[str, Any] = {}
    for m in args.microbatches:
        pipe = Pipeline(build_layers(args), lm_loss, schedule="1f1b", microbatches=m, timeout=600.0,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=args.lr), show_partition=False)
        for _ in range(args.warmup):
            pipe.train_step(batch)
        rounds: list[dict[str, Any]] = []
        for r in range(args.repeats):
            for on in (True, False) if r % 2 == 0 else (False, True):
                enabled[0] = on
                spent.clear()
                times = []
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    pipe.train_step(batch)
                    times.append(time.perf_counter() - t0)
                rounds.append({"on": on, "step_s": times, "guard_s": dict(spent)})
        enabled[0] = True
        pipe.close()
        out[f"1f1b m={m}"] = rounds
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--microbatches", nargs="+", type=int, default=[4, 8])
    add_run_args(parser, steps=4, warmup=2, vocab=8192)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/guards.jsonl"))
    args = parser.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="stagewise-status-") as status_dir:
        results = spawn(worker, WORLD, args=(args, status_dir), timeout=3600, threads=1)
    summaries = []
    print(f"\n{args.n_layer + 2}-layer GPT (n_embd {args.n_embd}, vocab {args.vocab}), batch {args.batch} x "
          f"{args.seq_len}, {WORLD} gloo ranks x 1 thread, {args.repeats} rounds x {args.steps} steps per setting")
    print(f"{'configuration':<12} {'step s (on)':<12} {'step s (off)':<12} {'on/off':<7} "
          f"{'guards ms/step r0/r1':<22} {'guards % of step r0/r1':<24} by part (rank 0, ms/step)")
    for config in results[0]:
        on = [t for rd in results[0][config] if rd["on"] for t in rd["step_s"]]
        off = [t for rd in results[0][config] if not rd["on"] for t in rd["step_s"]]
        per_rank = []
        for res in results:
            rounds = [rd for rd in res[config] if rd["on"]]
            per_rank.append(sum(sum(rd["guard_s"].values()) for rd in rounds) / (args.steps * len(rounds)))
        parts: dict[str, float] = {}
        for rd in (rd for rd in results[0][config] if rd["on"]):
            for k, v in rd["guard_s"].items():
                parts[k] = parts.get(k, 0.0) + v / (args.steps * sum(x["on"] for x in results[0][config]))
        step = statistics.median(on)
        summary = {"config": config, "step_on_s": statistics.median(on), "step_off_s": statistics.median(off),
                   "guard_s_per_step": per_rank, "guard_fraction": [g / step for g in per_rank], "parts_s": parts}
        summaries.append(summary)
        print(f"{config:<12} {statistics.median(on):<12.3f} {statistics.median(off):<12.3f} "
              f"{statistics.median(on) / statistics.median(off):<7.3f} "
              f"{'/'.join(f'{1e3 * g:.2f}' for g in per_rank):<22} "
              f"{'/'.join(f'{100 * g / step:.2f}%' for g in per_rank):<24} "
              + ", ".join(f"{k} {1e3 * v:.2f}" for k, v in sorted(parts.items())))
    print(f"\nwall time {time.perf_counter() - t0:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with args.out.open("a") as fh:
        meta = bench_meta("guards", {k: v for k, v in vars(args).items() if k != "out"})
        for s in summaries:
            fh.write(json.dumps({**meta, "kind": "summary", **s}, default=str) + "\n")
    print(f"wrote {len(summaries)} lines to {args.out}")


if __name__ == "__main__":
    main()
