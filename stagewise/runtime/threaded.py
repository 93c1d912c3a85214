"""One process, one worker thread per pipeline device: GPipe's forward when the model is called, its backward
inside `loss.backward()`.

`Pipeline` runs a whole training step (the loss included) through the executor. The one-process
`GPipe` is called like a module instead: its call returns an output, user code makes a loss of
it, and `loss.backward()` comes later. So a `ThreadedRun` (one call and its backward) walks the
same lowered action lists as the executor, in two phases, each by one worker thread per
device (a `WorkerPool`, whose failure policy ends every worker when one fails; with a single
device, the calling thread):

- at the call, every device walks the forward part of its list (F, SEND_F, RECV_F);
- in the backward, every device walks the rest (RECV_B, B, SEND_B; STEP is the user's
  `optimizer.step()`, so it does nothing here).

The lists are the GPipe schedule's (`build("gpipe", P, m)`, validated and lowered): all forwards,
then all backwards. Each (partition, micro-batch) forward runs on its input cut from the
previous partition's graph, so it has a graph of its own (as in the executor's `Stage`).

The pipelined backward. The caller sees one output, made by two autograd Functions:

    input on device 0 --> _Input --(a phony, on the CPU)--> _Output --> output on the last device

`_Output.backward` receives the gradient of the output, splits it per micro-batch and keeps it;
it returns a gradient for the phony, so autograd runs `_Input.backward` next. That one starts the
workers and waits for them: each walks the backward part of its device's list. B(s, n) takes the
gradient of its outputs (kept by `_Output`, or sent by the next device), runs
`torch.autograd.backward` on its own graph (weight gradients accumulate in `.grad`, a checkpointed
micro-batch recomputes its forward first) and SEND_B hands its input's gradient to the previous
device. So device s runs B(s, n) while device s-1 runs B(s-1, n-1), in the schedule's order;
`_Input.backward` returns the gradient of the input (when it requires one) once all are done.

Why the phony lives on the CPU: autograd runs a node on the thread of the device its incoming
gradient is on. A CUDA gradient would put `_Input.backward`, which blocks until the workers are
done, on autograd's thread for that GPU, the very thread that must run the workers' backward
nodes on that GPU. A CPU gradient puts it on the thread that called `backward()`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint

from stagewise.runtime.copies import Lane, Parcel, receive, send
from stagewise.runtime.errors import PeerError, PipelineError
from stagewise.runtime.microbatch import scatter
from stagewise.runtime.recompute import RandomStreams, partition_call
from stagewise.runtime.stage import Pending
from stagewise.runtime.workers import WorkerPool
from stagewise.schedules.actions import RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, B, F, I, W
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Event, Timeline
from stagewise.tree import Spec, cut, flatten, map_tensors, tensors_of, unflatten

BACKWARD_OPS = frozenset((B, I, W, RECV_B, SEND_B, STEP))


@dataclass
class Part:
    """One partition as the workers run it: its layers, where, and the parameters it shares with an
    earlier partition (name in `module` -> that parameter), which it uses through a per-call replica."""

    index: int
    module: nn.Module
    lane: Lane
    shared: dict[str, nn.Parameter] = field(default_factory=dict)


def split_program(schedule: Schedule, device: int) -> tuple[list[Action], list[Action]]:
    """A device's lowered list cut where its backward starts: (forward actions, backward actions)."""
    program = list(schedule.actions[device])
    cut_at = next((i for i, a in enumerate(program) if a.op in BACKWARD_OPS), len(program))
    if any(a.op not in BACKWARD_OPS for a in program[cut_at:]):
        raise PipelineError(f"schedule {schedule.name!r}: device {device} has a forward after its first backward "
                            "action; the in-process GPipe runs schedules whose forwards all come first")
    return program[:cut_at], program[cut_at:]


