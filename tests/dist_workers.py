"""Functions run inside spawned ranks by the runtime tests (module-level so they can be pickled)."""

from __future__ import annotations

import os
import time

import torch
from torch import nn
from toy import loss_fn, make_batch, make_layers, reference

from stagewise import Pipeline

SCHEDULES = ["naive", "gpipe", "1f1b", "interleaved", "zb-h1", "zbv"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def parity(rank: int, world: int, microbatches: list[int], steps: int, local: bool = False) -> dict:
    """For every synchronous schedule and m: loss, gradient and (after `steps` Adam steps) weight errors."""
    torch.set_default_dtype(torch.float64)
    batch = make_batch(10, 5)
    ref_loss, ref_grads, ref_weights = reference(make_layers(), batch, steps=steps)
    out = {}
    for name in SCHEDULES:
        for m in microbatches:
            pipe = Pipeline(make_layers(), loss_fn, schedule=name, microbatches=m, timeout=20,
                            optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2),
                            local_devices=world if local else None)
            loss = pipe.train_step(batch)  # the gradients stay in .grad after the step, until the next one
            errs = {"loss": abs(loss.item() - ref_loss.item()) / abs(ref_loss.item())}
            errs["grad"] = max(rel(p.grad, ref_grads[n]) for n, p in pipe.named_parameters())
            for _ in range(steps - 1):
                pipe.train_step(batch)
            errs["weight"] = max(rel(p.detach(), ref_weights[n]) for n, p in pipe.named_parameters())
            errs["params"] = len(pipe.named_parameters())
            out[(name, m)] = errs
    return out


def grads_of(rank: int, world: int, local: bool, schedule: str, m: int, lengths: list[int]) -> dict:
    """Gradients after one step per sequence length (shapes renegotiated between steps)."""
    torch.set_default_dtype(torch.float64)
    pipe = Pipeline(make_layers(), loss_fn, schedule=schedule, microbatches=m, timeout=20,
                    local_devices=world if local else None)
    result = {}
    for t in lengths:
        loss = pipe.train_step(make_batch(6, t, seed=t))
        ref_loss, ref_grads, _ = reference(make_layers(), make_batch(6, t, seed=t))
        result[t] = {"loss": loss.item(), "ref_loss": ref_loss.item(),
                     "grads": {n: p.grad.clone() for n, p in pipe.named_parameters()},
                     "grad_err": max(rel(p.grad, ref_grads[n]) for n, p in pipe.named_parameters())}
    return result


class Boom(nn.Module):
    """Raises on its `at`-th call (0-based), or returns a wrong shape, or kills its process."""

    def __init__(self, at: int, mode: str) -> None:
        super().__init__()
        self.at, self.mode, self.calls = at, mode, 0

    def forward(self, x: dict) -> dict:
        n, self.calls = self.calls, self.calls + 1
        if n == self.at:
            if self.mode == "raise":
                raise RuntimeError(f"boom in micro-batch {n}")
            if self.mode == "shape":
                return {**x, "h": x["h"][:, :-1]}
            if self.mode == "exit":
                os._exit(7)
            if self.mode == "hang":
                time.sleep(3600)
        return x


def fault(rank: int, world: int, mode: str, timeout: float) -> str:
    torch.set_default_dtype(torch.float64)
    layers = make_layers(blocks=3)
    # "shape": the last layer of stage 0 returns a wrong shape; otherwise the first layer of stage 1 fails
    layers.insert(3, Boom(2, mode))  # layers 0..2 on stage 0, 3..5 on stage 1
    balance = [4, 2] if mode == "shape" else [3, 3]
    pipe = Pipeline(layers, loss_fn, schedule="1f1b", microbatches=4, timeout=timeout, partition=balance)
    pipe.train_step(make_batch(8, 5))
    return "finished"


def tied(rank: int, world: int, schedule: str, steps: int, local: bool = False) -> dict:
    """Weights after Adam steps with the embedding tied to the head, and the tied copies' values."""
    from toy import make_tied_layers

    torch.set_default_dtype(torch.float64)
    batch = make_batch(8, 5)
    model = nn.Sequential(*make_tied_layers())
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(model(batch[0]), batch[1]).backward()
        opt.step()
    ref = dict(model.named_parameters())
    pipe = Pipeline(make_tied_layers(), loss_fn, schedule=schedule, microbatches=4, timeout=20,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2), local_devices=world if local else None)
    for _ in range(steps):
        pipe.train_step(batch)
    copies = {}
    for s in pipe.stage_indices:
        for layer in pipe.stages[s].module:
            w = getattr(getattr(layer, "emb", None), "weight", None)
            if w is None and hasattr(layer, "out"):
                w = layer.out.weight
            if w is not None:
                copies[s] = w.detach().clone()
    err = max(rel(p.detach(), ref[n]) for n, p in pipe.named_parameters())
    return {"err": err, "copies": copies, "ref": ref["0.emb.weight"].detach().clone()}
