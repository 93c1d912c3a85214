"""Mixed precision: how a stage's forward runs and what crosses a stage boundary, and fp16 loss scaling.

`Precision("bf16" | "fp16")` runs each stage's forward (and recompute) under `torch.autocast` for
the stage's device type and casts the floating-point outputs it sends to the low dtype (a cast in
the graph, so the gradients coming back travel in it too): half the bytes between stages. Weights
and optimizer state stay fp32. "fp32" changes nothing. `LossScaler` is GradScaler's dynamic scale
for a whole pipeline: the last stage seeds its backward with the scale; the `LossScaling` step part
unscales and finds an inf/NaN gradient on any stage or replica (one all-reduce); the `NonFiniteGuard`
(`stagewise.runtime.guards`) then tells a gradient overflow from a non-finite loss. A gradient overflow
skips the step everywhere and backs the scale off; `growth_interval` clean steps grow it. A non-finite
loss is not an overflow (no scale makes it finite): the scale stays, and the pipeline's `on_nonfinite`
policy raises or skips, as DeepSpeed does. The scaler gives up, as DeepSpeed's `min_loss_scale`, with an
error naming where the overflow first appeared, when an overflow comes at `min_scale` (default 1: the
scale never falls below it) or after `max_consecutive_skips` (default 20) overflowing steps in a row:
gradients that overflow at every scale would otherwise skip every step forever.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from stagewise.tree import map_tensors

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


class Precision:
    """The compute precision of the stages' forwards."""

    def __init__(self, name: str = "fp32"):
        if name not in DTYPES:
            raise ValueError(f"precision must be one of {', '.join(DTYPES)}, got {name!r}")
        self.name, self.dtype = name, DTYPES[name]

    @property
    def low(self) -> bool:
        return self.dtype != torch.float32

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.low:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def cast_outputs(self, out: Any) -> Any:
        """Floating-point float32 outputs in the low dtype (what is sent to the next stage)."""
        if not self.low:
            return out
        return map_tensors(out, lambda t: t.to(self.dtype) if t.dtype == torch.float32 else t)


class LossScaleError(RuntimeError):
    """The loss scaler gave up: the gradients overflow at its minimum scale or step after step."""


SCALER_OPTIONS = ("init_scale", "growth_factor", "backoff_factor", "growth_interval", "min_scale",
                  "max_consecutive_skips")


class LossScaler:
    """Dynamic loss scaling as `torch.amp.GradScaler` does it (same defaults), shared by a pipeline's ranks:
    every rank keeps the same state because every rank sees the same inf/NaN verdict. Bounded, as DeepSpeed's:
    an overflow at `min_scale`, or the overflow after `max_consecutive_skips` skipped steps in a row, raises
    `LossScaleError` instead of skipping once more (0: any overflow raises). `skips` counts the steps skipped
    in a row."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000, min_scale: float = 1.0, max_consecutive_skips: int = 20):
        _check_scaler(init_scale, growth_factor, backoff_factor, growth_interval, min_scale, max_consecutive_skips)
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0
        self.min_scale, self.max_consecutive_skips, self.skips = float(min_scale), max_consecutive_skips, 0

    @classmethod
    def options(cls, given: dict[str, Any] | None, precision: str) -> dict[str, Any]:
        """`Pipeline(loss_scale=...)` checked: the keyword arguments of every rank's scaler (a bad key or value,
        or options without fp16, raise ValueError before anything runs)."""
        if given is None:
            return {}
        if not isinstance(given, dict):
            raise ValueError(f"loss_scale must be a dict of loss scaler options ({', '.join(SCALER_OPTIONS)}), got "
                             f"{type(given).__name__}")
        if precision != "fp16":
            raise ValueError(f"loss_scale is for precision='fp16' (the only precision that scales the loss), got "
                             f"precision={precision!r}")
        unknown = sorted(set(given) - set(SCALER_OPTIONS))
        if unknown:
            raise ValueError(f"loss_scale has unknown option(s) {', '.join(map(repr, unknown))}; the options are "
                             f"{', '.join(SCALER_OPTIONS)}")
        cls(**given)  # checks the values
        return dict(given)

    def update(self, found_inf: bool) -> None:
        """After a step: a clean one counts towards growth; an overflow backs off (not below `min_scale`), or
        raises `LossScaleError` when the scale is already at its minimum or `max_consecutive_skips` steps in a row
        were skipped already (the state is then left as it was)."""
        if not found_inf:
            self.skips = 0
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0
            return
        if self.skips >= self.max_consecutive_skips:
            raise LossScaleError(f"the gradients overflowed in {self.skips + 1} steps in a row (max_consecutive_skips="
                                 f"{self.max_consecutive_skips}; the scale fell to {self.scale:g})")
        if self.scale <= self.min_scale:
            raise LossScaleError(f"the gradients overflow even at loss scale {self.scale:g}, the minimum (min_scale="
                                 f"{self.min_scale:g}), after {self.skips} skipped steps in a row")
        self.scale = max(self.scale * self.backoff_factor, self.min_scale)
        self.good_steps = 0
        self.skips += 1

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "good_steps": self.good_steps, "min_scale": self.min_scale,
                "max_consecutive_skips": self.max_consecutive_skips, "skips": self.skips}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Loads what `state_dict` wrote, also from before `min_scale`, `max_consecutive_skips` and `skips`
        existed (those then keep this scaler's settings, and no skip is counted)."""
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = int(state["growth_interval"])
        self.min_scale = float(state.get("min_scale", self.min_scale))
        self.max_consecutive_skips = int(state.get("max_consecutive_skips", self.max_consecutive_skips))
        self.skips = int(state.get("skips", 0))


def _check_scaler(init_scale: Any, growth_factor: Any, backoff_factor: Any, growth_interval: Any, min_scale: Any,
                  max_consecutive_skips: Any) -> None:
    def number(x: Any) -> bool:
        return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x)

    def integer(x: Any, low: int) -> bool:
        return not isinstance(x, bool) and isinstance(x, int) and x >= low

    problems = []
    if not number(min_scale) or min_scale <= 0:
        problems.append(f"min_scale must be a finite number > 0, got {min_scale!r}")
    elif not number(init_scale) or init_scale < min_scale:
        problems.append(f"init_scale must be a finite number >= min_scale ({min_scale:g}), got {init_scale!r}")
    if not number(growth_factor) or growth_factor <= 1:
        problems.append(f"growth_factor must be a finite number > 1, got {growth_factor!r}")
    if not number(backoff_factor) or not 0 < backoff_factor < 1:
        problems.append(f"backoff_factor must be a number between 0 and 1 (exclusive), got {backoff_factor!r}")
    if not integer(growth_interval, 1):
        problems.append(f"growth_interval must be an integer >= 1 (clean steps before the scale grows), got "
                        f"{growth_interval!r}")
    if not integer(max_consecutive_skips, 0):
        problems.append(f"max_consecutive_skips must be an integer >= 0 (overflowing steps skipped in a row before "
                        f"the scaler gives up), got {max_consecutive_skips!r}")
    if problems:
        raise ValueError("loss scaler: " + "; ".join(problems))
