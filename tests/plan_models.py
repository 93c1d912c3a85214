"""Small models for the planner and `stagewise check` tests (importable as `plan_models:...` from the CLI)."""

from __future__ import annotations

import torch
from torch import nn

from stagewise.models import config, gpt2_layers

DIM = 8


def small_gpt(seed: int = 0, n_layer: int = 4, n_embd: int = 32, vocab: int = 512, seq: int = 16) -> list[nn.Module]:
    """A GPT small enough to run every schedule in a test (6 layers: embedding, blocks, head)."""
    torch.manual_seed(seed)
    return gpt2_layers(config("gpt2-tiny", n_embd=n_embd, n_layer=n_layer, n_head=2, vocab_size=vocab,
                              n_positions=seq))


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(DIM, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.lin(self.norm(x)))


class BatchCentre(nn.Module):
    """Subtracts the mean over the batch: exact on one process, wrong once the batch is split into micro-batches."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - x.mean(dim=0, keepdim=True)


def layers() -> list[nn.Module]:
    torch.manual_seed(0)
    return [nn.Linear(4, DIM)] + [Block() for _ in range(5)] + [nn.Linear(DIM, 1)]


def broken_layers() -> list[nn.Module]:
    mods = layers()
    mods.insert(3, BatchCentre())
    return mods


def loss(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def sample(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 4, generator=g)
    return x, x[:, :1].sin()