class ThreadedRun:
    """One call of the model through the partitions, and the backward of its output."""

    def __init__(self, parts: Sequence[Part], schedule: Schedule, programs: list[tuple[list[Action], list[Action]]],
                 checkpoint_stop: int, timeout: float, streams: RandomStreams | None, graph: bool,
                 pool: WorkerPool | None):
        self.parts, self.schedule, self.programs = list(parts), schedule, programs
        self.checkpoint_stop, self.timeout, self.streams, self.graph = checkpoint_stop, timeout, streams, graph
        self.last = len(self.parts) - 1
        self.pool = pool  # None: one device, run on the calling thread
        self.aborted: str | None = None
        self.waited = threading.local()  # when the current action of this thread stopped waiting for a message
        self.mail: dict[tuple[str, int, int], Parcel] = {}
        self.mail_ready = threading.Condition()
        self.inputs: list[Any] = []
        self.pending: dict[tuple[int, int], Pending] = {}
        self.outputs: dict[tuple[int, int], Any] = {}  # (stage, mb) -> output not yet sent, or the last stage's
        self.grads: dict[tuple[int, int], list[torch.Tensor]] = {}  # (stage, mb) -> input gradients not yet sent
        self.output_grads: dict[int, list[torch.Tensor]] = {}  # mb -> gradients of the last stage's roots
        self.input_grads: dict[int, list[torch.Tensor]] = {}  # mb -> gradients of the first stage's input leaves
        self.sizes: list[list[int]] = []  # per output tensor slot, the micro-batches' sizes along dim 0
        self.root_slots: list[int] = []  # the output's tensors (in flatten order) that carry a gradient
        self.replicas: list[dict[str, torch.Tensor]] = [{} for _ in self.parts]
        self.events: list[Event] = []
        self.backward_done = False
        self.autocast: list[tuple[str, torch.dtype]] = []  # the caller's autocast, for the forward workers
        self.handlers: dict[str, Callable[[Action], None]] = {
            F: self._forward, SEND_F: self._send_activation, RECV_F: self._nothing,
            B: self._backward, SEND_B: self._send_grad, RECV_B: self._nothing, STEP: self._nothing,
        }

    # ---- the two phases ----------------------------------------------------------------------------

    def forward(self, batch: Any) -> Any:
        """Run every micro-batch of `batch` through the partitions; the concatenated last-stage output."""
        first = self.parts[0].lane
        on_first = map_tensors(batch, lambda t: t.to(first.device))
        micro, _ = scatter(on_first, self.schedule.microbatches)
        self.inputs = micro
        for part in self.parts:
            self.replicas[part.index] = {name: _replica(p, part.lane.device, self.graph)
                                         for name, p in part.shared.items()}
            part.lane.catch_up()
        grad_mode = torch.is_grad_enabled() and self.graph
        self.autocast = [(kind, torch.get_autocast_dtype(kind)) for kind in ("cuda", "cpu")
                         if torch.is_autocast_enabled(kind)]  # thread-local: handed to the workers
        try:
            self._run(lambda d: self._walk(d, 0, grad_mode), "the forward")
        finally:
            self.inputs = []
        for part in self.parts:
            part.lane.settle()
        spec, pieces = self._gather([self.outputs.pop((self.last, n)) for n in range(self.schedule.microbatches)])
        leaves = [t for t in tensors_of(on_first) if t.requires_grad and t.is_floating_point()]
        if not self.graph or not (self.root_slots or leaves):
            return unflatten(spec, [torch.cat(p) for p in pieces])
        token = torch.empty(0, dtype=torch.float32, requires_grad=True)
        phony = _Input.apply(self, token, *leaves)
        out = _Output.apply(self, phony, *(t for p in pieces for t in p))
        return unflatten(spec, list(out))

    def _gather(self, outs: list[Any]) -> tuple[Spec, list[list[torch.Tensor]]]:
        """The last partition's outputs, checked to agree: their structure, and per tensor slot the micro-batches'
        pieces (detached); notes each slot's micro-batch sizes and which slots carry a gradient."""
        flats = [flatten(o) for o in outs]
        spec = flats[0][1]
        for n, (tensors, s) in enumerate(flats):
            if s.treespec != spec.treespec or len(tensors) != len(flats[0][0]):
                raise PipelineError(f"partition {self.last} returned a different structure for micro-batch {n} "
                                    "than for micro-batch 0; every micro-batch must give the same structure",
                                    stage=self.last, microbatch=n)
            if any(t.dim() == 0 for t in tensors):
                raise PipelineError(f"partition {self.last} returned a 0-dimensional tensor; GPipe concatenates "
                                    "the micro-batches' outputs along dim 0, so every output tensor needs a "
                                    "batch dimension", stage=self.last, microbatch=n)
            if [t.requires_grad for t in tensors] != [t.requires_grad for t in flats[0][0]]:
                raise PipelineError(f"partition {self.last}'s outputs that carry a gradient differ between micro-batch "
                                    f"0 and micro-batch {n}", stage=self.last, microbatch=n)
        slots = range(len(flats[0][0]))
        self.root_slots = [i for i in slots if flats[0][0][i].requires_grad]
        self.sizes = [[len(tensors[i]) for tensors, _ in flats] for i in slots]
        return spec, [[tensors[i].detach() for tensors, _ in flats] for i in slots]

    def backward(self) -> list[torch.Tensor]:
        """Run every device's backward actions; the gradients of the input's tensors that require one
        (concatenated over the micro-batches)."""
        self._run(lambda d: self._walk(d, 1, True), "the backward")
        for part in self.parts:
            part.lane.settle()
        for part in self.parts:  # a replica's gradient joins its parameter's, partition by partition
            for name, p in part.shared.items():
                g = self.replicas[part.index][name].grad
                if g is None:
                    continue
                g = g.to(p.device)
                if p.grad is None:
                    p.grad = g
                else:
                    p.grad.add_(g)
            self.replicas[part.index] = {}
        grads = []
        for i in range(len(self.input_grads[0]) if self.input_grads else 0):
            per_mb = [self.input_grads[n][i] for n in range(self.schedule.microbatches)]
            grads.append(torch.stack(per_mb).sum(0) if per_mb[0].dim() == 0 else torch.cat(per_mb))
        return grads

    def _run(self, fn: Callable[[int], None], what: str) -> None:
        if self.pool is None:
            fn(0)
        else:
            self.pool.run(fn, what, self._abort)

    def _abort(self, why: str) -> None:
        with self.mail_ready:
            self.aborted = why
            self.mail_ready.notify_all()

    def _walk(self, device: int, phase: int, grad_mode: bool) -> None:
        part = self.parts[device]
        name = threading.current_thread().name
        with ExitStack() as ambient:
            ambient.enter_context(part.lane.active())
            ambient.enter_context(torch.set_grad_enabled(grad_mode))
            for kind, dtype in self.autocast if phase == 0 else ():
                ambient.enter_context(torch.autocast(kind, dtype=dtype))
            for a in self.programs[device][phase]:
                start = time.perf_counter()
                self.waited.until = None
                try:
                    self.handlers[a.op](a)
                except (PipelineError, PeerError):
                    raise
                except Exception as err:
                    raise PipelineError(f"partition {a.stage} (device {part.lane.device}) failed at {a}: "
                                        f"{type(err).__name__}: {err}", stage=a.stage, microbatch=a.microbatch,
                                        action=str(a), rank=device) from err
                if a.op in (F, B):
                    extra: dict[str, Any] = {"thread": name}
                    if self.waited.until is not None:  # the event shows the computation alone, as the executor's
                        extra["wait_s"] = self.waited.until - start
                        start = self.waited.until
                    self.events.append(Event(device, start, time.perf_counter(), a.op, a.stage, a.microbatch,
                                             extra=extra))

    # ---- messages between workers ------------------------------------------------------------------

    def _post(self, key: tuple[str, int, int], parcel: Parcel) -> None:
        with self.mail_ready:
            self.mail[key] = parcel
            self.mail_ready.notify_all()

    def _take(self, key: tuple[str, int, int], lane: Lane) -> Any:
        deadline = time.monotonic() + self.timeout
        with self.mail_ready:
            while key not in self.mail:
                if self.aborted:
                    raise PeerError(self.aborted)
                left = deadline - time.monotonic()
                if left <= 0:
                    kind, s, n = key
                    what = "activation" if kind == "F" else "gradient"
                    raise PipelineError(f"partition {s} waited {self.timeout:g} s for the {what} of micro-batch {n}; "
                                        "the partition it comes from is stuck or slow (raise `timeout=` if its work "
                                        "is legitimately long)", stage=s, microbatch=n)
                self.mail_ready.wait(min(left, 0.05))
            parcel = self.mail.pop(key)
        self.waited.until = time.perf_counter()
        return receive(parcel, lane)

    # ---- handlers ----------------------------------------------------------------------------------

    def _nothing(self, a: Action) -> None:
        return None

    def _forward(self, a: Action) -> None:
        s, n = a.stage, a.microbatch
        part = self.parts[s]
        x = self.inputs[n] if s == 0 else self._take(("F", s, n), part.lane)
        x = cut(x, keep_grad=torch.is_grad_enabled())
        module: Callable[[Any], Any] = part.module
        if self.replicas[s]:
            replicas = self.replicas[s]

            def module(inp: Any) -> Any:  # the partition with its shared parameters replaced by their replicas
                return functional_call(part.module, replicas, (inp,))

        run = partition_call(module, s, n, part.lane.device, self.streams)
        if torch.is_grad_enabled() and n < self.checkpoint_stop:
            # the random numbers are handled by `run` itself (see stagewise.runtime.recompute)
            out = checkpoint(run, x, use_reentrant=False, preserve_rng_state=False)
        else:
            out = run(x)
        if torch.is_grad_enabled():
            self.pending[(s, n)] = Pending([t for t in tensors_of(x) if t.requires_grad],
                                           [t for t in tensors_of(out) if t.requires_grad])
        self.outputs[(s, n)] = out

    def _send_activation(self, a: Action) -> None:
        s, n = a.stage, a.microbatch
        self._post(("F", s + 1, n), send(self.outputs.pop((s, n)), self.parts[s].lane, self.parts[s + 1].lane))

    def _backward(self, a: Action) -> None:
        s, n = a.stage, a.microbatch
        pending = self.pending.pop((s, n))
        grads = self.output_grads.pop(n) if s == self.last else self._take(("B", s, n), self.parts[s].lane)
        if len(grads) != len(pending.roots):
            raise PipelineError(f"partition {s} got {len(grads)} gradients for {len(pending.roots)} outputs that "
                                "need one", stage=s, microbatch=n)
        if pending.roots:
            torch.autograd.backward(pending.roots, grads)
        got = [x.grad if x.grad is not None else torch.zeros_like(x) for x in pending.inputs]
        if s == 0:
            self.input_grads[n] = got
        else:
            self.grads[(s, n)] = got

    def _send_grad(self, a: Action) -> None:
        s, n = a.stage, a.microbatch
        self._post(("B", s - 1, n), send(self.grads.pop((s, n)), self.parts[s].lane, self.parts[s - 1].lane))


