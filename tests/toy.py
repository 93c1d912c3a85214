"""A small float64 model for parity tests: layers of different sizes, a dict with an int tensor between stages."""

from __future__ import annotations

import torch
from torch import nn

VOCAB, DIM = 11, 6


class Embed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(VOCAB, DIM)

    def forward(self, ids: torch.Tensor) -> dict:
        # a float tensor that needs no gradient travels too (like an attention mask)
        scale = 1.0 + 0.01 * torch.arange(ids.shape[1], dtype=self.emb.weight.dtype).expand(ids.shape)
        return {"h": self.emb(ids), "ids": ids, "scale": scale, "note": "rides along"}


class Mix(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.up = nn.Linear(DIM, hidden)
        self.down = nn.Linear(hidden, DIM)
        self.norm = nn.LayerNorm(DIM)

    def forward(self, x: dict) -> dict:
        h = x["h"]
        parity = (x["ids"] % 2).unsqueeze(-1).to(h.dtype)  # uses the integer tensor
        h = h + self.down(torch.tanh(self.up(self.norm(h)))) * (1 + 0.1 * parity) * x["scale"].unsqueeze(-1)
        return {"h": h, "ids": x["ids"], "scale": x["scale"], "note": x["note"]}


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(DIM)
        self.out = nn.Linear(DIM, VOCAB)

    def forward(self, x: dict) -> torch.Tensor:
        return self.out(self.norm(x["h"]))


def make_layers(seed: int = 0, blocks: int = 7) -> list[nn.Module]:
    torch.manual_seed(seed)
    layers = [Embed()] + [Mix(4 + 3 * i) for i in range(blocks)] + [Head()]
    return [m.double() for m in layers]


def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))


def token_loss(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(summed cross-entropy, label tokens): the token mean over a padded batch (labels -100 skipped)."""
    flat = labels.reshape(-1)
    return nn.functional.cross_entropy(logits.reshape(-1, VOCAB), flat, reduction="sum"), (flat != -100).sum()


class CountedTokenLoss:
    """`token_loss` that also counts a batch's label tokens ahead (`count`): each backward starts from 1 / count."""

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return token_loss(logits, labels)

    def count(self, labels: torch.Tensor) -> int:
        return int((labels != -100).sum())


counted_token_loss = CountedTokenLoss()


def make_padded_batch(n: int = 8, t: int = 6, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Sequences of random lengths 1..t, labels -100 past each length (padding): unequal tokens per sample."""
    ids, labels = make_batch(n, t, seed)
    g = torch.Generator().manual_seed(seed + 1000)
    lengths = torch.randint(1, t + 1, (n,), generator=g)
    labels[torch.arange(t).expand(n, t) >= lengths.unsqueeze(1)] = -100
    return ids, labels


def make_batch(n: int = 8, t: int = 5, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, t), generator=g)
    return ids, torch.randint(0, VOCAB, (n, t), generator=g)


def reference(layers: list[nn.Module], batch, steps: int = 0, lr: float = 1e-2):
    """Loss and gradients of one unpipelined run; with `steps`, the weights after that many Adam steps."""
    model = nn.Sequential(*layers)
    inputs, labels = batch
    model.zero_grad()
    loss = loss_fn(model(inputs), labels)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    weights = None
    if steps:
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        opt.step()
        for _ in range(steps - 1):
            opt.zero_grad()
            loss_fn(model(inputs), labels).backward()
            opt.step()
        weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, weights


def make_tied_layers(seed: int = 0, blocks: int = 3) -> list[nn.Module]:
    """Like `make_layers`, with the head's output weight the embedding's (GPT-2's tie)."""
    layers = make_layers(seed, blocks)
    layers[-1].out.weight = layers[0].emb.weight
    return layers
