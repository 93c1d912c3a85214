"""DeepSpeed's learning-rate schedules (`deepspeed.runtime.lr_schedules`), with DeepSpeed's formulas.

The engine steps the schedule once after every applied optimizer step (not after a skipped one),
so step k of training runs at the learning rate the schedule gave after k - 1 steps; construction
sets the first step's rate. State is `last_batch_iteration`, as in DeepSpeed.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any

import torch

WARMUP_LOG_RATE, WARMUP_LINEAR_RATE = "log", "linear"


def _update_lr(groups: list[dict[str, Any]], lrs: list[float]) -> list[float]:
    for group, lr in zip(groups, lrs):
        group["lr"] = lr
    return [group["lr"] for group in groups]


def _per_group(optimizer: torch.optim.Optimizer, value: float | list[float] | tuple[float, ...], name: str
               ) -> list[float]:
    if isinstance(value, (list, tuple)):
        if len(value) != len(optimizer.param_groups):
            raise ValueError(f"expected {len(optimizer.param_groups)} values for {name}, got {list(value)}")
        return list(value)
    return [value] * len(optimizer.param_groups)


def _check_type(warmup_type: str) -> str:
    if warmup_type not in (WARMUP_LOG_RATE, WARMUP_LINEAR_RATE):
        raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
    return warmup_type


class _Schedule(ABC):
    """What DeepSpeed's three schedules share; each gives its `get_lr`."""

    optimizer: torch.optim.Optimizer
    last_batch_iteration: int
    _last_lr: list[float]

    @abstractmethod
    def get_lr(self) -> list[float]:
        """The learning rate of every parameter group at `last_batch_iteration`."""

    def get_last_lr(self) -> list[float]:
        return self._last_lr

    def step(self, last_batch_iteration: int | None = None) -> None:
        if last_batch_iteration is None:
            last_batch_iteration = self.last_batch_iteration + 1
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _update_lr(self.optimizer.param_groups, self.get_lr())

    def state_dict(self) -> dict[str, Any]:
        return {"last_batch_iteration": self.last_batch_iteration}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        self.last_batch_iteration = sd["last_batch_iteration"]


class WarmupLR(_Schedule):
    """From `warmup_min_lr` to `warmup_max_lr` (default: the optimizer's lr) over `warmup_num_steps` steps,
    logarithmically (gamma = log(t + 1) / log(N)) or linearly (t / N), then constant."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_min_lr: float | list[float] = 0.0,
                 warmup_max_lr: float | list[float] | None = None, warmup_num_steps: int = 1000,
                 warmup_type: str = WARMUP_LOG_RATE, last_batch_iteration: int = -1):
        self.optimizer = optimizer
        if warmup_max_lr is None:
            warmup_max_lr = optimizer.param_groups[0]["lr"]
        self.min_lrs = _per_group(optimizer, warmup_min_lr, "min_lr")
        self.max_lrs = _per_group(optimizer, warmup_max_lr, "max_lr")
        self.delta_lrs = [big - small for big, small in zip(self.max_lrs, self.min_lrs)]
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.warmup_type = _check_type(warmup_type)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.last_batch_iteration = last_batch_iteration
        self._last_lr = _update_lr(optimizer.param_groups, self.get_lr())

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return self.min_lrs
        gamma = self._get_gamma()
        return [lo + delta * gamma for lo, delta in zip(self.min_lrs, self.delta_lrs)]

    def _warmup_gamma(self) -> float:
        if self.warmup_type == WARMUP_LOG_RATE:
            return self.inverse_log_warm_up * math.log(self.last_batch_iteration + 1)
        return self.last_batch_iteration / self.warmup_num_steps

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return 1.0


class WarmupDecayLR(WarmupLR):
    """WarmupLR, then a linear decay to 0 at `total_num_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_lr: float = 0.0,
                 warmup_max_lr: float | None = 0.001, warmup_num_steps: int = 1000, warmup_type: str = WARMUP_LOG_RATE,
                 last_batch_iteration: int = -1):
        self.total_num_steps = total_num_steps
        super().__init__(optimizer, warmup_min_lr, warmup_max_lr, warmup_num_steps, warmup_type, last_batch_iteration)

    def _get_gamma(self) -> float:
        if self.last_batch_iteration < self.warmup_num_steps:
            return self._warmup_gamma()
        return max(0.0, float(self.total_num_steps - self.last_batch_iteration) /
                   float(max(1.0, self.total_num_steps - self.warmup_num_steps)))


class WarmupCosineLR(_Schedule):
    """A ratio of the optimizer's own lr: from `warmup_min_ratio` to 1 over `warmup_num_steps`, then a cosine down
    to `cos_min_ratio` at `total_num_steps`."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_num_steps: int, warmup_min_ratio: float = 0.0,
                 warmup_num_steps: int = 1000, cos_min_ratio: float = 0.0001, warmup_type: str = WARMUP_LOG_RATE,
                 last_batch_iteration: int = -1):
        self.optimizer = optimizer
        self.total_num_steps, self.last_batch_iteration = total_num_steps, last_batch_iteration
        self.cos_min_ratio, self.warmup_min_ratio = cos_min_ratio, warmup_min_ratio
        self.warmup_type = _check_type(warmup_type)
        self.warmup_num_steps = max(2, warmup_num_steps)
        self.inverse_log_warm_up = 1.0 / math.log(self.warmup_num_steps)
        self.org_lrs = [group["lr"] for group in optimizer.param_groups]
        self._last_lr = _update_lr(optimizer.param_groups, self.get_lr())

    def get_lr_ratio(self) -> float:
        t = self.last_batch_iteration
        if t < self.warmup_num_steps:
            ratio = (self.inverse_log_warm_up * math.log(t + 1) if self.warmup_type == WARMUP_LOG_RATE
                     else t / self.warmup_num_steps)
            return self.warmup_min_ratio + ratio * (1.0 - self.warmup_min_ratio)
        real_last_step = t - self.warmup_num_steps + 1
        real_total_steps = self.total_num_steps - self.warmup_num_steps
        ratio = (1 + math.cos(math.pi * real_last_step / real_total_steps)) / 2
        return max(0.0, self.cos_min_ratio + (1.0 - self.cos_min_ratio) * ratio)

    def get_lr(self) -> list[float]:
        if self.last_batch_iteration < 0:
            return [0.0] * len(self.org_lrs)
        ratio = self.get_lr_ratio()
        return [lr * ratio for lr in self.org_lrs]


SCHEDULES = {"WarmupLR": WarmupLR, "WarmupDecayLR": WarmupDecayLR, "WarmupCosineLR": WarmupCosineLR}

__all__ = ["SCHEDULES", "WarmupCosineLR", "WarmupDecayLR", "WarmupLR"]
