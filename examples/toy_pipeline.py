"""A minimal stagewise script: run it with `stagewise run -n 2 examples/toy_pipeline.py` (or torchrun).

Every rank builds the same model from the same seed, keeps only its own stages, and
trains on the same batches; rank 0 prints the loss.
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

import stagewise


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--schedule", default="1f1b")
    parser.add_argument("--microbatches", type=int, default=4)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()

    torch.manual_seed(0)
    layers = [nn.Linear(16, 64), nn.GELU(), nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 1)]
    pipe = stagewise.Pipeline(layers, loss_fn=nn.functional.mse_loss, schedule=args.schedule,
                              microbatches=args.microbatches,
                              optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 16, generator=g)
    y = (x[:, :4].sum(1, keepdim=True)).sin()
    for step in range(args.steps):
        idx = torch.randint(0, 256, (32,), generator=g)
        loss = pipe.train_step((x[idx], y[idx]))
        if pipe.rank == 0 and (step % 5 == 0 or step == args.steps - 1):
            print(f"step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    main()
