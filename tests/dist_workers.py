"""Functions run inside spawned ranks by the runtime tests (module-level so they can be pickled)."""

from __future__ import annotations

import os
import threading
import time

import torch
from torch import nn
from toy import loss_fn, make_batch, make_layers, reference

from stagewise import Pipeline

SCHEDULES = ["naive", "gpipe", "1f1b", "interleaved", "zb-h1", "zbv"]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def parity(rank: int, world: int, microbatches: list[int], steps: int, local: bool = False,
           schedules: list[str] | None = None) -> dict:
    """For every synchronous schedule (or those named) and m: loss, gradient and (after `steps` Adam steps)
    weight errors."""
    torch.set_default_dtype(torch.float64)
    batch = make_batch(10, 5)
    ref_loss, ref_grads, ref_weights = reference(make_layers(), batch, steps=steps)
    out = {}
    for name in schedules or SCHEDULES:
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
            pipe.close()  # 30 pipelines in one process: no watchdog thread may outlive its pipeline
            errs["watchdogs"] = sum(t.name == "stagewise-watchdog" and t.is_alive() for t in threading.enumerate())
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
    # "shape": the last layer of stage 0 returns a wrong shape; "raise0": stage 0 (rank 0, which serves
    # the store) fails; otherwise the first layer of stage 1 fails
    layers.insert(3, Boom(2, "raise" if mode == "raise0" else mode))  # layers 0..2 on stage 0, 3..5 on stage 1
    balance = [4, 2] if mode in ("shape", "raise0") else [3, 3]
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


def async_reference(schedule: str, P: int, m: int, batches: int, lr: float, vertical_sync: bool,
                    lengths: list[int] | None = None) -> dict:
    """The update rule written out by hand, one process, no runtime: weights after the run, by name.

    PipeDream: micro-batch n's forward on stage s runs after P-1-s earlier backwards there,
    so it uses version max(0, n-(P-1-s)) (vertical sync: stage 0's, max(0, n-(P-1)), on every
    stage); every backward then updates the newest weights: W_s(n+1) = W_s(n) - lr * g_s(n).
    2BW: batch t uses version max(t-1, 0) everywhere; W(t+1) = W(t) - lr * (sum of batch t's g).
    """
    from torch.func import functional_call

    from stagewise.partition import uniform

    torch.set_default_dtype(torch.float64)
    layers = make_layers()
    bounds = [0]
    for n in uniform(len(layers), P):
        bounds.append(bounds[-1] + n)
    stages = [nn.Sequential(*layers[bounds[s]:bounds[s + 1]]) for s in range(P)]
    names = [[n for n, _ in st.named_parameters()] for st in stages]
    versions = [{0: [p.detach().clone() for p in st.parameters()]} for st in stages]
    latest = [0] * P
    data = [make_batch(8, (lengths or [5] * batches)[t], seed=10 + t) for t in range(batches)]
    total = m * batches
    pending = [None] * P
    for n in range(total):
        t, i = divmod(n, m)
        ids, labels = data[t]
        size = [len(c) for c in ids.tensor_split(m)]
        x, y = ids.tensor_split(m)[i], labels.tensor_split(m)[i]
        if schedule == "pipedream":
            used = [max(0, n - (P - 1)) if vertical_sync else max(0, n - (P - 1 - s)) for s in range(P)]
        else:
            used = [max(t - 1, 0)] * P
        weights = [[w.clone().requires_grad_(True) for w in versions[s][used[s]]] for s in range(P)]
        h = x
        for s in range(P):
            h = functional_call(stages[s], dict(zip(names[s], weights[s])), (h,))
        loss = loss_fn(h, y) * (size[i] / sum(size))
        grads = torch.autograd.grad(loss, [w for ws in weights for w in ws])
        k = 0
        for s in range(P):
            g = list(grads[k:k + len(weights[s])])
            k += len(weights[s])
            if schedule == "pipedream":
                versions[s][n + 1] = [w - lr * gi for w, gi in zip(versions[s][latest[s]], g)]
                latest[s] = n + 1
            else:
                pending[s] = g if pending[s] is None else [a + b for a, b in zip(pending[s], g)]
                if i == m - 1:
                    versions[s][t + 1] = [w - lr * gi for w, gi in zip(versions[s][latest[s]], pending[s])]
                    latest[s], pending[s] = t + 1, None
    out = {}
    for s in range(P):
        for name, w in zip(names[s], versions[s][latest[s]]):
            head, _, rest = name.partition(".")
            out[f"{int(head) + bounds[s]}.{rest}"] = w
    return out


def async_run(rank: int, world: int, schedule: str, vertical_sync: bool, local: bool = False,
              lengths: list[int] | None = None) -> dict:
    from stagewise.schedules import build, simulate

    torch.set_default_dtype(torch.float64)
    m, batches, lr = 4, 3, 0.05
    pipe = Pipeline(make_layers(), loss_fn, schedule=schedule, microbatches=m, timeout=20,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=lr), vertical_sync=vertical_sync,
                    local_devices=world if local else None)
    lengths = lengths or [5] * batches
    losses = pipe.train(iter([make_batch(8, lengths[t], seed=10 + t) for t in range(batches)]), steps=batches)
    ref = async_reference(schedule, world, m, batches, lr, vertical_sync, lengths)
    err = max(rel(p.detach(), ref[n]) for n, p in pipe.named_parameters())
    opts = {"vertical_sync": True} if vertical_sync else {}
    predicted = simulate(build(schedule, world, m, batches=batches, **opts)).peak_weight_versions
    return {"err": err, "losses": losses, "peaks": pipe.version_peaks, "predicted": predicted,
            "stages": pipe.stage_indices}
