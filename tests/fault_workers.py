"""Faulty layers, losses and rank functions for the fault campaign (tests/test_faults.py); module-level so that
spawned ranks can unpickle them, and runnable as a script under `stagewise run` (see `script_main`)."""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

import torch
from torch import nn

NAN = float("nan")


class Counted(nn.Module):
    """Does something to its input on its `at`-th call (0-based; in the first step, the micro-batch index)."""

    def __init__(self, at: int, mode: str) -> None:
        super().__init__()
        self.at, self.mode, self.calls = at, mode, 0
        self.w = nn.Parameter(torch.ones(()))  # for "nan-weight-grad"

    def forward(self, x: torch.Tensor) -> Any:
        n, self.calls = self.calls, self.calls + 1
        if self.mode == "nan-weight-grad":  # the parameter's gradient is NaN, its input's stays finite
            return x + 0.0 * NanGrad.apply(self.w)
        if n != self.at:
            return x
        if self.mode == "nan":
            return x * NAN
        if self.mode == "inf":
            return x + float("inf")
        if self.mode == "nan-grad":  # the forward is fine, the gradient through it is NaN
            return NanGrad.apply(x)
        if self.mode == "none":
            return None
        if self.mode == "raise":
            raise RuntimeError(f"boom in micro-batch {n}")
        if self.mode == "raise-backward":
            return RaiseInBackward.apply(x)
        if self.mode == "shape":
            return x[:, :-1]
        if self.mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.mode == "exit":
            os._exit(7)
        if self.mode == "hang":
            time.sleep(3600)
        return x


class NanGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        return g * NAN


class RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx: Any, g: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("boom in the backward")


class WithMask(nn.Module):
    """Hands on (h, mask): an additive attention-style mask holding -inf that carries no gradient."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mask = torch.zeros(x.shape[0], 3)
        mask[:, 0] = float("-inf")
        return x, mask


class UseMask(nn.Module):
    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h, mask = x
        return h * torch.softmax(mask, dim=-1)[:, 1:2]


def layers(fault: Counted | nn.Module | None = None, at: int = 3, width: int = 8) -> list[nn.Module]:
    """A small MLP of 6 layers (4 -> width -> 1); `fault` goes in at index `at`."""
    torch.manual_seed(0)
    out: list[nn.Module] = [nn.Linear(4, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(),
                            nn.Linear(width, width), nn.Linear(width, 1)]
    if fault is not None:
        out.insert(at, fault)
    return out


def random_layers() -> list[nn.Module]:
    """`layers()` with dropout: a model that is random by itself (for `stagewise check`)."""
    out = layers()
    out.insert(3, nn.Dropout(0.5))
    return out


def batch(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 4, generator=g), torch.randn(n, 1, generator=g)


def mse(out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, labels)


class InfLoss:
    """mse, but the `at`-th call returns inf."""

    def __init__(self, at: int) -> None:
        self.at, self.calls = at, 0

    def __call__(self, out: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, self.calls = self.calls, self.calls + 1
        loss = mse(out, labels)
        return loss + float("inf") if n == self.at else loss


# ---- rank functions for `stagewise.spawn` --------------------------------------------------------------

def mismatch(rank: int, world: int, what: str) -> str:
    """Ranks that disagree: on the data, the shapes, m, or the call."""
    from stagewise import Pipeline

    m = 3 if what == "microbatches" and rank == 1 else 4
    pipe = Pipeline(layers(), mse, microbatches=m, partition=[3, 3], timeout=10, show_partition=False)
    x, y = batch(8)
    if what == "data" and rank == 1:
        x = x.clone()
        x[0, 1] = torch.nextafter(x[0, 1], torch.tensor(9.0))  # one element, one bit: none a sample of 16 would see
    if what == "shapes" and rank == 1:
        x, y = batch(9)
    if what == "call" and rank == 1:
        pipe.eval_step((x, y))
    else:
        pipe.train_step((x, y))
    return "finished"


def nonfinite(rank: int, world: int, policy: str) -> dict:
    """A NaN in stage 0's output for micro-batch 2 (2 ranks)."""
    from stagewise import Pipeline

    pipe = Pipeline(layers(Counted(2, "nan")), mse, microbatches=4, partition=[4, 3], timeout=10,
                    show_partition=False, on_nonfinite=policy, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = [p.detach().clone() for p in pipe.parameters()]
    loss = pipe.train_step(batch(8))
    unchanged = all(torch.equal(a, p.detach()) for a, p in zip(before, pipe.parameters()))
    skipped = pipe.last_step.get("skipped")
    finite = pipe.train_step(batch(8)).item()
    return {"loss": loss.item(), "unchanged": unchanged, "skipped": skipped, "next": finite}


def early_exit(rank: int, world: int, who: int) -> str:
    """Rank `who` exits before constructing the Pipeline."""
    from stagewise import Pipeline

    if rank == who:
        os._exit(0)
    Pipeline(layers(), mse, partition=[3, 3], timeout=6, show_partition=False)
    return "finished"


def fault(rank: int, world: int, mode: str, timeout: float) -> str:
    """`Counted(2, mode)` as the first layer of stage 1 (rank 1), or for "none" the last of stage 0 (rank 0)."""
    from stagewise import Pipeline

    partition = [4, 3] if mode == "none" else [3, 4]  # "none": the last layer of stage 0
    pipe = Pipeline(layers(Counted(2, mode)), mse, microbatches=4, partition=partition, timeout=timeout,
                    show_partition=False)
    pipe.train_step(batch(8))
    return "finished"


def leave(rank: int, world: int, how: str) -> str:
    """After one step, rank 1 returns without the second ("return") or is killed ("kill"); rank 0 steps again, and
    meets the silence in a collective (the step's first: the batch check's all-reduce)."""
    from stagewise import Pipeline

    pipe = Pipeline(layers(), mse, microbatches=2, partition=[3, 3], timeout=10, show_partition=False)
    pipe.train_step(batch(8))
    if rank == 1:
        if how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        return "left"
    pipe.train_step(batch(8))
    return "finished"


def checkpoint_to(rank: int, world: int, folder: str) -> str:
    from stagewise import Pipeline

    pipe = Pipeline(layers(), mse, microbatches=2, partition=[3, 3], timeout=10, show_partition=False)
    pipe.train_step(batch(8))
    pipe.save_checkpoint(folder)
    return "saved"


# ---- a script for `stagewise run` -------------------------------------------------------------------

def script_main(argv: list[str]) -> None:
    """`fault_workers.py MODE`: rank 1 does MODE (kill, raise, early-exit) in step 2 or before the Pipeline."""
    from stagewise import Pipeline

    mode = argv[0]
    rank = int(os.environ.get("RANK", "0"))
    if mode == "early-exit" and rank == 1:
        sys.exit(3)
    fault_layer = Counted(6, mode if rank == 1 else "none-here")  # micro-batch 2 of the second step
    pipe = Pipeline(layers(fault_layer), mse, microbatches=4, partition=[3, 4], timeout=20, show_partition=False)
    for step in range(3):
        loss = pipe.train_step(batch(8))
        print(f"rank {rank} step {step} loss {loss.item():.4f}", flush=True)


if __name__ == "__main__":
    script_main(sys.argv[1:])
