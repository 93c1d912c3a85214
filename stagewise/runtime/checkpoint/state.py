"""What a checkpoint holds, by name: the entries of each rank's stages, who writes which tensor, the
optimizer state keyed by parameter name, and the random-number generators.

Names are the ones `nn.Sequential(*layers).state_dict()` gives: `"<layer index>.<name inside the layer>"`,
so they do not depend on the balance, the schedule or the number of ranks. A tensor held under several
names (a parameter shared by two layers, or a tie such as GPT-2's embedding and head, whose copies sit on
different stages) has one identity: it is stored once, under its name in the lowest layer, and its other
names are aliases.
"""

from __future__ import annotations

import base64
import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from stagewise.runtime.stage import Stage
from stagewise.runtime.ties import TIE_ATTR

PRECISION = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class Entry:
    """One tensor of a stage's state dict: its global name, identity, shape and dtype."""

    name: str
    identity: str  # "tie:<key>" for a tie, else "name:<first name>" (a shared Parameter's first name)
    shape: tuple[int, ...]
    dtype: str
    parameter: bool

    @property
    def layer(self) -> int:
        return int(self.name.split(".", 1)[0])


def identity(p: torch.Tensor, name: str, stage: Stage) -> str:
    key = getattr(p, TIE_ATTR, None)
    if key is not None:
        return f"tie:{key}"
    return f"name:{stage.names.get(id(p), name)}"


def stage_entries(stage: Stage) -> list[tuple[Entry, torch.Tensor]]:
    """Every tensor of the stage's state dict (parameters and persistent buffers, shared ones under each name)."""
    params = {id(p) for _, p in stage.module.named_parameters(remove_duplicate=False)}
    out = []
    for local, t in stage.module.state_dict(keep_vars=True).items():
        head, _, rest = local.partition(".")
        name = f"{int(head) + stage.layer_offset}.{rest}"
        is_param = id(t) in params
        ident = identity(t, name, stage) if is_param else f"name:{name}"
        out.append((Entry(name, ident, tuple(t.shape), str(t.dtype).removeprefix("torch."), is_param), t))
    return out


@dataclass
class Plan:
    """Decided alike on every rank from everyone's entries: the stored name of every identity, which rank
    writes it, the aliases, the ties, and which rank writes each identity's optimizer state."""

    stored: dict[str, str]  # identity -> stored name
    writer: dict[str, int]  # identity -> rank that writes the tensor
    aliases: dict[str, str]  # other name -> stored name
    ties: dict[str, str]  # tie key -> stored name
    order: list[str]  # every name (stored and aliases), in unsplit-model order
    optimizer_writer: dict[str, int]  # identity -> rank that writes its optimizer state


def make_plan(entries: dict[int, list[Entry]], optimized: dict[int, list[str]]) -> Plan:
    """`entries`: rank -> its entries (the ranks that save); `optimized`: rank -> identities its optimizer steps."""
    holders: dict[str, list[tuple[int, Entry]]] = {}
    position: dict[str, tuple[int, int]] = {}
    for rank in sorted(entries):
        for i, e in enumerate(entries[rank]):
            holders.setdefault(e.identity, []).append((rank, e))
            position.setdefault(e.name, (e.layer, i))
    stored, writer, aliases, ties = {}, {}, {}, {}
    for ident, held in holders.items():
        name = min((e.name for _, e in held), key=lambda n: position[n])
        stored[ident], writer[ident] = name, min(r for r, e in held if e.name == name)
        aliases.update({e.name: name for _, e in held if e.name != name})
        if ident.startswith("tie:"):
            ties[ident[4:]] = name
    opt_writer: dict[str, int] = {}
    for rank in sorted(optimized):
        for ident in optimized[rank]:
            opt_writer.setdefault(ident, rank)
    return Plan(stored, writer, aliases, ties, sorted(position, key=lambda n: position[n]), opt_writer)


def source_name(entry: Entry, manifest: dict[str, Any]) -> str | None:
    """The stored name this entry loads from: itself, through an alias, or through its tie key."""
    if entry.name in manifest["tensors"]:
        return entry.name
    if entry.name in manifest["aliases"]:
        return manifest["aliases"][entry.name]
    if entry.identity.startswith("tie:"):
        return manifest["ties"].get(entry.identity[4:])
    if entry.identity.startswith("name:") and entry.identity[5:] in manifest["tensors"]:
        return entry.identity[5:]
    return None


def precision(entries: list[Entry]) -> str:
    """'fp32', 'fp64', 'bf16', 'fp16' from the floating-point parameters' dtype, 'mixed' when they differ."""
    kinds = {PRECISION.get(getattr(torch, e.dtype), e.dtype) for e in entries
             if e.parameter and getattr(torch, e.dtype).is_floating_point}
    return kinds.pop() if len(kinds) == 1 else ("mixed" if kinds else "none")


# ---- optimizer state, keyed by name ----------------------------------------------------------------------

def optimizer_params(opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The optimizer's parameters in the order its state_dict numbers them."""
    return [p for g in opt.param_groups for p in g["params"]]


def optimizer_payload(opt: torch.optim.Optimizer, names: dict[int, str], write: set[str]) -> dict[str, Any]:
    """The optimizer's state_dict with parameters named instead of numbered: every group's hyper-parameters
    and member names; per-parameter state only for the names in `write` (each identity stored once)."""
    sd = opt.state_dict()
    index_name = {i: names[id(p)] for i, p in enumerate(optimizer_params(opt))}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": [index_name[i] for i in g["params"]]}
              for g in sd["param_groups"]]
    state = {index_name[i]: s for i, s in sd["state"].items() if index_name[i] in write}
    return {"class": type(opt).__name__, "param_groups": groups, "state": state}


def restore_optimizer(opt: torch.optim.Optimizer, names: dict[int, str],
                      groups: dict[str, dict[str, Any]], state: dict[str, dict[str, Any]]) -> None:
    """Load by name: `groups[name]` is the saved hyper-parameters of the group that held `name`, `state[name]`
    its per-parameter state. Each group takes the hyper-parameters of its first parameter's saved group."""
    sd = opt.state_dict()
    params = optimizer_params(opt)
    new_groups = []
    for g in sd["param_groups"]:
        first = next((groups[names[id(params[i])]] for i in g["params"] if names[id(params[i])] in groups), None)
        hyper = {k: v for k, v in (first or g).items() if k != "params"}
        new_groups.append({**g, **hyper, "params": g["params"]})
    new_state = {i: state[names[id(p)]] for i, p in enumerate(params) if names[id(p)] in state}
    opt.load_state_dict({"state": new_state, "param_groups": new_groups})


# ---- random-number generators -----------------------------------------------------------------------------

def _b64(t: torch.Tensor) -> str:
    return base64.b64encode(t.numpy().tobytes()).decode()


def _unb64(s: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)


def capture_rng(device: torch.device) -> dict[str, Any]:
    """This process's generators as JSON: torch's CPU one, the CUDA one of `device`, numpy's and Python's."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": _b64(torch.from_numpy(keys.astype(np.uint32).view(np.uint8))), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": {"version": version, "internal": _b64(torch.from_numpy(np.array(internal, np.uint32).view(np.uint8))),
                   "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        out["cuda"] = {"device": device.index, "state": _b64(torch.cuda.get_rng_state(device))}
    return out


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_unb64(state["torch"]))
    n = state["numpy"]
    keys = _unb64(n["keys"]).numpy().view(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["gauss"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in _unb64(p["internal"]).numpy().view(np.uint32)),
                     p["gauss_next"]))
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(_unb64(state["cuda"]["state"]), device)
