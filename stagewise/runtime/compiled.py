"""Compiled stages: `Pipeline(compile=True)` runs each stage's module through `torch.compile`, in place.

The module's `forward` is replaced by its compiled self and the module stays where it was, so parameter names, state
dicts and checkpoints stay as they were (no `_orig_mod.` prefix, as `torch.compile(module)`'s wrapper adds).
`compile=True` takes the "inductor" backend where it can build kernels (a CUDA device, or a C++ compiler for the
CPU), else "aot_eager" (AOTAutograd's graphs run by eager kernels: exact against the uncompiled module, no compiler
needed); a string (or a backend callable) names the backend.
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import torch
from torch import nn


def backend_for(choice: Any, device: torch.device) -> Any:
    """The `torch.compile` backend for `compile=choice` on `device` (None: not compiled)."""
    if not choice:
        return None
    if isinstance(choice, str) or callable(choice):
        return choice
    if device.type == "cuda":
        return "inductor"
    compilers = [os.environ.get("CXX", ""), "g++", "c++", "clang++"]
    return "inductor" if any(c and shutil.which(c) for c in compilers) else "aot_eager"


def compile_module(module: nn.Module, choice: Any, device: torch.device) -> Any:
    """Compile `module`'s forward in place; returns the backend, None when not compiled."""
    backend = backend_for(choice, device)
    if backend is not None:  # the module's forward, compiled (`module.compile()` is not traced by torch 2.13 here)
        module.forward = torch.compile(module.forward, backend=backend)
    return backend
