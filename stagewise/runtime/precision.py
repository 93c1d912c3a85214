"""Mixed precision: how a stage's forward runs and what crosses a stage boundary, and fp16 loss scaling.

`Precision("bf16" | "fp16")` runs each stage's forward (and recompute) under `torch.autocast` for
the stage's device type and casts the floating-point outputs it sends to the low dtype (a cast in
the graph, so the gradients coming back travel in it too): half the bytes between stages. Weights
and optimizer state stay fp32. "fp32" changes nothing. `LossScaler` is GradScaler's dynamic scale
for a whole pipeline: the last stage seeds its backward with the scale; the `LossScaling` step part
unscales, finds an inf/NaN on any stage or replica (one all-reduce), skips the step everywhere and
backs off, or grows the scale after `growth_interval` clean steps.
"""

from __future__ import annotations

import contextlib
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

    @property
    def bytes_per_element(self) -> int:
        """Bytes of a floating-point activation sent between stages."""
        return torch.empty(0, dtype=self.dtype).element_size()

    def autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        if not self.low:
            return contextlib.nullcontext()
        return torch.autocast(device_type=device.type, dtype=self.dtype)

    def cast_outputs(self, out: Any) -> Any:
        """Floating-point float32 outputs in the low dtype (what is sent to the next stage)."""
        if not self.low:
            return out
        return map_tensors(out, lambda t: t.to(self.dtype) if t.dtype == torch.float32 else t)


class LossScaler:
    """Dynamic loss scaling as `torch.amp.GradScaler` does it (same defaults), shared by a pipeline's ranks:
    every rank keeps the same state because every rank sees the same inf/NaN verdict."""

    def __init__(self, init_scale: float = 2.0**16, growth_factor: float = 2.0, backoff_factor: float = 0.5,
                 growth_interval: int = 2000):
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.good_steps = growth_interval, 0

    def update(self, found_inf: bool) -> None:
        if found_inf:
            self.scale *= self.backoff_factor
            self.good_steps = 0
        else:
            self.good_steps += 1
            if self.good_steps == self.growth_interval:
                self.scale *= self.growth_factor
                self.good_steps = 0

    def state_dict(self) -> dict[str, Any]:
        return {"scale": self.scale, "growth_factor": self.growth_factor, "backoff_factor": self.backoff_factor,
                "growth_interval": self.growth_interval, "good_steps": self.good_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.scale, self.good_steps = float(state["scale"]), int(state["good_steps"])
        self.growth_factor, self.backoff_factor = state["growth_factor"], state["backoff_factor"]
        self.growth_interval = int(state["growth_interval"])
