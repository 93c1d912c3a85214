"""A pipeline called like a module: the forward part of every device's program at the call, the rest inside the
caller's `backward()` (what `GPipe` runs on the one `Executor`).

`Pipeline` runs a whole training step (the loss included) in one pass of the executor. A module
is called instead: the call returns an output, user code makes a loss of it, and `loss.backward()`
comes later. So a `ModuleCall` (one call and its backward) runs every device's lowered program in
two walks over one `RunState` per device, each walk by every rank of a `LocalWorld` at once:

- at the call, the forward part of the program (F, SEND_F, RECV_F; `forward_part`). The last
  stage computes no loss: it hands out its outputs (`RunState.output_grads` is set);
- in the backward, the rest (RECV_B, RECOMPUTE, B, SEND_B; STEP does nothing: the optimizer step
  is the caller's), the last stage's backward starting from the gradients of its outputs.

The pipelined backward. The caller sees one output, made by two autograd Functions:

    input on device 0 --> _Input --(a phony, on the CPU)--> _Output --> output on the last device

`_Output.backward` receives the gradient of the output, splits it per micro-batch into the last
stage's `output_grads`, and returns a gradient for the phony, so autograd runs `_Input.backward`
next. That one runs the second walk on every rank and waits for it: device s runs B(s, n) while
device s-1 runs B(s-1, n-1), in the schedule's order; it returns the gradient of the input (when it
requires one) once all are done.

Why the phony lives on the CPU: autograd runs a node on the thread of the device its incoming
gradient is on. A CUDA gradient would put `_Input.backward`, which blocks until the ranks are done,
on autograd's thread for that GPU, the very thread that must run the ranks' backward nodes on that
GPU. A CPU gradient puts it on the thread that called `backward()`.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.executor import Executor, RunState
from stagewise.runtime.rng import RandomDraws
from stagewise.runtime.world import World
from stagewise.schedules.actions import RECOMPUTE, RECV_F, SEND_F, B, F, ScheduleError
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Event, Timeline
from stagewise.tree import Spec, flatten, unflatten

FORWARD_OPS = frozenset((F, SEND_F, RECV_F))


def forward_part(schedule: Schedule, device: int) -> int:
    """The length of device `device`'s forward part: where its lowered list stops being F, SEND_F and RECV_F.
    A ScheduleError when forward work comes after that (a module call runs every forward first)."""
    program = schedule.programs[device]
    cut = next((i for i, a in enumerate(program) if a.op not in FORWARD_OPS), len(program))
    late = next((a for a in program[cut:] if a.op in FORWARD_OPS), None)
    if late is not None:
        raise ScheduleError(f"schedule {schedule.name!r}: device {device} has {late} after its first backward "
                            "action; a pipeline called as a module runs schedules whose forwards all come first")
    return cut


class ModuleCall:
    """One call of the pipeline and the backward of its output. `executors` (rank -> Executor, a stage per rank,
    rank = stage) run in `world`; `after_backward` runs on the caller's thread once the backward is done."""

    def __init__(self, world: World, executors: dict[int, Executor], cuts: dict[int, int], microbatches: int,
                 after_backward: Callable[[], None] = lambda: None):
        self.world, self.executors, self.cuts, self.m = world, executors, cuts, microbatches
        self.after_backward = after_backward
        self.first, self.last = min(executors), max(executors)
        self.states: dict[int, RunState] = {}
        self.events: dict[int, list[Event]] = {}  # rank -> its executor's events of this call
        self.sizes: list[list[int]] = []  # per output tensor slot, the micro-batches' sizes along dim 0
        self.root_slots: list[int] = []  # the output's tensors (in flatten order) that carry a gradient
        self.backward_done = False
        self.grads_given = False

    # ---- the call ----------------------------------------------------------------------------------

    def forward(self, micro: list[Any], leaves: list[torch.Tensor], graph: bool, seed: int | None) -> Any:
        """Run the micro-batches `micro` (on the first stage's device) through the forward part; the output.
        `leaves`: the input's tensors that want a gradient; `graph`: keep what the backward needs; `seed`: the
        forwards draw their random numbers from it (`stagewise.runtime.rng`)."""
        autocast = [(kind, torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu")
                    if torch.is_autocast_enabled(kind)]  # thread-local: handed to the ranks

        def walk(rank: int) -> None:
            st = RunState(micro if rank == self.first else None, None, None, graph, False, output_grads={},
                          input_grads={} if graph and leaves else None, draws=RandomDraws(seed))
            self.states[rank] = self.executors[rank].begin(st)
            self.events[rank] = st.events
            with ExitStack() as ambient:
                for kind, dtype in autocast:
                    ambient.enter_context(torch.autocast(kind, dtype=dtype))
                self._walk(rank, self.cuts[rank] if graph else None)
            if not graph:
                self.executors[rank].finish(st)

        self.world.run(walk, "the forward")
        kept = self.states[self.last].kept
        spec, pieces = self._gather([kept.pop(n) for n in range(self.m)])
        if not graph:
            self.states.clear()
        if not graph or not (self.root_slots or leaves):
            return unflatten(spec, [torch.cat(p) for p in pieces])
        token = torch.empty(0, dtype=torch.float32, requires_grad=True)
        phony = _Input.apply(self, token, *leaves)
        out = _Output.apply(self, phony, *(t for p in pieces for t in p))
        return unflatten(spec, list(out))

    def _walk(self, rank: int, stop: int | None) -> None:
        """Walk `rank`'s program up to `stop`; its events name the thread that ran them."""
        st = self.states[rank]
        before = len(st.events)
        self.executors[rank].walk(st, stop)
        name = threading.current_thread().name
        for e in st.events[before:]:
            e.extra["thread"] = name

    def _gather(self, outs: list[Any]) -> tuple[Spec, list[list[torch.Tensor]]]:
        """The last stage's outputs, checked to agree: their structure, and per tensor slot the micro-batches'
        pieces (detached); notes each slot's micro-batch sizes and which slots carry a gradient."""
        who = self.executors[self.last].who(self.last)
        flats = [flatten(o) for o in outs]
        spec = flats[0][1]
        for n, (tensors, s) in enumerate(flats):
            if s.treespec != spec.treespec or len(tensors) != len(flats[0][0]):
                raise PipelineError(f"{who} returned a different structure for micro-batch {n} than for "
                                    "micro-batch 0; every micro-batch must give the same structure",
                                    stage=self.last, microbatch=n)
            if any(t.dim() == 0 for t in tensors):
                raise PipelineError(f"{who} returned a 0-dimensional tensor; the micro-batches' outputs are "
                                    "concatenated along dim 0, so every output tensor needs a batch dimension",
                                    stage=self.last, microbatch=n)
            if [t.requires_grad for t in tensors] != [t.requires_grad for t in flats[0][0]]:
                raise PipelineError(f"{who}'s outputs that carry a gradient differ between micro-batch 0 and "
                                    f"micro-batch {n}", stage=self.last, microbatch=n)
        slots = range(len(flats[0][0]))
        self.root_slots = [i for i in slots if flats[0][0][i].requires_grad]
        self.sizes = [[len(tensors[i]) for tensors, _ in flats] for i in slots]
        return spec, [[tensors[i].detach() for tensors, _ in flats] for i in slots]

    # ---- the backward ------------------------------------------------------------------------------

    def give_output_grads(self, grads: tuple[torch.Tensor | None, ...]) -> None:
        """The gradient of every output tensor (None: not used by the loss), split per micro-batch for the
        last stage's backward."""
        st = self.states[self.last]
        per_slot = {i: grads[i].split(self.sizes[i]) if grads[i] is not None else None for i in self.root_slots}
        for n in range(self.m):
            like = st.pending[(self.last, n)].like
            st.output_grads[n] = [per_slot[i][n] if per_slot[i] is not None else torch.zeros_like(r)
                                  for i, r in zip(self.root_slots, like)]
        self.grads_given = True

    def backward(self) -> list[torch.Tensor]:
        """Walk the rest of every rank's program; the gradients of the input's tensors that want one
        (concatenated over the micro-batches)."""
        def walk(rank: int) -> None:
            self._walk(rank, None)
            self.executors[rank].finish(self.states[rank])

        self.world.run(walk, "the backward")
        self.after_backward()
        given = self.states[self.first].input_grads or {}
        self.states.clear()
        grads = []
        for i in range(len(given[0]) if given else 0):
            per_mb = [given[n][i] for n in range(self.m)]
            grads.append(torch.stack(per_mb).sum(0) if per_mb[0].dim() == 0 else torch.cat(per_mb))
        return grads


_ONCE = ("a pipeline called as a module runs one backward per call: the graph of this output was already "
         "backpropagated and freed (retain_graph is not supported); call the model again")


class _Input(torch.autograd.Function):
    """Before the output: its backward runs the pipelined backward and returns the input's gradients."""

    @staticmethod
    def forward(ctx: Any, call: ModuleCall, token: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        ctx.call = call
        return token.new_empty(0)

    @staticmethod
    def backward(ctx: Any, _phony_grad: torch.Tensor) -> tuple[Any, ...]:
        call: ModuleCall = ctx.call
        if call.backward_done:
            raise RuntimeError(_ONCE)
        call.backward_done = True
        return (None, None, *call.backward())


class _Output(torch.autograd.Function):
    """The output: the last stage's micro-batch outputs concatenated; its backward hands their gradients over."""

    @staticmethod
    def forward(ctx: Any, call: ModuleCall, phony: torch.Tensor, *pieces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.call = call
        m = call.m
        outs = tuple(torch.cat(pieces[i:i + m]) for i in range(0, len(pieces), m))
        fixed = [t for i, t in enumerate(outs) if i not in call.root_slots]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        call: ModuleCall = ctx.call
        if call.backward_done or call.grads_given:
            raise RuntimeError(_ONCE)
        call.give_output_grads(grads)
        return (None, torch.zeros(0, dtype=torch.float32), *([None] * (len(grads) * call.m)))


def timeline(events: dict[int, list[Event]], executors: dict[int, Executor], schedule: Schedule) -> Timeline:
    """The measured timeline of a call's events (rank -> its executor's): every F and B, a B starting where the
    recompute before it started (`extra["recompute_s"]`), timed in host seconds."""
    kept = []
    for rank, evs in events.items():
        recompute = None
        for e in executors[rank].timed(evs):
            if e.op == RECOMPUTE:
                recompute = e
            elif e.op in (F, B):
                if e.op == B and recompute is not None and recompute.microbatch == e.microbatch:
                    e.extra.setdefault("recompute_s", recompute.end - recompute.start)
                    e.start = min(e.start, recompute.start)
                recompute = None
                kept.append(e)
    return Timeline(schedule.num_devices, sorted(kept, key=lambda e: (e.device, e.start)),
                    title=f"measured: {schedule.describe()}", unit="s", num_stages=schedule.num_stages)


__all__ = ["FORWARD_OPS", "ModuleCall", "forward_part", "timeline"]