def timeline(events: list[Event], schedule: Schedule) -> Timeline:
    """The measured timeline of a run's events."""
    return Timeline(schedule.num_devices, sorted(events, key=lambda e: (e.device, e.start)),
                    title=f"measured: {schedule.describe()}", unit="s", num_stages=schedule.num_stages)


def _replica(p: nn.Parameter, device: torch.device, graph: bool) -> torch.Tensor:
    """A stand-in for `p` on `device` for one call: a leaf of its own, whose gradient is added to p's after
    the backward (no copy when p already lives there)."""
    r = p.detach().to(device)
    return r.requires_grad_(p.requires_grad and graph)


class _Input(torch.autograd.Function):
    """Before the output: its backward runs the pipelined backward and returns the input's gradients."""

    @staticmethod
    def forward(ctx: Any, run: ThreadedRun, token: torch.Tensor, *leaves: torch.Tensor) -> torch.Tensor:
        ctx.run = run
        return token.new_empty(0)

    @staticmethod
    def backward(ctx: Any, _phony_grad: torch.Tensor) -> tuple[Any, ...]:
        run: ThreadedRun = ctx.run
        if run.backward_done:
            raise RuntimeError("GPipe runs one backward per call: the graph of this output was already "
                               "backpropagated and freed (retain_graph is not supported); call the model again")
        run.backward_done = True
        grads = run.backward()
        return (None, None, *grads)


