"""Checkpoint save and load time and size for a GPT-2 on 4 pipeline stages (threads of one process).

For each model: build it (random init), train one step with AdamW (so the optimizer state exists),
then time `save_checkpoint` (every file fsynced, manifest, rename), `load_checkpoint` into a pipeline
of the same shape (files verified by sha256, then read), into a re-shaped one (2 stages, gpipe) and
`stagewise.load_full` (one process, the unsplit state dict). Prints one JSON line per model.

    python benchmarks/bench_checkpoint.py --models gpt2-tiny gpt2 --repeats 3 --folder /tmp/ckpt-bench
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import time
from pathlib import Path

import torch

import stagewise
from stagewise import Pipeline
from stagewise.models import config, gpt2_layers, lm_loss


def sizes(folder: Path) -> dict[str, int]:
    out: dict[str, int] = {}
    for f in folder.iterdir():
        kind = f.name.split("-", 1)[0].split(".", 1)[0]  # weights, optimizer, manifest
        out[kind] = out.get(kind, 0) + f.stat().st_size
    return out


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def bench(name: str, repeats: int, root: Path) -> dict:
    cfg = config(name)
    torch.manual_seed(0)
    adamw = lambda ps: torch.optim.AdamW(ps, lr=1e-4)  # noqa: E731
    pipe = Pipeline(gpt2_layers(cfg), lm_loss, schedule="1f1b", microbatches=4, partition="type:GPT2Block",
                    local_devices=4, optimizer=adamw, show_partition=False, timeout=600)
    ids = torch.randint(0, cfg.vocab_size, (4, 32), generator=torch.Generator().manual_seed(1))
    pipe.train_step((ids, ids))
    same = Pipeline(gpt2_layers(cfg), lm_loss, schedule="1f1b", microbatches=4,
                    partition="type:GPT2Block", local_devices=4, optimizer=adamw, show_partition=False, timeout=600)
    same.train_step((ids, ids))  # optimizer state exists, as in a run that resumes
    other = Pipeline(gpt2_layers(cfg), lm_loss, schedule="gpipe", microbatches=4, local_devices=2, optimizer=adamw,
                     show_partition=False, timeout=600)
    other.train_step((ids, ids))
    save, load, reshape, full = [], [], [], []
    folder = root / name
    for _ in range(repeats):
        shutil.rmtree(folder, ignore_errors=True)
        save.append(timed(lambda: pipe.save_checkpoint(folder, step=1)))
        load.append(timed(lambda: same.load_checkpoint(folder)))
        reshape.append(timed(lambda: other.load_checkpoint(folder)))
        full.append(timed(lambda: stagewise.load_full(folder)))
    ckpt = folder / "step-00000001"
    for (n, a), (_, b) in zip(pipe.named_parameters(), same.named_parameters()):
        assert torch.equal(a, b), n
    size = sizes(ckpt)
    params = sum(p.numel() for p in torch.nn.Sequential(*gpt2_layers(cfg, device="meta")).parameters())
    return {"model": name, "params": params, "balance": pipe.balance, "repeats": repeats,
            "save_s": statistics.median(save), "load_same_shape_s": statistics.median(load),
            "load_reshaped_P2_gpipe_s": statistics.median(reshape), "load_full_s": statistics.median(full),
            "save_min_max_s": [min(save), max(save)], "load_min_max_s": [min(load), max(load)],
            "bytes": size, "total_mib": sum(size.values()) / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["gpt2-tiny", "gpt2"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--folder", default="/tmp/stagewise-ckpt-bench")
    args = ap.parse_args()
    for name in args.models:
        print(json.dumps(bench(name, args.repeats, Path(args.folder))), flush=True)
    shutil.rmtree(args.folder, ignore_errors=True)


if __name__ == "__main__":
    main()
