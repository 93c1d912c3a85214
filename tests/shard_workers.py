"""Sharded data parallelism (P x D processes, FSDP2 / ZeroRedundancyOptimizer) against one process: workers run in
spawned ranks (module-level). Each worker builds many pipelines inside the same 4 ranks (spawning is the slow part)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from toy import counted_token_loss, loss_fn, make_batch, make_layers, make_padded_batch, make_tied_layers, token_loss

from stagewise import Pipeline

LR = 0.05


def whole(p: torch.Tensor) -> torch.Tensor:
    """A parameter as one tensor: a DTensor shard gathered over its data group (a collective), else itself."""
    return (p.full_tensor() if hasattr(p, "full_tensor") else p).detach()


def _mean(out):
    return out[0] / out[1] if isinstance(out, tuple) else out


def reference(make: Callable[[], list[nn.Module]], parts: list, steps: int, max_norm: float | None = None,
              loss=loss_fn) -> dict:
    """One process: `steps` Adam steps, each on the concatenation of `parts`, clip_grad_norm_ before each."""
    model = nn.Sequential(*make())
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    full = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    losses, norms = [], []
    for _ in range(steps):
        opt.zero_grad()
        value = _mean(loss(model(full[0]), full[1]))
        value.backward()
        losses.append(value.item())
        norms.append(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm or math.inf).item())
        opt.step()
    with torch.no_grad():
        after = _mean(loss(model(full[0]), full[1])).item()
    return {"losses": losses, "norms": norms, "weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "after": after}


def run(make: Callable[[], list[nn.Module]], parts: list, steps: int, schedule: str, shard: str,
        max_norm: float | None = None, loss=loss_fn, opt=torch.optim.Adam, **options) -> dict:
    """The pipeline's losses, norms and weights after `steps` steps, each accumulating over `parts` (step=False
    but the last); its eval loss afterwards on their concatenation."""
    pipe = Pipeline(make(), loss, schedule=schedule, microbatches=2, data_parallel=2, shard=shard, timeout=60,
                    optimizer=lambda ps: opt(ps, lr=LR), max_grad_norm=max_norm, show_partition=False,
                    **options)
    losses, norms = [], []
    for _ in range(steps):
        for k, part in enumerate(parts):
            pipe.train_step(part, step=k == len(parts) - 1)
        losses.append(pipe.last_step["loss"])
        norms.append(pipe.last_step["grad_norm"])
    full = (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))
    after = pipe.eval_step(full)["loss"].item()
    weights = {n: whole(p) for n, p in pipe.named_parameters()}
    kinds = sorted({type(p).__name__ for _, p in pipe.named_parameters()})
    report = dict(pipe.last_step)
    pipe.close()
    return {"losses": losses, "norms": norms, "weights": weights, "after": after, "kinds": kinds, "report": report}


def errors(got: dict, ref: dict) -> dict:
    """Relative errors of the losses, the eval loss after, the norms (when measured) and every weight."""
    def rel(a: float, b: float) -> float:
        return abs(a - b) / max(abs(b), 1e-300)

    w = max(((got["weights"][n] - ref["weights"][n]).abs().max() / ref["weights"][n].abs().max()).item()
            for n in got["weights"])
    norms = [rel(a, b) for a, b in zip(got["norms"], ref["norms"]) if a is not None]
    return {"loss": max(rel(a, b) for a, b in zip(got["losses"], ref["losses"])), "after": rel(got["after"],
            ref["after"]), "weight": w, "norm": max(norms) if norms else None, "names": sorted(got["weights"]),
            "kinds": got["kinds"]}


def linear_layers() -> list[nn.Module]:
    torch.manual_seed(3)
    return [nn.Sequential(nn.Linear(64, 64), nn.Tanh()).double() for _ in range(8)]


def mse(out: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.mse_loss(out, target)


def memory(schedule: str = "1f1b") -> dict:
    """Bytes each rank holds between steps (parameters, gradients, optimizer state) for every mode."""
    g = torch.Generator().manual_seed(5)
    batch = (torch.randn(8, 64, generator=g, dtype=torch.float64), torch.randn(8, 64, generator=g, dtype=torch.float64))
    out = {}
    for shard in ("none", "optimizer", "gradients", "full"):
        pipe = Pipeline(linear_layers(), mse, schedule=schedule, microbatches=2, data_parallel=2, shard=shard,
                        timeout=60, optimizer=lambda ps: torch.optim.Adam(ps, lr=LR), show_partition=False)
        for _ in range(2):
            pipe.train_step(batch)
        out[shard] = next(iter(pipe.sharding.held_bytes().values()))
        pipe.close()
    return out


def shard_parity(rank: int, world: int, long: bool = False) -> dict:
    """P=2 x D=2: every shard mode on 1f1b, zbv and interleaved (float64, 3 Adam steps on an 11-sample batch, uneven
    over replicas and micro-batches); then tied weights with global clipping and accumulation over 3 calls, (sum,
    count) losses, activation checkpointing, bf16, and the bytes held between steps. `long`: every feature on
    every schedule and mode."""
    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    out: dict = {}
    batch = [make_batch(11, 5)]
    ref = reference(make_layers, batch, 3)
    for schedule in ("1f1b", "zbv", "interleaved"):
        for shard in ("none", "optimizer", "gradients", "full"):
            out[(schedule, shard)] = errors(run(make_layers, batch, 3, schedule, shard), ref)
    # tied embedding/head (across ranks on 1f1b and interleaved, one rank's two stages on zbv), global clipping
    # below the norm, 3 accumulating calls per step
    parts = [make_batch(4, 5, seed=1), make_batch(5, 5, seed=2), make_batch(4, 5, seed=3)]
    ref = reference(make_tied_layers, parts, 3, max_norm=0.3)
    grid = [(s, m) for s in ("1f1b", "zbv", "interleaved") for m in ("optimizer", "gradients", "full")] if long else \
        [("1f1b", "full"), ("zbv", "full"), ("interleaved", "full"), ("zbv", "gradients"), ("1f1b", "optimizer")]
    for schedule, shard in grid:
        out[("tied", schedule, shard)] = errors(run(make_tied_layers, parts, 3, schedule, shard, max_norm=0.3), ref)
    # token means over padded batches: sums divided at the step, or counted ahead
    parts = [make_padded_batch(9, 6, seed=20), make_padded_batch(7, 6, seed=21)]
    for name, loss in (("token_loss", token_loss), ("counted", counted_token_loss)):
        ref = reference(make_tied_layers, parts, 2, max_norm=0.3, loss=token_loss)
        for schedule in ("zbv", "1f1b") if long else ("zbv",):
            out[(name, schedule, "full")] = errors(run(make_tied_layers, parts, 2, schedule, "full", max_norm=0.3,
                                                       loss=loss), ref)
    # activation checkpointing: RECOMPUTE actions, and N layers per checkpointed group inside the stage
    ref = reference(make_layers, batch, 3)
    for mode, schedule in (("always", "zbv"), (1, "1f1b")) + ((("except_last", "interleaved"),) if long else ()):
        for shard in ("gradients", "full") if long else ("full",):
            out[("checkpointing", mode, schedule, shard)] = errors(
                run(make_layers, batch, 3, schedule, shard, recompute=mode), ref)
    # bf16: weights gathered in bf16, gradients reduce-scattered in fp32, against the unsharded bf16 pipeline (SGD:
    # Adam would turn bf16's rounding of a near-zero gradient into a whole step of either sign)
    torch.set_default_dtype(torch.float32)

    def floats() -> list[nn.Module]:
        return [m.float() for m in make_layers()]

    plain = run(floats, batch, 3, "1f1b", "none", precision="bf16", opt=torch.optim.SGD)
    sharded = run(floats, batch, 3, "1f1b", "full", precision="bf16", opt=torch.optim.SGD)
    out["bf16"] = {"loss": max(abs(a - b) / abs(b) for a, b in zip(sharded["losses"], plain["losses"])),
                   "weight": max(((sharded["weights"][n] - plain["weights"][n]).abs().max()
                                  / plain["weights"][n].abs().max()).item() for n in plain["weights"])}
    torch.set_default_dtype(torch.float64)
    out["memory"] = memory()
    out["timing"] = sharded["report"]
    # ZeroRedundancyOptimizer keeps the factory's parameter groups (AdamW with weight decay on matrices only)
    from stagewise.optim import adamw

    runs = {}
    for shard in ("none", "optimizer"):
        pipe = Pipeline(make_tied_layers(), loss_fn, data_parallel=2, shard=shard, show_partition=False, timeout=60,
                        optimizer=adamw(0.05, weight_decay=0.1), microbatches=2)
        groups = len(pipe.optimizer.param_groups)
        runs[shard] = ([pipe.train_step(batch[0]).item() for _ in range(3)], groups,
                       {n: whole(p) for n, p in pipe.named_parameters()})
        pipe.close()
    (plain, _, before), (zero, groups, after) = runs["none"], runs["optimizer"]
    out["groups"] = {"loss": max(abs(a - b) for a, b in zip(plain, zero)), "groups": groups,
                     "weight": max((before[n] - p).abs().max().item() for n, p in after.items())}
    return out


def shard_checkpoints(rank: int, world: int, folder: str) -> dict:
    """Save after 2 steps in one shard mode, load into another mode, P or D, take the third step: the weights equal
    one process's after 3 steps (1e-10), and bit for bit the uninterrupted run's in the same shape; `load_full`
    gives the unsplit weights after 2 steps."""
    from pathlib import Path

    from stagewise import load_full

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    batches = [make_batch(8, 5, seed=s) for s in (30, 31, 32)]
    model = nn.Sequential(*make_tied_layers())
    opt = torch.optim.Adam(model.parameters(), lr=LR)
    after = []
    for b in batches:
        opt.zero_grad()
        loss_fn(model(b[0]), b[1]).backward()
        opt.step()
        after.append({n: p.detach().clone() for n, p in model.named_parameters()})

    def build(shard: str, schedule: str = "1f1b", data: int = 2) -> Pipeline:
        return Pipeline(make_tied_layers(), loss_fn, schedule=schedule, microbatches=2, data_parallel=data,
                        shard=shard, optimizer=lambda ps: torch.optim.Adam(ps, lr=LR), show_partition=False,
                        timeout=60)

    def rel(got: dict, ref: dict) -> float:
        return max(((got[n] - ref[n]).abs().max() / ref[n].abs().max()).item() for n in got)

    targets = {"full": [("full", "1f1b", 2), ("none", "zbv", 2), ("gradients", "interleaved", 2), ("full", "1f1b", 4),
                        ("none", "1f1b", 1)],
               "gradients": [("gradients", "1f1b", 2), ("optimizer", "zbv", 2)],
               "optimizer": [("optimizer", "1f1b", 2), ("full", "zbv", 2)],
               "none": [("none", "1f1b", 2), ("full", "interleaved", 2)]}
    out: dict = {}
    for src, dsts in targets.items():
        pipe = build(src)
        for b in batches[:2]:
            pipe.train_step(b)
        path = pipe.save_checkpoint(Path(folder) / src)
        pipe.train_step(batches[2])
        straight = {n: whole(p) for n, p in pipe.named_parameters()}
        pipe.close()
        if rank == 0:
            full = load_full(path)
            out[("load_full", src)] = max(((full[n] - after[1][n]).abs().max() / after[1][n].abs().max()).item()
                                          for n in after[1])
        for dst, schedule, data in dsts:
            pipe = build(dst, schedule, data)
            pipe.load_checkpoint(path)
            pipe.train_step(batches[2])
            got = {n: whole(p) for n, p in pipe.named_parameters()}
            same = (dst, schedule, data) == (src, "1f1b", 2)
            out[(src, dst, schedule, data)] = {"err": rel(got, after[2]), "same": same,
                                               "bitwise": same and all(torch.equal(got[n], straight[n]) for n in got)}
            pipe.close()
    return out
