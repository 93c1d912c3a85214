"""Checkpoints of sharded runs (`Pipeline(shard="optimizer" | "gradients" | "full")`, `stagewise.runtime.sharding`).

Weights are still written whole, by name, to the safetensors files (what `load_full` and `stagewise export` read):
each sharded parameter is gathered once over its data-parallel group (`DTensor.full_tensor()`, one parameter at
a time) and the first replica writes it as before. The optimizer state, the largest part (Adam: 8 bytes per
parameter), is split over the replicas and is written where it lies with torch.distributed.checkpoint (DCP,
into `optimizer-dcp/` of the checkpoint folder, checksummed by the manifest like every other file): each rank
writes its shards (FSDP2's DTensors) or the whole states of the parameters it steps (ZeroRedundancyOptimizer),
keyed `"<unsplit name>/<state key>"`. Loading asks DCP for exactly the pieces this rank's optimizer holds, so a
checkpoint loads into any other P, D, schedule or shard mode (DCP re-shards), and a checkpoint of an unsharded run
(its whole optimizer state in `optimizer-rankNNNNN.pt`) loads into a sharded one (each rank keeps its shard).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch

T = TypeVar("T")
DCP_FOLDER = "optimizer-dcp"
SEP = "/"  # between a parameter's name and its state key in DCP's keys


def sharding_of(model: Any) -> Any | None:
    """The model's `Sharding` when its run shards anything (shard != "none"), else None."""
    sharding = getattr(model, "sharding", None)
    return sharding if sharding is not None and sharding.mode != "none" else None


def is_dtensor(t: Any) -> bool:
    return hasattr(t, "full_tensor") and hasattr(t, "device_mesh")


def gathered(entries: list[tuple[Any, torch.Tensor]]) -> list[tuple[Any, torch.Tensor]]:
    """`entries` with every DTensor gathered whole (a collective of its data group: every replica calls this
    with its stages' entries, in the same order)."""
    return [(e, t.full_tensor() if is_dtensor(t) else t) for e, t in entries]


def copy_into(t: torch.Tensor, whole: torch.Tensor) -> None:
    """Load the whole tensor `whole` into `t`: itself, or a DTensor's own shard of it (no communication)."""
    if is_dtensor(t):
        t.to_local().copy_(shard_of(whole.to(t.dtype), t).to_local())
    else:
        t.copy_(whole)


def shard_of(whole: torch.Tensor, like: Any) -> Any:
    """`whole` split as the DTensor `like` is (each rank slices its own part: no communication)."""
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(whole, like.device_mesh, like.placements, src_data_rank=None)


def local_optimizer(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer that holds this rank's state: a ZeroRedundancyOptimizer's local one, or `opt`."""
    return getattr(opt, "optim", None) or opt


def optimizer_class(opt: torch.optim.Optimizer) -> str:
    """The class a checkpoint records: the wrapped one for a ZeroRedundancyOptimizer (so that shard modes mix)."""
    return type(local_optimizer(opt)).__name__


def groups_payload(opt: torch.optim.Optimizer, names: dict[int, str]) -> dict[str, Any]:
    """The optimizer's class and parameter groups (hyper-parameters, member names), without state (DCP holds it)."""
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [names[id(p)] for p in g["params"]]}
              for g in opt.param_groups]
    return {"class": optimizer_class(opt), "param_groups": groups, "state": {}}


def save_state(folder: Path, opt: torch.optim.Optimizer | None, names: dict[int, str]) -> None:
    """Write this rank's optimizer state with DCP into `folder` (a collective of every rank; None: nothing)."""
    import torch.distributed.checkpoint as dcp

    state: dict[str, Any] = {}
    if opt is not None:
        for p, s in local_optimizer(opt).state.items():
            for k, v in s.items():
                state[f"{names[id(p)]}{SEP}{k}"] = v
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(folder), sync_files=True))


def load_state(folder: Path, opt: torch.optim.Optimizer | None, names: dict[int, str]) -> dict[str, dict[str, Any]]:
    """This rank's optimizer state, by parameter name, read with DCP from `folder` in the layout its parameters
    have (a DTensor's shard, or whole); a collective of every rank (None: reads nothing)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = dcp.FileSystemReader(str(folder))
    saved = reader.read_metadata().state_dict_metadata
    wanted: dict[str, Any] = {}
    params = {} if opt is None else {names[id(p)]: p for g in local_optimizer(opt).param_groups for p in g["params"]}
    for key, meta in saved.items():
        name, _, _ = key.rpartition(SEP)
        p = params.get(name)
        if p is None:
            continue
        if isinstance(meta, TensorStorageMetadata):
            dtype = meta.properties.dtype
            same = tuple(meta.size) == tuple(p.shape)
            wanted[key] = torch.empty_like(p, dtype=dtype) if same else torch.empty(tuple(meta.size), dtype=dtype)
        else:
            wanted[key] = None  # a non-tensor value: DCP puts the saved object here
    dcp.load(wanted, storage_reader=reader)
    out: dict[str, dict[str, Any]] = {}
    for key, v in wanted.items():
        name, _, k = key.rpartition(SEP)
        out.setdefault(name, {})[k] = v
    return out


def shard_state(opt: torch.optim.Optimizer, names: dict[int, str], state: dict[str, dict[str, Any]]) -> None:
    """Whole state tensors (from an unsharded run's checkpoint) split as their DTensor parameters are, in place."""
    for g in local_optimizer(opt).param_groups:
        for p in g["params"]:
            s = state.get(names[id(p)])
            if s is None or not is_dtensor(p):
                continue
            for k, v in s.items():
                if isinstance(v, torch.Tensor) and not is_dtensor(v) and tuple(v.shape) == tuple(p.shape):
                    s[k] = shard_of(v.to(p.device), p)


def sync_groups(opt: torch.optim.Optimizer) -> None:
    """After loading a ZeroRedundancyOptimizer's local optimizer: its hyper-parameters back to the wrapper's groups
    (which it copies to the local one at every step)."""
    inner = local_optimizer(opt)
    if inner is opt:
        return
    for outer, local in zip(opt.param_groups, inner.param_groups):
        outer.update({k: v for k, v in local.items() if k != "params"})


def on_shards(model: Any, fn: Callable[[int], T], rank: int) -> T:
    """`fn(rank)` while the module holds its shards: a "gradients" run keeps whole copies between steps (bf16
    ones with precision="bf16"), so they are released first and gathered again after (what `fn` loaded)."""
    sharding = sharding_of(model)
    if sharding is None:
        return fn(rank)
    sharding.release(rank)
    try:
        return fn(rank)
    finally:
        sharding.regather(rank)
