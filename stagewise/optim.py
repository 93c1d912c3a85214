"""AdamW with GPT-2's weight-decay groups and a learning-rate schedule on torch's own `LambdaLR`.

`adamw(lr, weight_decay)` is a `Pipeline(optimizer=...)` factory: every rank's optimizer decays its matrices
(linear and embedding weights, `ndim >= 2`) and not its biases and norm weights, as GPT-2 training does.
`LRSchedule` is the factor of the peak learning rate at each step (linear warm-up, then constant, cosine or linear
decay to `min_lr`), a closed form of the step number, so a resumed run computes the same rates bit for bit;
`schedulers(pipe, ...)` puts one `torch.optim.lr_scheduler.LambdaLR` on each of the process's optimizers, and
`scheduler_state` / `load_scheduler_state` carry it through a checkpoint's `extra`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any

import torch

LR_SCHEDULES = ("constant", "cosine", "linear")


def decay_groups(params: Iterable[torch.nn.Parameter], weight_decay: float) -> list[dict[str, Any]]:
    """Parameter groups: `weight_decay` on matrices (ndim >= 2), none on biases and norm weights (ndim < 2); an
    empty group is left out."""
    params = list(params)
    groups = [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
              {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(lr: float, weight_decay: float = 0.0, **kwargs: Any) -> Callable[[list[torch.nn.Parameter]],
                                                                           torch.optim.AdamW]:
    """A `Pipeline(optimizer=...)` factory: `torch.optim.AdamW` over the rank's parameters in `decay_groups`."""
    def build(params: list[torch.nn.Parameter]) -> torch.optim.AdamW:
        return torch.optim.AdamW(decay_groups(params, weight_decay), lr=lr, **kwargs)

    return build


class LRSchedule:
    """The factor of the peak rate for the step after `i` scheduler steps (i = 0: the first step): `warmup` steps
    rising linearly to 1 ((i + 1) / warmup), then `kind`: "constant" (1), "cosine" or "linear" decay from 1 to
    `min_ratio` at the last of `total` steps (and `min_ratio` past it). A callable object, not a function, so
    that `LambdaLR.state_dict()` saves its settings."""

    def __init__(self, kind: str, total: int, warmup: int = 0, min_ratio: float = 0.0):
        if kind not in LR_SCHEDULES:
            raise ValueError(f"unknown learning-rate schedule {kind!r}; choose one of {', '.join(LR_SCHEDULES)}")
        self.kind, self.total, self.warmup, self.min_ratio = kind, int(total), int(warmup), float(min_ratio)

    def __call__(self, i: int) -> float:
        if i < self.warmup:
            return (i + 1) / self.warmup
        if self.kind == "constant":
            return 1.0
        progress = min(1.0, (i - self.warmup) / max(1, self.total - 1 - self.warmup))
        if self.kind == "cosine":
            return self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0 - (1.0 - self.min_ratio) * progress


def schedulers(optimizers: Iterable[torch.optim.Optimizer], schedule: LRSchedule) -> list[Any]:
    """One `LambdaLR` per optimizer (each optimizer's rate is now the first step's)."""
    return [torch.optim.lr_scheduler.LambdaLR(opt, schedule) for opt in optimizers]


def step_schedulers(scheds: list[Any]) -> None:
    """After a training step: the next step's rate. A step skipped (a NaN, an fp16 overflow) still counts, so the
    rate stays a function of the step number (torch's warning about a scheduler stepping first is hushed)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected call of `lr_scheduler.step", category=UserWarning)
        for s in scheds:
            s.step()


def current_lr(scheds: list[Any]) -> float | None:
    """The rate of the next step (None without a scheduler)."""
    return scheds[0].get_last_lr()[0] if scheds else None


def scheduler_state(scheds: list[Any]) -> dict[str, Any] | None:
    """The state to checkpoint: the first scheduler's `state_dict()` (JSON-able; every rank's is the same)."""
    return scheds[0].state_dict() if scheds else None


def load_scheduler_state(scheds: list[Any], state: dict[str, Any] | None, lr: float) -> None:
    """Continue from a checkpointed state: the step count is the saved one; the peak rate `lr` and the schedule are
    the ones given now (the same run's: the same rates, bit for bit), and each optimizer's rate is set to the
    step's, as `LambdaLR` computes it. Without a saved state (a checkpoint written before schedules), nothing."""
    if not state:
        return
    for s in scheds:
        n = len(s.optimizer.param_groups)
        fn = s.lr_lambdas[0]
        s.load_state_dict({**state, "base_lrs": [lr] * n, "lr_lambdas": [None] * n,
                           "_last_lr": [lr * fn(state["last_epoch"])] * n})
        for group in s.optimizer.param_groups:
            group["initial_lr"] = lr
            group["lr"] = lr * fn(s.last_epoch)
