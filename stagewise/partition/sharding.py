"""What sharded data parallelism (`Pipeline(shard=...)`, `stagewise.runtime.sharding`) does to a device's memory,
per parameter of its stages, for the planner's memory model.

fp32 Adam holds 4 bytes of weight, 4 of gradient and 8 of optimizer state per parameter (16, `bytes_per_param`'s
default). Split over D replicas, at the peak of a step (the activations' peak falls inside the step):

- "none": 16.
- "optimizer" (ZeRO-1): weights and gradients whole, the optimizer state split: 4 + 4 + 8/D.
- "gradients" (ZeRO-2) and "full" (ZeRO-3): the shards of weights, gradients and state (16/D), plus the whole
  weights a gathered stage holds from its first forward to its last backward (the all-gather buffers: 4) and its
  whole gradients until their reduce-scatter (4): 8 + 16/D. Between steps "full" holds only 16/D and
  "gradients" 4 + 16/D, but the step's peak is what a memory limit bounds. (With precision="bf16" the gathered
  weights are bf16, and the micro-batch gradients bf16 beside their fp32 sum: the same 8.)
"""

from __future__ import annotations

MODES = ("none", "optimizer", "gradients", "full")


def bytes_per_param(shard: str, data_parallel: int, weight: float = 4.0, grad: float = 4.0,
                    state: float = 8.0) -> float:
    """Peak bytes per parameter of a device's stages under `shard` with `data_parallel` replicas (see the module);
    `weight`, `grad`, `state`: bytes of one whole parameter's weight, gradient and optimizer state."""
    if shard not in MODES:
        raise ValueError(f"shard must be one of {', '.join(map(repr, MODES))}, got {shard!r}")
    D = max(int(data_parallel), 1)
    if shard == "none" or D == 1:
        return weight + grad + state
    if shard == "optimizer":
        return weight + grad + state / D
    return weight + grad + (weight + grad + state) / D


def between_steps(shard: str, data_parallel: int, weight: float = 4.0, grad: float = 4.0, state: float = 8.0) -> float:
    """Bytes per parameter held between steps (what `Sharding.held_bytes` measures)."""
    D = max(int(data_parallel), 1)
    split = {"none": 0.0, "optimizer": state, "gradients": grad + state, "full": weight + grad + state}[shard]
    whole = weight + grad + state - split
    return whole + split / D + (weight / D if shard == "gradients" and D > 1 else 0.0)
