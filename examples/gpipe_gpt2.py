"""The seed's first GPT-2 script (torchgpipe's GPipe), written against stagewise.

The seed wraps GPT-2 as nn.Sequential(preprocessing, 12 blocks, postprocessing) in
`GPipe(model, balance=[4, 3, 3, 4], devices=[0, 1, 2, 3], chunks=4)` and trains it like any
module: `loss.backward()`, `optimizer.step()`. Here the layers come from `stagewise.models`
(the embedding/head tie kept, so the full model has 124M parameters, not 163M) and padding is
left out of the loss. The data needs no download: the Python standard library's sources and a
byte-level BPE trained on them (cached), or your text files with --data.

    python examples/gpipe_gpt2.py                       # gpt2-tiny, 4 partitions on CPU devices, < 1 min
    python examples/gpipe_gpt2.py --compare-plain       # also times the plain module on the same batches
    python examples/gpipe_gpt2.py --full                # the seed's layout: gpt2 (124M), [4, 3, 3, 4], GPUs 0-3
    python examples/gpipe_gpt2.py --full --balance 3,5,5,1 --batch-size 24    # the seed's second run
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
from torch import nn

import stagewise
from stagewise.data import (
    LengthSortedBatches,
    builtin_corpus,
    cache_root,
    pad_id,
    read_text_files,
    token_windows,
    train_bpe,
)
from stagewise.models import config, count_parameters, gpt2_layers, lm_loss


def parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--full", action="store_true", help="GPT-2 124M with balance [4, 3, 3, 4] (the seed's run)")
    p.add_argument("--model", default=None, help="a stagewise.models config (default gpt2-tiny, or gpt2 with --full)")
    p.add_argument("--balance", default=None,
                   help="layers per partition, e.g. 3,5,5,1 (default 2,1,1,2; --full 4,3,3,4)")
    p.add_argument("--devices", default=None,
                   help="comma-separated, e.g. 0,1,2,3 or cpu,cpu,cpu,cpu (default: CPU; --full: GPUs 0-3 when there)")
    p.add_argument("--chunks", type=int, default=4)
    p.add_argument("--checkpoint", default="except_last", choices=["always", "except_last", "never"])
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--lr", type=float, default=1e-3, help="Adam's learning rate (the seed: 3e-5 on pretrained weights)")
    p.add_argument("--vocab-size", type=int, default=8192)
    p.add_argument("--data", default=None, help="a text file or folder (default: the standard library's sources)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--compare-plain", action="store_true", help="also train the plain module on the same batches")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def main() -> None:
    args = parse()
    name = args.model or ("gpt2" if args.full else "gpt2-tiny")
    default = [4, 3, 3, 4] if args.full else [2, 1, 1, 2]
    balance = [int(x) for x in args.balance.split(",")] if args.balance else default
    if args.devices:
        devices: list[int | str] = [int(d) if d.isdigit() else d for d in args.devices.split(",")]
    elif args.full and torch.cuda.device_count() >= len(balance):
        devices = list(range(len(balance)))
    else:
        devices = ["cpu"] * len(balance)

    texts = read_text_files(args.data) if args.data else builtin_corpus()
    tok = train_bpe(texts, vocab_size=args.vocab_size)
    chunks = token_windows(texts, tok, args.seq_len, cache_dir=cache_root() / "tokens")
    batches = LengthSortedBatches(chunks, args.batch_size, pad_id(tok), seed=args.seed, drop_last=True)
    steps = [b for _, b in zip(range(args.steps), iter(batches))]

    torch.manual_seed(args.seed)
    base = config(name)
    # --full keeps GPT-2's own vocabulary size (124M parameters); the ids of the local tokenizer fit in it
    vocab = max(tok.get_vocab_size(), base.vocab_size) if args.full else tok.get_vocab_size()
    cfg = config(name, vocab_size=vocab, n_positions=max(base.n_positions, args.seq_len))
    layers = gpt2_layers(cfg)
    plain = copy.deepcopy(nn.Sequential(*layers)) if args.compare_plain else None
    print(f"{name}: {count_parameters(layers) / 1e6:.2f}M parameters (embedding and head tied), {len(layers)} layers, "
          f"{len(steps)} steps of {args.batch_size} x <= {args.seq_len} tokens")

    model = stagewise.GPipe(nn.Sequential(*layers), balance=balance, devices=devices, chunks=args.chunks,
                            checkpoint=args.checkpoint)
    first, last = model.devices[0], model.devices[-1]
    runs = {"GPipe": (model, first, last)}
    if plain is not None:  # trained step by step alongside, so both are timed under the same machine load
        runs["plain module"] = (plain, torch.device("cpu"), torch.device("cpu"))
    optimizers = {what: torch.optim.Adam(m.parameters(), lr=args.lr) for what, (m, _, _) in runs.items()}
    took: dict[str, list[float]] = {what: [] for what in runs}
    for i, (input_ids, labels) in enumerate(steps):
        for what, (m, to_first, to_last) in runs.items():
            start = time.perf_counter()
            optimizers[what].zero_grad()
            logits = m(input_ids.to(to_first))
            loss = lm_loss(logits, labels.to(to_last))  # labels are already shifted; padding (-100) is not counted
            loss.backward()
            optimizers[what].step()
            took[what].append(time.perf_counter() - start)
            if i % args.log_every == 0 or i == len(steps) - 1:
                name = "step" if what == "GPipe" else f"{what} step"
                print(f"{name}: {i}, loss: {loss.item():.4f}", flush=True)
    for what, times in took.items():
        report(what, times)
    if plain is not None:  # paired: the same step of both, under the same load
        ratios = sorted(g / p for g, p in zip(took["GPipe"][1:], took["plain module"][1:]))
        if ratios:
            print(f"GPipe / plain module, per step: median {ratios[len(ratios) // 2]:.2f} "
                  f"[{ratios[len(ratios) // 4]:.2f}-{ratios[3 * len(ratios) // 4]:.2f} interquartile]", flush=True)


def report(what: str, took: list[float]) -> None:
    steady = sorted(took[1:] or took)  # the first step pays one-time costs
    print(f"{what}: {1000 * steady[len(steady) // 2]:.1f} ms per step (median of {len(steady)} after the first)",
          flush=True)


if __name__ == "__main__":
    main()
