"""One pipeline stage: its layers, its forward (keeping its activations or only its input), the recompute,
and its backward whole or split into I and W.

A recomputed forward replays its random numbers (`stagewise.runtime.rng`) under the autocast its first
run had; while it runs, `is_recomputing()` is True on its thread, so layers with side effects
(`DeferredBatchNorm`'s statistics) can skip them.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.func import functional_call

from stagewise.runtime.activations import SavedBytes
from stagewise.runtime.precision import Precision
from stagewise.runtime.rng import RandomDraws, replaying
from stagewise.runtime.versions import WeightVersions
from stagewise.tree import cut, describe, flatten, tensors_of

_local = threading.local()
_AUTOCAST_KINDS = ("cpu", "cuda")


def is_recomputing() -> bool:
    """True on a thread while it recomputes a forward that kept only its input (`Stage.recompute`)."""
    return getattr(_local, "recomputing", False)


@contextmanager
def _recomputing() -> Iterator[None]:
    before = is_recomputing()
    _local.recomputing = True
    try:
        yield
    finally:
        _local.recomputing = before


def _autocast_state() -> tuple[tuple[str, bool, torch.dtype], ...]:
    """The calling thread's autocast, per device type (a forward's, for its recompute)."""
    return tuple((kind, torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) for kind in _AUTOCAST_KINDS)


def _autocast_as(state: tuple[tuple[str, bool, torch.dtype], ...], stack: ExitStack) -> None:
    """Make the calling thread's autocast `state` inside `stack` (entering only what differs)."""
    for kind, enabled, dtype in state:
        if (torch.is_autocast_enabled(kind), torch.get_autocast_dtype(kind)) != (enabled, dtype):
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled))


class HeldBytes:
    """Saved-activation bytes held by the stages of one device, and their peak."""

    def __init__(self) -> None:
        self.held = self.peak = 0

    def add(self, nbytes: int) -> None:
        self.held += nbytes
        self.peak = max(self.peak, self.held)


@dataclass
class KeptForward:
    """What one (stage, micro-batch) keeps from its forward until its backward is done."""

    inputs: list[torch.Tensor]  # the input leaves that want a gradient
    roots: list[torch.Tensor]  # outputs that carry a gradient back (or the loss); empty until a recompute
    saved_bytes: int = 0
    version: int | None = None  # the weight version the forward used (asynchronous schedules)
    weight_work: list = field(default_factory=list)  # set by backward_input for backward_weight
    like: list[torch.Tensor] = field(default_factory=list)  # shapes and dtypes of the roots (receive buffers)
    loss: torch.Tensor | None = None  # the last stage's loss (detached)
    replay: tuple | None = None  # (input, weights, loss function, RNG start, autocast) of a forward keeping its input


