"""Data parallelism (P x D ranks) against one process: workers run in spawned ranks (module-level)."""

from __future__ import annotations

import torch
from toy import counted_token_loss, loss_fn, make_batch, make_layers, make_padded_batch, make_tied_layers, token_loss

from stagewise import Pipeline


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def reference_sgd(batches: list, steps: int, max_norm: float | None, tied: bool = False) -> tuple[list, dict]:
    """Losses and final weights of one process: SGD with momentum, clip_grad_norm_ before each step."""
    model = torch.nn.Sequential(*(make_tied_layers() if tied else make_layers()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for k in range(steps):
        inputs, labels = batches[k % len(batches)]
        opt.zero_grad()
        loss = loss_fn(model(inputs), labels)
        loss.backward()
        losses.append(loss.item())
        if max_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        opt.step()
    return losses, {n: p.detach().clone() for n, p in model.named_parameters()}


def _errors(pipe: Pipeline, losses: list[float], ref_losses: list[float], ref: dict) -> dict:
    return {"loss": max(abs(a - b) / abs(b) for a, b in zip(losses, ref_losses)),
            "weight": max(rel(p.detach(), ref[n]) for n, p in pipe.named_parameters()),
            "names": sorted(n for n, _ in pipe.named_parameters())}


def pp_dp(rank: int, world: int, pipeline: int, local: bool = False) -> dict:
    """PP x DP: 1f1b and zbv with clipping (5 steps, an 11-sample batch: uneven over D x m), tied weights with
    gradient accumulation over 3 calls against one call on their concatenation, and the grad norm."""
    torch.set_default_dtype(torch.float64)
    data = world // pipeline if not local else world
    devices = pipeline if not local else pipeline
    out: dict = {}
    batch = make_batch(11, 5)
    ref_losses, ref = reference_sgd([batch], 5, 0.5)
    for schedule in ("1f1b", "zbv"):
        pipe = Pipeline(make_layers(), loss_fn, schedule=schedule, microbatches=2, timeout=30, show_partition=False,
                        optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), max_grad_norm=0.5,
                        data_parallel=data, local_devices=devices if local else None)
        losses = [pipe.train_step(batch).item() for _ in range(5)]
        out[schedule] = _errors(pipe, losses, ref_losses, ref)
        out[schedule]["grad_norm"] = pipe.last_step["grad_norm"]
        pipe.close()
    parts = [make_batch(4, 5, seed=1), make_batch(5, 5, seed=2), make_batch(4, 5, seed=3)]
    full = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    ref_losses, ref = reference_sgd([full], 1, None, tied=True)
    pipe = Pipeline(make_tied_layers(), loss_fn, schedule="1f1b", microbatches=2, timeout=30, show_partition=False,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.9), data_parallel=data,
                    local_devices=devices if local else None)
    for k, part in enumerate(parts):
        pipe.train_step(part, step=k == len(parts) - 1)
    out["tied_accumulated"] = _errors(pipe, ref_losses, ref_losses, ref)
    pipe.close()
    out["token_mean"] = token_mean(data, devices if local else None)
    out["token_mean_counted"] = token_mean(data, devices if local else None, counted_token_loss)
    return out


def token_mean(data: int, local: int | None, loss=token_loss) -> dict:
    """(sum, count) losses on padded batches, tied weights, clipping, 3 Adam steps each over 3 accumulating calls
    (9, 7 and 10 samples: uneven over replicas and micro-batches) against one process on their concatenation
    with the token-mean cross-entropy. `loss`: the sums divided at the step, or (`counted_token_loss`) counted ahead,
    each backward starting from 1 / count."""
    parts = [make_padded_batch(9, 6, seed=20), make_padded_batch(7, 6, seed=21), make_padded_batch(10, 6, seed=22)]
    full = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    model = torch.nn.Sequential(*make_tied_layers())
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    ref_losses = []
    for _ in range(3):
        opt.zero_grad()
        total, count = token_loss(model(full[0]), full[1])
        (total / count).backward()
        ref_losses.append((total / count).item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.3)
        opt.step()
    ref = {n: p.detach().clone() for n, p in model.named_parameters()}
    pipe = Pipeline(make_tied_layers(), loss, schedule="zbv", microbatches=2, timeout=30, show_partition=False,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=0.05), data_parallel=data, max_grad_norm=0.3,
                    local_devices=local)
    losses = []
    for _ in range(3):
        for k, part in enumerate(parts):
            pipe.train_step(part, step=k == len(parts) - 1)
        losses.append(pipe.last_step["loss"])
    result = _errors(pipe, losses, ref_losses, ref)
    pipe.close()
    return result


def two_bw(rank: int, world: int, data: int, local: bool = False) -> dict:
    """2BW on P x D ranks follows its update rule on the full batch: W(t+1) = W(t) - lr * grad(batch t at W(t-1))."""
    from dist_workers import async_reference

    torch.set_default_dtype(torch.float64)
    pipeline = world // data if not local else world
    m, batches, lr = 2, 3, 0.05
    pipe = Pipeline(make_layers(), loss_fn, schedule="2bw", microbatches=m, timeout=30, show_partition=False,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=lr), data_parallel=data,
                    local_devices=pipeline if local else None)
    pipe.train(iter([make_batch(8, 5, seed=10 + t) for t in range(batches)]), steps=batches)
    ref = async_reference("2bw", pipeline, m, batches, lr, False)
    err = max(rel(p.detach(), ref[n]) for n, p in pipe.named_parameters())
    pipe.close()
    return {"err": err}


def wrong_world(rank: int, world: int) -> str:
    try:
        Pipeline(make_layers(), loss_fn, data_parallel=2, show_partition=False)
    except ValueError as err:
        return str(err)
    return "no error"
