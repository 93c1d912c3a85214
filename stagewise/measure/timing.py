"""What every measurement needs: the device's work finished before the clock is read, and tensor bytes."""

from __future__ import annotations

from typing import Any

import torch

from stagewise.tree import tensors_of


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA runs asynchronously; the CPU needs nothing)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def nbytes(tree: Any) -> int:
    """Bytes of every tensor in a tree (a tensor, or tuples, lists and dicts of them)."""
    return sum(t.numel() * t.element_size() for t in tensors_of(tree))