class _Output(torch.autograd.Function):
    """The output: the last partition's micro-batch outputs concatenated; its backward keeps their gradients."""

    @staticmethod
    def forward(ctx: Any, run: ThreadedRun, phony: torch.Tensor, *pieces: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ctx.run = run
        m = len(run.sizes[0])
        outs = tuple(torch.cat(pieces[i:i + m]) for i in range(0, len(pieces), m))
        fixed = [t for i, t in enumerate(outs) if i not in run.root_slots]
        if fixed:
            ctx.mark_non_differentiable(*fixed)
        return outs

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor | None) -> tuple[Any, ...]:
        run: ThreadedRun = ctx.run
        if run.backward_done or run.output_grads:
            raise RuntimeError("GPipe runs one backward per call: the graph of this output was already "
                               "backpropagated and freed (retain_graph is not supported); call the model again")
        last = run.parts[-1].lane
        last.catch_up()
        m = len(run.sizes[0])
        per_slot = {}
        for i in run.root_slots:
            g = grads[i]
            per_slot[i] = g.split(run.sizes[i]) if g is not None else None
        for n in range(m):
            roots = run.pending[(run.last, n)].roots
            run.output_grads[n] = [per_slot[i][n] if per_slot[i] is not None else torch.zeros_like(r)
                                   for i, r in zip(run.root_slots, roots)]
        n_pieces = len(grads) * m
        return (None, torch.zeros(0, dtype=torch.float32), *([None] * n_pieces))


__all__ = ["Part", "ThreadedRun", "split_program", "timeline"]
