"""Checkpoints: one file per stage and per optimizer, each written atomically, plus meta.json."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn


def atomic_save(obj: Any, path: Path) -> None:
    """torch.save to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save(folder: str | os.PathLike[str], stages: dict[int, tuple[tuple[int, int], nn.Module]],
         optimizers: dict[int, torch.optim.Optimizer], meta: dict[str, Any] | None) -> None:
    """`stages`: stage -> ((first layer, end layer), module); `meta` is written by the process that has it."""
    root = Path(folder)
    root.mkdir(parents=True, exist_ok=True)
    for s, ((lo, hi), module) in stages.items():
        atomic_save({"stage": s, "layers": [lo, hi], "state_dict": module.state_dict()}, root / f"stage-{s:03d}.pt")
    for d, opt in optimizers.items():
        atomic_save(opt.state_dict(), root / f"optimizer-device-{d:03d}.pt")
    if meta is not None:
        tmp = root / "meta.json.tmp"
        tmp.write_text(json.dumps(meta, indent=2, default=str))
        os.replace(tmp, root / "meta.json")


def load(folder: str | os.PathLike[str], balance: list[int], modules: dict[int, nn.Module],
         optimizers: dict[int, torch.optim.Optimizer]) -> dict[str, Any]:
    """Load the stages in `modules` (and the optimizers) from `folder`; returns meta.json."""
    root = Path(folder)
    meta = json.loads((root / "meta.json").read_text())
    if meta["balance"] != balance:
        raise ValueError(f"checkpoint {root} was written with balance {meta['balance']}, this pipeline "
                         f"uses {balance}; build the Pipeline with partition={meta['balance']}")
    for s, module in modules.items():
        module.load_state_dict(torch.load(root / f"stage-{s:03d}.pt", weights_only=True)["state_dict"])
    for d, opt in optimizers.items():
        path = root / f"optimizer-device-{d:03d}.pt"
        if path.exists():
            opt.load_state_dict(torch.load(path, weights_only=True))
    return meta
