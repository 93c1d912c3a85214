"""Walk one device's lowered action list: one handler per op over a small run-state.

The executor never looks at the schedule's name; what it runs, and in which order, is
entirely the list. Its STEP handler calls the training step through `StepRunner`.

A pass is `begin` (a fresh `RunState`), `walk` (actions up to a position, any number of times:
the state persists between walks) and `end`. `run` does all three at once (`Pipeline`). `GPipe`
walks the forward part of the list when the model is called and the rest inside the caller's
`backward()`, with the last stage handing out its outputs instead of computing a loss, and its
backward starting from the output gradients the caller's autograd gives (`RunState.output_grads`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from stagewise.runtime.errors import PeerError, PipelineError, TransportTimeout
from stagewise.runtime.loss import LossError, split_loss
from stagewise.runtime.rng import RandomDraws
from stagewise.runtime.stage import KeptForward, Stage
from stagewise.runtime.streams import ActionClock
from stagewise.runtime.transport import Handle, Transport, fill_missing_grads
from stagewise.schedules.actions import (
    OVERLAP_F_B,
    RECOMPUTE,
    RECV_B,
    RECV_F,
    REDUCE,
    RESHARD,
    SEND_B,
    SEND_F,
    STEP,
    UNSHARD,
    Action,
    B,
    F,
    I,
    W,
)
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Event
from stagewise.tree import Spec, describe, flatten, shape_key

LossFn = Callable[[Any, Any], torch.Tensor]
TRAIN_ONLY = frozenset((B, I, W, SEND_B, RECV_B, STEP, REDUCE, RECOMPUTE))  # skipped by an evaluation pass


class StepRunner(Protocol):
    """What the executor calls at a STEP action (see `stagewise.runtime.step.RankStep`)."""

    def run(self, action: Action, counts: dict[int, float] | None = None) -> None: ...

    def reduce(self, action: Action) -> None: ...


class Watch(Protocol):
    """Called around every action (see `stagewise.runtime.guards.RankWatch`): `begin` before it runs, `end` after
    it ran, with the run-state holding what it produced; an exception from either fails the action."""

    def begin(self, action: Action) -> None: ...

    def end(self, action: Action, state: RunState) -> None: ...


@dataclass
class RunResult:
    """One pass over a device's program.

    `loss`: the weighted sum of the micro-batch losses (the batch mean) on the device holding
    the last stage, else None; `losses`: micro-batch -> its weighted loss (its sum, for a loss_fn
    returning (sum, count)); `counts`: micro-batch -> its count (pair losses only); `outputs`: the last
    stage's outputs per micro-batch when asked for; `events`: the measured timeline.
    """

    loss: torch.Tensor | None
    losses: dict[int, torch.Tensor]
    outputs: list[Any]
    events: list[Event]
    counts: dict[int, float] = field(default_factory=dict)


@dataclass
class RunState:
    """What one pass keeps between actions (and between walks)."""

    inputs: Any
    labels: Any
    weights: Any
    train: bool
    keep_outputs: bool
    # None: the last stage computes the loss and its backward starts from it. A dict: the last stage keeps its
    # outputs (`kept`, with their graph) and computes no loss; the backward of micro-batch n starts from
    # output_grads[n], one gradient per output tensor that carries one (`pending[(last, n)].like`), put there
    # from outside before that backward is walked.
    output_grads: dict[int, list[torch.Tensor]] | None = None
    # None: the first stage's input gets no gradient. A dict: its floating-point tensors that require one keep
    # it, and the backward of micro-batch n leaves their gradients in input_grads[n].
    input_grads: dict[int, list[torch.Tensor]] | None = None
    draws: RandomDraws = field(default_factory=RandomDraws)  # how the forwards draw random numbers
    position: int = 0  # the next action of the program to walk
    pending: dict[tuple[int, int], KeptForward] = field(default_factory=dict)  # (stage, mb) -> its forward, kept
    outputs: dict[tuple[int, int], Any] = field(default_factory=dict)  # stage outputs not yet sent or consumed
    received: dict[tuple[str, int, int], Handle] = field(default_factory=dict)  # posted receives
    grad_in: dict[tuple[int, int], list] = field(default_factory=dict)  # input gradients not yet sent or consumed
    signatures: dict[tuple[int, int], tuple[int, Spec, Any]] = field(default_factory=dict)
    losses: dict[int, torch.Tensor] = field(default_factory=dict)
    counts: dict[int, float] = field(default_factory=dict)  # micro-batch -> count, for (sum, count) losses
    sums: dict[int, torch.Tensor] = field(default_factory=dict)  # micro-batch -> its sum (detached), likewise
    per_item: bool = False  # the weights are per counted item (a loss that counts its items ahead)
    kept: dict[int, Any] = field(default_factory=dict)
    events: list[Event] = field(default_factory=list)
    received_spec: Spec | None = None  # the structure of the last activation received (for error messages)
    last_output: Any = None  # the last stage's output of the forward just run, for the watch (which drops it)
    index: int = -1  # the position in the program of the action being run


@dataclass
class _Timing:
    """An action's start, moved past any wait for a peer so that the event shows the computation alone. Stamps
    come from the device's `ActionClock` (host seconds, or CUDA events resolved after the pass)."""

    clock: ActionClock
    start: Any
    extra: dict[str, Any] = field(default_factory=dict)
    host: float = field(default_factory=time.perf_counter)

    def waited(self) -> None:
        now = time.perf_counter()
        self.extra["wait_s"] = now - self.host
        self.start = self.clock.stamp()