class Stage:
    """The layers of stage `index` run as one nn.Sequential; activations of each micro-batch are
    kept in a `KeptForward` until the backward frees them. Saved-activation bytes are counted with
    `saved_tensors_hooks` (weights excluded, each storage once)."""

    def __init__(self, index: int, layers: list[nn.Module], layer_offset: int, names: dict[int, str] | None = None,
                 precision: Precision | None = None, recompute_every: int | None = None):
        self.index = index
        self.names = names or {}
        self.module = nn.Sequential(*layers)
        self.layer_offset = layer_offset
        self.held_bytes = 0
        self.peak_bytes = 0
        self.device_bytes = HeldBytes()  # shared by the stages of one device (see StageSet)
        self.versions: WeightVersions | None = None  # set for asynchronous schedules
        self.precision = precision or Precision()
        self.recompute_every = recompute_every  # groups of this many layers checkpointed inside the stage
        self.replays = False  # whether this process recomputes forwards (set by its owner)
        # Parameters the forward uses through stand-ins (name in `module` -> tensor), such as GPipe's per-call
        # replica of a parameter another partition holds; set and cleared by the owner.
        self.stand_ins: dict[str, torch.Tensor] = {}
        # What must hold before a forward runs, called first by it: a sharded stage waits for its gathered weights.
        self.before_forward: list[Callable[[], None]] = []

    def parameters(self) -> list[nn.Parameter]:
        return [p for p in self.module.parameters() if p.requires_grad]

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """Names as in `nn.Sequential(*all_layers)`; a shared parameter keeps its first name."""
        out = []
        for name, p in self.module.named_parameters():
            head, _, rest = name.partition(".")
            out.append((self.names.get(id(p), f"{int(head) + self.layer_offset}.{rest}"), p))
        return out

    def forward(self, x: Any, version: int | None = None, loss: Callable[[Any], torch.Tensor] | None = None,
                keep: bool = True, *, microbatch: int = 0, draws: RandomDraws | None = None,
                input_grad: bool = False) -> tuple[Any, KeptForward]:
        """Run the layers on micro-batch `microbatch`; `x` comes from the data (first stage) or the previous
        stage, and is cut from the graph that made it (the first stage's input gets no gradient unless
        `input_grad`). With `loss` (the last stage) the pending's root is `loss(output)`, else the output's
        tensors that carry a gradient. With `keep=False` only the input is kept: autograd's saved tensors
        are dropped and `recompute` rebuilds them before the backward. `draws`: how the run's forwards draw
        random numbers (default: from the running generators)."""
        for ready in self.before_forward:
            ready()
        x = cut(x, keep_grad=self.index > 0 or input_grad)
        inputs = [t for t in tensors_of(x) if t.requires_grad]
        weights = self.versions.params(version) if self.versions is not None and version is not None else None
        pending = KeptForward(inputs, [], 0, version if weights is not None else None)
        if self.stand_ins:
            weights = {**(weights or {}), **self.stand_ins}
        draws = draws or RandomDraws()
        drawing = draws.forward(self.index, microbatch, _device_of(x, self.module), self.replays, not keep)
        if keep:
            counter = SavedBytes(list(self.module.parameters()) + list((weights or {}).values()))
            with drawing, counter.hooks():
                out = self._run(x, weights, loss, pending)
            pending.saved_bytes = counter.total
        else:
            with drawing as start, torch.autograd.graph.saved_tensors_hooks(_drop, _dropped):
                out = self._run(x, weights, loss, pending)
            pending.replay = (x, weights, loss, start, _autocast_state())
            pending.saved_bytes = sum(t.numel() * t.element_size() for t in tensors_of(x))  # the input alone
            pending.like = [torch.empty((), dtype=t.dtype, device=t.device).expand(t.shape) for t in pending.roots]
            pending.roots = []  # the graph without its saved tensors is useless: dropped with the outputs' roots
        self._hold(pending.saved_bytes)
        return out, pending

    def _hold(self, nbytes: int) -> None:
        self.held_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        self.device_bytes.add(nbytes)

    def _run(self, x: Any, weights: dict | None, loss: Callable | None, pending: KeptForward) -> Any:
        with self.precision.autocast(_device_of(x, self.module)):
            if self.recompute_every is not None and weights is None:
                out = self._checkpointed(x)
            else:
                out = self.module(x) if weights is None else functional_call(self.module, weights, (x,))
            out = self.precision.cast_outputs(out)
            if loss is not None:
                value = loss(out)
                pending.loss = value.detach()
                pending.roots = [value] if value.requires_grad else []
            else:
                pending.roots = [t for t in tensors_of(out) if t.requires_grad]
        pending.like = pending.roots
        return out

    def no_gradient_path(self, out: Any, pending: KeptForward, microbatch: int) -> str:
        """Why this last stage's loss for `microbatch` does not require grad, as far as the stage can tell: where
        the path from the parameters to the loss is cut (for the error a training step raises then)."""
        head = (f"the loss of micro-batch {microbatch} does not require grad, so no parameter would get a gradient "
                "and the step would train nothing (plain PyTorch's loss.backward() raises here: 'element 0 of "
                "tensors does not require grad and does not have a grad_fn'): ")
        if any(t.requires_grad for t in tensors_of(out)):
            return head + (f"stage {self.index}'s output carries a gradient but loss_fn's result does not, so loss_fn "
                           "cut the graph (.item(), .detach(), torch.tensor(...), argmax or a comparison); compute "
                           "the loss from the output with differentiable operations")
        layers = list(self.module)
        first, last = self.layer_offset, self.layer_offset + len(layers) - 1
        if pending.inputs or self.parameters():
            why = "its input does" if pending.inputs else "its layers hold parameters that require grad"
            maker = f"layer {last} ({type(layers[-1]).__name__})" if layers else "its input"
            return head + (f"stage {self.index}'s output, {describe(flatten(out)[1])} from {maker}, carries no "
                           f"gradient although {why}: a layer of stage {self.index} (layers {first}-{last}) cuts "
                           "the gradient path: an integer output (argmax, a comparison, .long()), .detach(), or "
                           "work under torch.no_grad(). The last layer must return a floating-point tensor computed "
                           "from its input and the parameters")
        if self.index == 0:
            return head + ("no parameter of the model requires grad (every one is frozen: requires_grad=False), so "
                           "there is nothing to train: use eval_step, or set requires_grad=True on what to train")
        return head + (f"stage {self.index} (layers {first}-{last}) got no input that requires grad from stage "
                       f"{self.index - 1} and holds no parameter that does: the gradient path is cut at or before "
                       f"stage {self.index - 1} (a layer returning an integer or a detached tensor), or every "
                       "parameter of the model is frozen (requires_grad=False; then use eval_step, there is "
                       "nothing to train)")

    def _checkpointed(self, x: Any) -> Any:
        """Every group of `recompute_every` layers under torch.utils.checkpoint (non-reentrant, RNG replayed)."""
        from torch.utils.checkpoint import checkpoint

        layers = list(self.module)
        n = self.recompute_every or len(layers)
        for k in range(0, len(layers), n):
            group = nn.Sequential(*layers[k:k + n])
            x = checkpoint(group, x, use_reentrant=False) if torch.is_grad_enabled() else group(x)
        return x

    def recompute(self, pending: KeptForward) -> None:
        """Run a forward that kept only its input again, with its dropout masks, to rebuild what the backward
        needs (once: I and W of a split backward share it)."""
        if pending.replay is None:
            return
        x, weights, loss, start, autocast = pending.replay
        params = list(self.module.parameters()) + list((weights or {}).values())
        counter = SavedBytes(params)
        with ExitStack() as ambient:
            _autocast_as(autocast, ambient)
            with replaying(start), _recomputing(), torch.enable_grad(), counter.hooks():
                self._run(x, weights, loss, pending)
        pending.replay = None
        pending.saved_bytes += counter.total
        self._hold(counter.total)

    def release(self, pending: KeptForward) -> None:
        self._hold(-pending.saved_bytes)
        pending.saved_bytes = 0

    def backward(self, pending: KeptForward, grads: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Full backward: accumulate weight gradients, return the gradients of the inputs."""
        if pending.version is not None and self.versions is not None:
            return self._backward_version(pending, grads)
        if pending.roots:
            torch.autograd.backward(pending.roots, grads)
        result = [x.grad for x in pending.inputs]
        pending.roots = []
        self.release(pending)
        return result

    def _backward_version(self, pending: KeptForward, grads: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
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

    def backward_input(self, pending: KeptForward, grads: list[torch.Tensor] | None) -> list[torch.Tensor | None]:
        """Gradients of the inputs only; what the weight gradient needs is kept for `backward_weight`.

        Autograd is asked for the input gradients alone, so every node on the path from the
        outputs to the inputs computes only its input-side results (a linear layer's dX, not its
        dW). The nodes of that path that also lead to parameters ("intermediates") hand the
        gradient they receive to a hook; W later runs exactly those nodes again for their
        parameter-side results (dW, the LayerNorm affine gradients, ...) from the kept gradients,
        so no part of the backward runs twice and the weight GEMMs really move into W.
        """
        if not pending.roots:
            self.release(pending)
            return [None] * len(pending.inputs)
        if grads is None:
            grads = [torch.ones_like(r) for r in pending.roots]
        params = self.parameters()
        if not pending.inputs:
            pending.weight_work = [(list(pending.roots), list(grads), params, [])]
            pending.roots = []
            return []
        groups = _weight_groups(pending.roots, pending.inputs, params)
        captured: dict[Any, tuple] = {}
        handles = []
        try:
            for nodes, _, _ in groups:
                for node in nodes:
                    handles.append(node.register_prehook(_capture(captured, node)))
            got = torch.autograd.grad(pending.roots, pending.inputs, grads, retain_graph=True, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        work = []
        for nodes, root_idx, group_params in groups:
            outs: list[Any] = []
            outs_grads: list[torch.Tensor] = []
            kept = []
            for node in nodes:
                g = captured.get(node)
                if g is None:  # no gradient reached this node: nothing for its parameters either
                    continue
                kept.append((node, g))
                for i, x in enumerate(g):
                    if x is not None:
                        outs.append(GradientEdge(node, i))
                        outs_grads.append(x)
            for i in root_idx:
                outs.append(pending.roots[i])
                outs_grads.append(grads[i])
            if outs:
                # Several intermediates in one group may lie on one path; their kept gradients are already
                # complete, so W pins them (a pre-hook returning the kept value) rather than adding twice.
                work.append((outs, outs_grads, group_params, kept if len(kept) > 1 else []))
        pending.weight_work = work
        pending.roots = []
        return list(got)

    def backward_weight(self, pending: KeptForward) -> None:
        """Accumulate the weight gradients prepared by `backward_input`, then free the activations."""
        for outs, grads, params, pinned in pending.weight_work:
            handles = [node.register_prehook(_pin(g)) for node, g in pinned]
            try:
                # Into .grad through autograd's own AccumulateGrad, which locks the parameter: a tied parameter
                # held by stages on two threads may receive a gradient from both at once, and a read-add-write
                # of p.grad here would lose one of them.
                torch.autograd.backward(outs, grads, inputs=params)
            finally:
                for h in handles:
                    h.remove()
        pending.weight_work = []
        self.release(pending)


@torch.compiler.disable  # called by autograd inside compiled stages: never traced
def _drop(t: torch.Tensor) -> None:
    """A saved tensor not kept (the forward will be recomputed)."""
    return None


def _dropped(_: None) -> torch.Tensor:
    raise RuntimeError("a forward that kept only its input was used for a backward without its RECOMPUTE")


def _device_of(x: Any, module: nn.Module) -> torch.device:
    for t in tensors_of(x):
        return t.device
    for p in module.parameters():
        return p.device
    return torch.device("cpu")


def _capture(store: dict[Any, tuple], node: Any):
    def hook(grad_outputs: tuple) -> None:
        store[node] = tuple(grad_outputs)

    return hook


def _pin(saved: tuple):
    def hook(grad_outputs: tuple) -> tuple:
        return saved

    return hook


def _weight_groups(roots: list[torch.Tensor], inputs: list[torch.Tensor], params: list[nn.Parameter]):
    """How the weight gradient splits off the input path: a list of (intermediates, root indices, params).

    An intermediate is a node on the path from the roots to the inputs with a child that leads to
    parameters but not to the inputs; a root off the input path that leads to parameters is handled
    whole. Intermediates (and such roots) whose parameter-side sub-graphs share a node form one group,
    so that W runs every parameter-side node exactly once; each group lists the parameters it reaches.
    """
    input_nodes = {get_gradient_edge(x).node for x in inputs}
    param_of = {get_gradient_edge(p).node: p for p in params}
    to_input: dict[Any, bool] = {}
    to_param: dict[Any, bool] = {}

    def reach(node: Any) -> None:
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
            to_param[n] = n in param_of or any(to_param[c] for c in children)

    starts: list[tuple[Any, int, list[Any]]] = []  # (intermediate node or None, root index or -1, param-side nodes)
    for i, r in enumerate(roots):
        node = r.grad_fn
        if node is None:
            continue
        reach(node)
        if not to_input[node] and to_param[node]:
            starts.append((None, i, [node]))
    visited: set[Any] = set()
    stack = [r.grad_fn for r in roots if r.grad_fn is not None and to_input[r.grad_fn]]
    while stack:
        n = stack.pop()
        if n in visited:
            continue
        visited.add(n)
        side = []
        for c, _ in n.next_functions:
            if c is None:
                continue
            if to_input[c]:
                stack.append(c)
            elif to_param[c]:
                side.append(c)
        if side:
            starts.append((n, -1, side))
    parent = list(range(len(starts)))

    def find(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    owner: dict[Any, int] = {}
    for k, (_, _, side) in enumerate(starts):
        todo = list(side)
        while todo:
            c = todo.pop()
            if c in owner:
                parent[find(k)] = find(owner[c])
                continue
            owner[c] = k
            todo.extend(x for x, _ in c.next_functions if x is not None and to_param.get(x))
    groups: dict[int, tuple[list[Any], list[int], list[nn.Parameter]]] = {}
    for k, (node, i, _) in enumerate(starts):
        nodes, idx, _ps = groups.setdefault(find(k), ([], [], []))
        if node is not None:
            nodes.append(node)
        else:
            idx.append(i)
    for node, p in param_of.items():
        if node in owner:
            groups[find(owner[node])][2].append(p)
    return [g for g in groups.values() if g[2]]
