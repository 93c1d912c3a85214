"""Functions run inside spawned ranks by the checkpoint tests (module-level so they can be pickled)."""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from toy import loss_fn, make_batch, make_layers

from stagewise import Pipeline
from stagewise.runtime.checkpoint import files


def dropout_layers(seed: int = 0) -> list[nn.Module]:
    """The toy model with dropout after two blocks, so the resumed losses depend on every rank's RNG."""
    layers = make_layers(seed)

    class Drop(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.drop = nn.Dropout(0.2)

        def forward(self, x: dict) -> dict:
            return {**x, "h": self.drop(x["h"])}

    layers.insert(2, Drop())
    layers.insert(6, Drop())
    return layers


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    return make_batch(8, 5, seed=100 + step)


def adam(ps: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.Adam(ps, lr=1e-2)


def weights(pipe: Pipeline) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in pipe.named_parameters()}


def probes() -> tuple[float, float]:
    """One draw from Python's and numpy's generators (restored by a load too)."""
    return random.random(), float(np.random.rand())


def resume_run(rank: int, world: int, phase: str, root: str, schedules: list[str]) -> dict:
    """phase "first": 6 steps straight, then 3 steps and a save; phase "second" (new processes): load, 3 steps."""
    torch.set_default_dtype(torch.float64)
    out = {}
    for name in schedules:
        folder = Path(root) / name
        pipe = Pipeline(dropout_layers(seed=0 if phase == "first" else 7), loss_fn, schedule=name, microbatches=4,
                        optimizer=adam, timeout=20, show_partition=False)
        if phase == "first":
            straight = Pipeline(dropout_layers(), loss_fn, schedule=name, microbatches=4, optimizer=adam, timeout=20,
                                show_partition=False)
            torch.manual_seed(1234 + rank)
            losses = [straight.train_step(batch(i)).item() for i in range(6)]
            out[name] = {"straight": losses, "straight_weights": weights(straight)}
            straight.close()
            torch.manual_seed(1234 + rank)
            random.seed(5 + rank)
            np.random.seed(6 + rank)
            first = [pipe.train_step(batch(i)).item() for i in range(3)]
            pipe.save_checkpoint(folder, step=3, extra={"data": {"next_batch": 3}})
            out[name].update(first=first, probes=probes())
        else:
            manifest = pipe.load_checkpoint(folder)
            start = manifest["extra"]["data"]["next_batch"]
            probe = probes()
            losses = [pipe.train_step(batch(i)).item() for i in range(start, start + 3)]
            out[name] = {"resumed": losses, "weights": weights(pipe), "probes": probe, "step": manifest["step"]}
        pipe.close()
    return out


def kill_during_save(rank: int, world: int, root: str, marker: str) -> str:
    """Save step 2, train on, and hold rank 1 inside the save of step 3 (after its first file) until killed."""
    torch.set_default_dtype(torch.float64)
    pipe = Pipeline(make_layers(), loss_fn, schedule="1f1b", microbatches=4, optimizer=adam, timeout=20,
                    show_partition=False)
    for i in range(2):
        pipe.train_step(batch(i))
    pipe.save_checkpoint(root, step=2)
    pipe.train_step(batch(2))

    def hold(r: int, path: Path) -> None:
        if r == 1:
            tmp = Path(marker).with_suffix(".tmp")
            tmp.write_text(f"{os.getpid()} {path}")
            os.replace(tmp, marker)
            time.sleep(120)  # the test SIGKILLs this process here

    files.on_file_written = hold
    pipe.save_checkpoint(root, step=3)
    return "the save of step 3 finished (it should have been killed)"