class Executor:
    """Runs device `device`'s program of a lowered schedule over its `stages` (stage index -> Stage)."""

    def __init__(self, schedule: Schedule, device: int, stages: dict[int, Stage], transport: Transport,
                 loss_fn: LossFn | None, step: StepRunner | None = None, rank: int | None = None,
                 loss_scale: Callable[[], float] | None = None, watch: Watch | None = None,
                 clock: ActionClock | None = None, who: Callable[[int], str] | None = None):
        if not schedule.lowered:
            raise ValueError("the executor runs lowered schedules (see stagewise.schedules.validate / lower)")
        self.schedule, self.device, self.stages, self.transport = schedule, device, stages, transport
        self.loss_fn, self.step, self.watch = loss_fn, step, watch
        self.clock = clock or ActionClock(torch.device("cpu"))  # host seconds, or CUDA events on a GPU
        self.loss_scale = loss_scale  # the last stage's backward starts from this (fp16 loss scaling)
        self.rank = device if rank is None else rank
        # a stage of this device in messages: "stage 2 (rank 2)" by default
        self.who = who or (lambda s: f"stage {s} (rank {self.rank})")
        self.program = schedule.programs[device]
        self.last = schedule.num_stages - 1
        self.handlers: dict[str, Callable[[Action, RunState, _Timing], None]] = {
            F: self._forward, B: self._backward, I: self._backward, W: self._weight,
            SEND_F: self._send_activation, SEND_B: self._send_grad,
            RECV_F: self._post, RECV_B: self._post, STEP: self._step, REDUCE: self._reduce,
            OVERLAP_F_B: self._pair, RECOMPUTE: self._recompute,
            UNSHARD: self._reduce, RESHARD: self._reduce,  # sharded data parallel: the step's parts gather, release
        }
        # Forwards that keep only their stage's input: the list recomputes them before their backward.
        self.recomputed = {(a.stage, a.microbatch) for a in self.program if a.op == RECOMPUTE}
        # An overlapped pair runs its two members (the next two rows) itself.
        self.in_pair = {k for i, a in enumerate(self.program) if a.op == OVERLAP_F_B for k in (i + 1, i + 2)}
        # With a transport that matches messages by tag, the receives that precede a compute action are
        # posted before the compute action ahead of it, so that the data moves while this device computes.
        self.ahead: dict[int, list[int]] = {}
        if transport.posts_early:
            compute = [i for i, a in enumerate(self.program) if a.op in (F, B, I, W, STEP)]
            for i, k in zip(compute, compute[1:]):
                early = [j for j in range(i + 1, k) if self.program[j].op in (RECV_F, RECV_B)]
                if early:
                    self.ahead[i] = early

    def run(self, inputs: Any, labels: Any, weights: Any, train: bool = True,
            keep_outputs: bool = False, per_item: bool = False) -> RunResult:
        """One pass over the program. `inputs`/`labels` index the micro-batches (needed on the first/last
        stage); `weights[n]` is micro-batch n's share of its batch, or with `per_item` the weight of one counted
        item of a (sum, count) loss (1 / the items of the whole step, known ahead: `stagewise.runtime.loss`)."""
        st = self.begin(RunState(inputs, labels, weights, train, keep_outputs, per_item=per_item))
        self.walk(st)
        return self.end(st)

    def begin(self, st: RunState) -> RunState:
        """Start a pass over the program with the fresh state `st`."""
        self.clock.reset()
        return st

    def walk(self, st: RunState, stop: int | None = None) -> None:
        """Run the program's actions from `st.position` up to (not including) position `stop` (default: the end)."""
        stop = len(self.program) if stop is None else stop
        for i in range(st.position, stop):
            a = self.program[i]
            st.position = i + 1
            if i in self.in_pair:
                continue  # run by its pair
            if not st.train and a.op in TRAIN_ONLY:
                continue
            if a.op in (RECV_F, RECV_B) and _received_key(a) in st.received:
                continue  # posted early
            for j in self.ahead.get(i, ()):
                self._post_early(self.program[j], st)
            st.index = i
            self._run_action(a, st)

    def finish(self, st: RunState) -> None:
        """Wait for this pass's sends; refuse a pass that left work unfinished."""
        self.transport.finish()
        if st.train and (st.pending or st.grad_in) and not self.schedule.asynchronous:
            left = sorted(set(st.pending) | set(st.grad_in))
            raise PipelineError(f"device {self.device}: the schedule left work unfinished for (stage, mb) {left[:4]}")

    def end(self, st: RunState) -> RunResult:
        """`finish` the pass; its result, its events timed in host seconds."""
        self.finish(st)
        total = torch.stack([st.losses[n] for n in sorted(st.losses)]).sum() if st.losses else None
        self.timed(st.events)
        return RunResult(total, st.losses, [st.kept[i] for i in sorted(st.kept)], st.events, st.counts)

    def timed(self, events: list[Event]) -> list[Event]:
        """`events` of this pass with their stamps turned into host seconds, in place (CUDA events: once the
        device has run them; stamps already in seconds stay)."""
        for e in events:
            e.start, e.end = self.clock.seconds(e.start), self.clock.seconds(e.end)
        return events

    def _run_action(self, a: Action, st: RunState, extra: dict[str, Any] | None = None) -> None:
        """Run one action through its handler and record its event; errors name the action."""
        timing = _Timing(self.clock, self.clock.stamp(), dict(extra or {}))
        try:
            if self.watch is not None:
                self.watch.begin(a)
            self.handlers[a.op](a, st, timing)
            if self.watch is not None:
                self.watch.end(a, st)
        except (PipelineError, PeerError):
            raise
        except TransportTimeout as err:
            raise PipelineError(f"{self.who(a.stage)} timed out at {a}: {err}; the peer "
                                "is slow or stuck (raise `timeout=` if its work is legitimately long)",
                                stage=a.stage, microbatch=a.microbatch, action=str(a), rank=self.rank) from err
        except Exception as err:
            raise PipelineError(self._explain(a, err, st.received_spec), stage=a.stage, microbatch=a.microbatch,
                                action=str(a), rank=self.rank) from err
        st.events.append(Event(self.device, timing.start, self.clock.stamp(), a.op, a.stage, a.microbatch,
                               a.version, timing.extra))

    def _pair(self, a: Action, st: RunState, timing: _Timing) -> None:
        """An overlapped F+B pair: its members, the next two rows, one after the other (no overlap on a CPU).

        What they receive was posted before the pair and what they send follows it (the lowering
        puts it so); each member gets its own event inside the pair's, which names both."""
        i = st.index
        members = self.program[i + 1], self.program[i + 2]
        timing.extra.update(pair=[[m.op, m.stage, m.microbatch] for m in members], overlapped=False)
        for k, member in zip((i + 1, i + 2), members):
            if not st.train and member.op in TRAIN_ONLY:
                continue
            for j in self.ahead.get(k, ()):
                self._post_early(self.program[j], st)
            self._run_action(member, st, {"in_pair": True})

    # -- communication -----------------------------------------------------------------------------
    def _post(self, a: Action, st: RunState, timing: _Timing | None = None) -> None:
        if a.op == RECV_F:
            st.received[_received_key(a)] = self.transport.recv_activation(a.stage - 1, a.stage, a.microbatch, a.peer)
        else:
            like = st.pending[(a.stage, a.microbatch)].like
            st.received[_received_key(a)] = self.transport.recv_grad(like, a.stage + 1, a.stage, a.microbatch, a.peer)

    def _post_early(self, r: Action, st: RunState) -> None:
        if r.op == RECV_B and (not st.train or (r.stage, r.microbatch) not in st.pending):
            return  # its shapes come from a forward not run yet: posted in its place
        t0 = self.clock.stamp()
        try:
            self._post(r, st)
        except Exception as err:
            raise PipelineError(self._explain(r, err, st.received_spec), stage=r.stage, microbatch=r.microbatch,
                                action=str(r), rank=self.rank) from err
        st.events.append(Event(self.device, t0, self.clock.stamp(), r.op, r.stage, r.microbatch, r.version,
                               {"early": True}))

    def _send_activation(self, a: Action, st: RunState, timing: _Timing) -> None:
        before = self.transport.bytes_sent
        self.transport.send_activation(st.outputs.pop((a.stage, a.microbatch)), a.stage, a.stage + 1, a.microbatch,
                                       a.peer)
        timing.extra["bytes"] = self.transport.bytes_sent - before

    def _send_grad(self, a: Action, st: RunState, timing: _Timing) -> None:
        before = self.transport.bytes_sent
        self.transport.send_grad(st.grad_in.pop((a.stage, a.microbatch)), a.stage, a.stage - 1, a.microbatch, a.peer)
        timing.extra["bytes"] = self.transport.bytes_sent - before

    # -- computation -------------------------------------------------------------------------------
    def _forward(self, a: Action, st: RunState, timing: _Timing) -> None:
        s, n = a.stage, a.microbatch
        stage = self.stages[s]
        if s == 0:
            x = st.inputs[n]
        elif self.schedule.placement[s - 1] == self.device:
            x = st.outputs.pop((s - 1, n))
        else:
            x = st.received.pop(("F", s, n)).wait()
            st.received_spec = flatten(x)[1]
            timing.waited()
        loss = None
        heads = s == self.last and st.output_grads is None  # the last stage computes the loss
        if heads:
            labels, weight = st.labels[n], st.weights[n]

            def loss(out: Any) -> torch.Tensor:
                return self._loss(out, labels, weight, n, st)

        with torch.set_grad_enabled(st.train):
            out, p = stage.forward(x, version=a.version if self.schedule.asynchronous else None, loss=loss,
                                   keep=not st.train or (s, n) not in self.recomputed, microbatch=n, draws=st.draws,
                                   input_grad=s == 0 and st.input_grads is not None)
        if heads:
            if st.train and not p.like and st.counts.get(n) != 0:  # (a pair counting nothing may be a constant)
                raise PipelineError(f"{self.who(s)} at {a}: {stage.no_gradient_path(out, p, n)}",
                                    stage=s, microbatch=n, action=str(a), rank=self.rank)
            st.losses[n] = st.sums.get(n, p.loss)  # a pair's own sum, whatever weight its backward started from
            if st.keep_outputs:
                st.kept[n] = out.detach() if isinstance(out, torch.Tensor) else out
        elif s == self.last:
            st.kept[n] = out  # handed out with its graph; its gradients come back in output_grads
        else:
            self._check_signature(st, s, n, out)
            st.outputs[(s, n)] = out
        if s == self.last and st.train and self.watch is not None:
            st.last_output = out
        timing.extra["saved_bytes"] = p.saved_bytes
        if st.train:
            st.pending[(s, n)] = p
        else:
            stage.release(p)

    def _loss(self, out: Any, labels: Any, weight: float, n: int, st: RunState) -> torch.Tensor:
        """What micro-batch n's backward starts from: a mean weighted by the micro-batch's share of the batch,
        or a (sum, count) pair's sum, its count kept for the step (see `stagewise.runtime.loss`)."""
        if self.loss_fn is None:
            raise PipelineError("no loss_fn given, so the last stage cannot compute a loss")
        try:
            value, count = split_loss(self.loss_fn(out, labels))
        except LossError as err:
            raise PipelineError(str(err)) from None
        if st.losses and (count is not None) != bool(st.counts):
            raise PipelineError("loss_fn returned a (sum, count) pair for some micro-batches and a scalar for others; "
                                "return one form for every micro-batch")
        if count is None:
            if st.per_item:
                raise PipelineError("loss_fn has a `count` method (it counts a batch's items ahead) but returned a "
                                    "scalar; return (sum, count), or drop the method")
            return value * weight
        if self.schedule.asynchronous:
            raise PipelineError(f"loss_fn returned a (sum, count) pair, which needs every count of a batch before its "
                                f"step; schedule {self.schedule.name!r} steps during the batch. Return a mean, or "
                                "use a flushed schedule")
        st.counts[n], st.sums[n] = count, value.detach()
        return value * weight if st.per_item else value  # else the step divides by the count, once known

    def _backward(self, a: Action, st: RunState, timing: _Timing) -> None:
        """B (input and weight gradients) or I (input gradients only, the rest kept for W)."""
        s, n = a.stage, a.microbatch
        stage = self.stages[s]
        p = st.pending[(s, n)]
        if s == self.last and st.output_grads is not None:  # given from outside
            grads = st.output_grads.pop(n)
        elif s == self.last:  # the loss: seeded with 1, or with the loss scale
            grads = None if self.loss_scale is None else [torch.full_like(t, self.loss_scale()) for t in p.like]
        elif self.schedule.placement[s + 1] == self.device:
            grads = st.grad_in.pop((s + 1, n))
        else:
            grads = st.received.pop(("B", s, n)).wait()
            timing.waited()
        if grads is not None and len(grads) != len(p.like):
            source = "were given" if s == self.last else f"came from stage {s + 1}"
            raise PipelineError(f"{len(grads)} gradients {source} for stage {s}'s {len(p.like)} outputs that need one")
        if a.op == B:
            got = stage.backward(p, grads)
            del st.pending[(s, n)]
        else:
            got = stage.backward_input(p, grads)
        if s > 0:
            st.grad_in[(s, n)] = fill_missing_grads(got, p.inputs)
        elif st.input_grads is not None:
            st.input_grads[n] = fill_missing_grads(got, p.inputs)

    def _recompute(self, a: Action, st: RunState, timing: _Timing) -> None:
        p = st.pending[(a.stage, a.microbatch)]
        self.stages[a.stage].recompute(p)
        timing.extra["saved_bytes"] = p.saved_bytes

    def _weight(self, a: Action, st: RunState, timing: _Timing) -> None:
        self.stages[a.stage].backward_weight(st.pending.pop((a.stage, a.microbatch)))

    def _step(self, a: Action, st: RunState, timing: _Timing) -> None:
        if self.step is not None:
            self.step.run(a, st.counts)

    def _reduce(self, a: Action, st: RunState, timing: _Timing) -> None:
        if self.step is not None:
            self.step.reduce(a)

    # -- errors ------------------------------------------------------------------------------------
    def _peer(self, a: Action) -> int | None:
        """The device this action waits on, if any."""
        placement, s = self.schedule.placement, a.stage
        if a.op in (RECV_F, RECV_B, SEND_F, SEND_B):
            return a.peer
        if a.op == F and s > 0 and placement[s - 1] != self.device:
            return placement[s - 1]
        if a.op in (B, I) and s < self.last and placement[s + 1] != self.device:
            return placement[s + 1]
        return None

    def _explain(self, a: Action, err: Exception, received_spec: Spec | None) -> str:
        where = f"{self.who(a.stage)} failed at {a}"
        cause = f"{type(err).__name__}: {err}"
        text = str(err).lower()
        peer = self._peer(a)
        if peer is not None and any(k in text for k in ("connection", "closed", "reset by peer", "broken pipe")):
            other = a.stage + (1 if a.op in (B, I, RECV_B) else -1)
            return (f"{where}: device {peer} (stage {other}) stopped answering; it crashed or exited, see its own "
                    f"log ({cause.splitlines()[0][:200]})")
        layer = self._failing_layer(a, err)
        if layer is not None and layer[1]:  # a layer given its input by the layer before it: what it was given
            return f"{where}: {cause} ({layer[0]}; {layer[1]})"
        if a.op == F and a.stage > 0 and received_spec is not None and peer is not None:
            got, raised = describe(received_spec), f"{layer[0]}; " if layer else ""
            return f"{where}: {cause} ({raised}its input from stage {a.stage - 1} on device {peer} was {got})"
        return f"{where}: {cause} ({layer[0]})" if layer is not None else f"{where}: {cause}"

    def _failing_layer(self, a: Action, err: BaseException) -> tuple[str, str] | None:
        """(which layer of the stage raised `err` in a forward or recompute, what that layer was given by the layer
        before it), found after the fact: the outermost frame of the traceback run by one of the stage's layers.
        Nothing is recorded while layers run, so a forward that succeeds pays nothing for this."""
        stage = self.stages.get(a.stage)
        if a.op not in (F, RECOMPUTE) or stage is None:
            return None
        layers = list(stage.module)
        index = {id(m): i for i, m in reversed(list(enumerate(layers)))}  # a layer listed twice: its first place
        tb = err.__traceback__
        while tb is not None:
            frame_locals = tb.tb_frame.f_locals
            i = index.get(id(frame_locals.get("self")))
            if i is not None and frame_locals.get("self") is layers[i]:
                break
            tb = tb.tb_next
        else:
            return None
        first = stage.layer_offset
        name = f"layer {first + i} ({type(layers[i]).__name__})"
        raised = f"raised in {name}, of stage {a.stage}'s layers {first}-{first + len(layers) - 1}"
        if i == 0:  # its input is the stage's: from the batch, or from the stage before
            return raised, ""
        args = frame_locals.get("args")  # Module.__call__(self, *args, **kwargs): what the layer was called with
        if not isinstance(args, tuple) or not args:
            return raised, ""
        before = f"layer {first + i - 1} ({type(layers[i - 1]).__name__})"
        return raised, f"its input, the output of {before}, was {_received(args[0])}"

    def _check_signature(self, st: RunState, s: int, n: int, out: Any) -> None:
        """Micro-batches of one batch must agree on every dimension but the batch one (batches may differ); None
        is refused on the stage that returned it (the next stage would fail on it, and be blamed)."""
        if out is None:
            layers = list(self.stages[s].module)
            last = f"layer {self.stages[s].layer_offset + len(layers) - 1} ({type(layers[-1]).__name__})" if layers \
                else "none"
            raise PipelineError(f"{self.who(s)} returned None at F(stage {s}, mb {n}): its last layer, "
                                f"{last}, returned None, so stage {s + 1} would have nothing to work on. Every stage "
                                "but the last must return its output (a tensor, or a tuple, list or dict of tensors); "
                                "check that layer's forward for a missing `return`", stage=s, microbatch=n,
                                action=f"F(stage {s}, mb {n})", rank=self.rank)
        spec = flatten(out)[1]
        shape = shape_key(spec)
        key = (s, n // self.schedule.batch_microbatches)
        first = st.signatures.get(key)
        if first is None:
            st.signatures[key] = (n, spec, shape)
            return
        if first[2] != shape:
            raise PipelineError(
                f"stage {s} returned {describe(spec)} for micro-batch {n} but {describe(first[1])} for micro-batch "
                f"{first[0]}: the output of a stage may change only in its batch dimension within a step, so stage "
                f"{s + 1} cannot rely on it; check stage {s}'s layers", stage=s, microbatch=n, action=f"F{s}")


def _received(x: Any) -> str:
    """What a layer was given, for error messages: its Python type and its tensors' shapes and dtypes."""
    tensors, spec = flatten(x)
    if isinstance(x, torch.Tensor):
        return f"a tensor {describe(spec)}"
    kind = type(x).__name__
    if not tensors:
        return f"a {kind} with no tensor ({repr(x)[:80]})"
    n = len(x) if isinstance(x, tuple | list | dict) else None
    return f"a {kind}{f' of {n} items' if n is not None else ''} holding {describe(spec)}"


def _received_key(a: Action) -> tuple[str, int, int]:
    return ("F" if a.op == RECV_F else "B", a.stage, a.microbatch)
