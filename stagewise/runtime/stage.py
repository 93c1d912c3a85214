"""One pipeline stage: its layers, its forward, and its backward whole or split into I and W."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call

from stagewise.partition.profile import SavedBytes
from stagewise.runtime.tree import flatten, map_tensors
from stagewise.runtime.versions import WeightVersions


def _grad_leaf(t: torch.Tensor) -> torch.Tensor:
    """A stage input cut from the previous stage's graph: a leaf that records its own gradient."""
    leaf = t.detach()
    if t.requires_grad and t.is_floating_point():
        leaf.requires_grad_(True)
    return leaf


@dataclass
class Pending:
    """What one (stage, micro-batch) keeps from its forward until its backward is done."""

    inputs: list[torch.Tensor]  # the input leaves that want a gradient
    roots: list[torch.Tensor]  # outputs that carry a gradient back (or the loss)
    saved_bytes: int = 0
    version: int | None = None  # the weight version the forward used (asynchronous schedules)
    weight_work: list = field(default_factory=list)  # set by backward_input for backward_weight


class Stage:
    """The layers of stage `index` run as one nn.Sequential; activations of each micro-batch are
    kept in a `Pending` until the backward frees them. Saved-activation bytes are counted with
    `saved_tensors_hooks` (weights excluded, each storage once)."""

    def __init__(self, index: int, layers: list[nn.Module], layer_offset: int, names: dict[int, str] | None = None):
        self.index = index
        self.names = names or {}
        self.module = nn.Sequential(*layers)
        self.layer_offset = layer_offset
        self.held_bytes = 0
        self.peak_bytes = 0
        self.versions: WeightVersions | None = None  # set for asynchronous schedules

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Names as in `nn.Sequential(*all_layers)`; a shared parameter keeps its first name."""
        out = []
        for name, p in self.module.named_parameters():
            head, _, rest = name.partition(".")
            out.append((self.names.get(id(p), f"{int(head) + self.layer_offset}.{rest}"), p))
        return out

    def forward(self, x: Any, first: bool, version: int | None = None) -> tuple[Any, Pending]:
        """Run the layers on one micro-batch; `x` comes from the data (first stage) or the previous stage."""
        if not first:
            x = map_tensors(x, _grad_leaf)
        inputs = [t for t in flatten(x)[0] if t.requires_grad]
        weights = self.versions.params(version) if self.versions is not None and version is not None else None
        counter = SavedBytes(list(self.module.parameters()) + list((weights or {}).values()))
        with counter.hooks():
            out = self.module(x) if weights is None else functional_call(self.module, weights, (x,))
        pending = Pending(inputs, [], counter.total, version if weights is not None else None)
        self.held_bytes += counter.total
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        return out, pending

    def release(self, pending: Pending) -> None:
        self.held_bytes -= pending.saved_bytes
        pending.saved_bytes = 0

    def backward(self, pending: Pending, grads: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Full backward: accumulate weight gradients, return the gradients of the inputs."""
        if pending.version is not None and self.versions is not None:
            return self._backward_version(pending, grads)
        if pending.roots:
            torch.autograd.backward(pending.roots, grads)
        result = [x.grad for x in pending.inputs]
        pending.roots = []
        self.release(pending)
        return result

    def _backward_version(self, pending: Pending, grads: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Backward with respect to the stashed version the forward used; its gradient goes to the masters."""
        versions, v = self.versions, pending.version
        weights = versions.tensors(v)
        n = len(pending.inputs)
        if pending.roots:
            got = torch.autograd.grad(pending.roots, pending.inputs + weights, grads, allow_unused=True)
            versions.accumulate(list(got[n:]))
            result = list(got[:n])
        else:
            result = [None] * n
        pending.roots = []
        versions.release(v)
        self.release(pending)
        return result

    def backward_input(self, pending: Pending, grads: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Gradients of the inputs only; what the weight gradient needs is kept for `backward_weight`.

        The autograd graph is cut where gradient stops flowing towards the inputs and only
        flows towards parameters; I asks autograd for the gradient at those edges too, and W
        later runs backward from them alone, so no part of the backward runs twice.
        """
        if not pending.roots:
            self.release(pending)
            return [None] * len(pending.inputs)
        if grads is None:
            grads = [torch.ones_like(r) for r in pending.roots]
        params = self.parameters()
        if not pending.inputs:
            pending.weight_work = [(pending.roots, grads, params)]
            pending.roots = []
            return []
        edges, root_idx, ok = _weight_boundary(pending.roots, pending.inputs, params)
        if not ok:  # shared sub-graphs would count twice: do everything now, W has nothing left
            torch.autograd.backward(pending.roots, grads, inputs=pending.inputs + params)
            result = [x.grad for x in pending.inputs]
            pending.roots = []
            return result
        targets = list(pending.inputs) + edges
        got = torch.autograd.grad(pending.roots, targets, grads, retain_graph=True, allow_unused=True)
        n = len(pending.inputs)
        edge_grads = list(got[n:])
        outs = [e for e, g in zip(edges, edge_grads) if g is not None]
        outs_grads = [g for g in edge_grads if g is not None]
        for i in root_idx:
            outs.append(pending.roots[i])
            outs_grads.append(grads[i])
        pending.weight_work = [(outs, outs_grads, params)] if outs else []
        pending.roots = []
        return list(got[:n])

    def backward_weight(self, pending: Pending) -> None:
        """Accumulate the weight gradients prepared by `backward_input`, then free the activations."""
        for outs, grads, params in pending.weight_work:
            got = torch.autograd.grad(outs, params, grads, allow_unused=True)
            for p, g in zip(params, got):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        pending.weight_work = []
        self.release(pending)


def _weight_boundary(roots: list[torch.Tensor], inputs: list[torch.Tensor], params: list[nn.Parameter]):
    """Edges where gradient leaves the input path for parameters: (edges, roots off the path, usable)."""
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    param_nodes = {get_gradient_edge(p).node for p in params}
    to_input: dict[Any, bool] = {}
    to_param: dict[Any, bool] = {}

    def reach(node: Any) -> tuple[bool, bool]:
        stack = [(node, False)]
        while stack:
            n, expanded = stack.pop()
            if n in to_input:
                continue
            children = [c for c, _ in n.next_functions if c is not None]
            if not expanded:
                stack.append((n, True))
                stack.extend((c, False) for c in children if c not in to_input)
                continue
            to_input[n] = n in input_nodes or any(to_input[c] for c in children)
            to_param[n] = n in param_nodes or any(to_param[c] for c in children)
        return to_input[node], to_param[node]

    edges: dict[tuple[int, int], GradientEdge] = {}
    off_path: list[int] = []
    for i, r in enumerate(roots):
        node = r.grad_fn
        if node is None:
            continue
        on_input, on_param = reach(node)
        if not on_input:
            if on_param:
                off_path.append(i)
            continue
    visited: set[Any] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None and to_input.get(r.grad_fn)]
    while stack:
        n = stack.pop()
        if n in visited:
            continue
        visited.add(n)
        for c, nr in n.next_functions:
            if c is None:
                continue
            if to_input[c]:
                stack.append(c)
            elif to_param[c]:
                edges[(id(c), nr)] = GradientEdge(c, nr)
    # Usable only if no boundary node reaches another one (that gradient would be counted twice).
    boundary = {e.node for e in edges.values()} | {roots[i].grad_fn for i in off_path}
    for node in boundary:
        seen: set[Any] = set()
        todo = [c for c, _ in node.next_functions if c is not None]
        while todo:
            c = todo.pop()
            if c in boundary:
                return [], [], False
            if c not in seen:
                seen.add(c)
                todo.extend(x for x, _ in c.next_functions if x is not None)
    return list(edges.values()), off_path, True
