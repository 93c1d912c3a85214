"""Walk one device's lowered action list. It never looks at the schedule's name."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch

from stagewise.runtime.errors import PeerError, PipelineError, TransportTimeout
from stagewise.runtime.stage import Pending, Stage
from stagewise.runtime.transport import Handle, Transport, fill_missing_grads
from stagewise.runtime.tree import describe, flatten
from stagewise.schedules.actions import RECV_B, RECV_F, SEND_B, SEND_F, STEP, Action, B, F, I, W
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.timeline import Event

LossFn = Callable[[Any, Any], torch.Tensor]


class Executor:
    """Runs device `device`'s program of a lowered schedule over its `stages` (stage index -> Stage)."""

    def __init__(self, schedule: Schedule, device: int, stages: dict[int, Stage], transport: Transport,
                 loss_fn: LossFn | None, step_fn: Callable[[Action], None] | None = None, rank: int | None = None):
        assert schedule.lowered, "the executor runs lowered schedules (see stagewise.schedules.lower)"
        self.schedule, self.device, self.stages, self.transport = schedule, device, stages, transport
        self.loss_fn, self.step_fn = loss_fn, step_fn
        self.rank = device if rank is None else rank
        self.program = schedule.actions[device]
        self.last = schedule.num_stages - 1
        # With a transport that matches messages by tag, the receives that precede a compute action are
        # posted before the compute action ahead of it, so that the data moves while this device computes.
        self.ahead: dict[int, list[int]] = {}
        if transport.posts_early:
            compute = [i for i, a in enumerate(self.program) if a.op in (F, B, I, W, STEP)]
            for i, k in zip(compute, compute[1:]):
                early = [j for j in range(i + 1, k) if self.program[j].op in (RECV_F, RECV_B)]
                if early:
                    self.ahead[i] = early

    def run(self, inputs: list[Any] | None, labels: list[Any] | None, weights: list[float],
            train: bool = True, keep_outputs: bool = False) -> dict[str, Any]:
        """One pass over the program. `inputs`/`labels` are the micro-batches (needed on the first/last stage).

        Returns `loss` (the weighted sum over micro-batches, on the device holding the last
        stage, else None), `outputs` (last-stage outputs when `keep_outputs`) and `events`.
        """
        pending: dict[tuple[int, int], Pending] = {}
        outputs: dict[tuple[int, int], Any] = {}
        received: dict[tuple[str, int, int], Handle] = {}
        grad_in: dict[tuple[int, int], list] = {}
        signatures: dict[tuple[int, int], tuple[int, Any, Any]] = {}  # (stage, batch) -> (first mb, spec, shapes)
        losses: dict[int, torch.Tensor] = {}  # micro-batch -> its weighted loss (last stage)
        asynchronous = self.schedule.asynchronous
        kept: dict[int, Any] = {}
        events: list[Event] = []
        placement = self.schedule.placement
        received_spec: Any = None

        def post(r: Action) -> None:
            if r.op == RECV_F:
                received[("F", r.stage, r.microbatch)] = self.transport.recv_activation(
                    r.stage - 1, r.stage, r.microbatch, r.peer)
            else:
                like = pending[(r.stage, r.microbatch)].roots
                received[("B", r.stage, r.microbatch)] = self.transport.recv_grad(
                    like, r.stage + 1, r.stage, r.microbatch, r.peer)

        for i, a in enumerate(self.program):
            if not train and a.op in (B, I, W, SEND_B, RECV_B, STEP):
                continue
            if a.op in (RECV_F, RECV_B) and ("F" if a.op == RECV_F else "B", a.stage, a.microbatch) in received:
                continue  # posted early
            for j in self.ahead.get(i, ()):
                r = self.program[j]
                if r.op == RECV_B and (not train or (r.stage, r.microbatch) not in pending):
                    continue  # its shapes come from a forward not run yet: posted in its place
                t0 = time.perf_counter()
                try:
                    post(r)
                except Exception as err:
                    raise PipelineError(self._explain(r, err, received_spec), stage=r.stage,
                                        microbatch=r.microbatch, action=str(r), rank=self.rank) from err
                events.append(Event(self.device, t0, time.perf_counter(), r.op, r.stage, r.microbatch, r.version,
                                    {"early": True}))
            t0 = time.perf_counter()
            extra: dict[str, Any] = {}
            try:
                op, s, n = a.op, a.stage, a.microbatch
                if op == F:
                    stage = self.stages[s]
                    if s == 0:
                        x = inputs[n]
                    elif placement[s - 1] == self.device:
                        x = outputs.pop((s - 1, n))
                    else:
                        x = received.pop(("F", s, n)).wait()
                        received_spec = flatten(x)[1]
                        t0 = _waited(extra, t0)
                    with torch.set_grad_enabled(train):
                        out, p = stage.forward(x, first=(s == 0), version=a.version if asynchronous else None)
                        if s == self.last:
                            if self.loss_fn is None:
                                raise PipelineError("no loss_fn given, so the last stage cannot compute a loss")
                            loss = self.loss_fn(out, labels[n])
                            if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
                                raise PipelineError(f"loss_fn must return a scalar tensor, got {type(loss).__name__}"
                                                    f"{'' if not isinstance(loss, torch.Tensor) else list(loss.shape)}")
                            weighted = loss * weights[n]
                            losses[n] = weighted.detach()
                            p.roots = [weighted] if train and weighted.requires_grad else []
                            if keep_outputs:
                                kept[n] = out.detach() if isinstance(out, torch.Tensor) else out
                        else:
                            self._check_signature(signatures, s, n, out)
                            outputs[(s, n)] = out
                            p.roots = [t for t in flatten(out)[0] if t.requires_grad] if train else []
                    extra["saved_bytes"] = p.saved_bytes
                    if train:
                        pending[(s, n)] = p
                    else:
                        stage.release(p)
                elif op in (B, I):
                    stage = self.stages[s]
                    p = pending[(s, n)]
                    if s == self.last:
                        grads = None
                    elif placement[s + 1] == self.device:
                        grads = grad_in.pop((s + 1, n))
                    else:
                        grads = received.pop(("B", s, n)).wait()
                        t0 = _waited(extra, t0)
                    if grads is not None and len(grads) != len(p.roots):
                        raise PipelineError(f"stage {s + 1} returned {len(grads)} gradients for {len(p.roots)} "
                                            "outputs that need one")
                    if op == B:
                        got = stage.backward(p, grads)
                        del pending[(s, n)]
                    else:
                        got = stage.backward_input(p, grads)
                    if s > 0:
                        grad_in[(s, n)] = fill_missing_grads(got, p.inputs)
                elif op == W:
                    self.stages[s].backward_weight(pending.pop((s, n)))
                elif op == SEND_F:
                    before = self.transport.bytes_sent
                    self.transport.send_activation(outputs.pop((s, n)), s, s + 1, n, a.peer)
                    extra["bytes"] = self.transport.bytes_sent - before
                elif op in (RECV_F, RECV_B):
                    post(a)
                elif op == SEND_B:
                    before = self.transport.bytes_sent
                    self.transport.send_grad(grad_in.pop((s, n)), s, s - 1, n, a.peer)
                    extra["bytes"] = self.transport.bytes_sent - before
                elif op == STEP:
                    if self.step_fn is not None:
                        self.step_fn(a)
            except (PipelineError, PeerError):
                raise
            except TransportTimeout as err:
                raise PipelineError(f"stage {a.stage} (rank {self.rank}) timed out at {a}: {err}; the peer "
                                    "is slow or stuck (raise `timeout=` if its work is legitimately long)",
                                    stage=a.stage, microbatch=a.microbatch, action=str(a), rank=self.rank) from err
            except Exception as err:
                raise PipelineError(self._explain(a, err, received_spec), stage=a.stage, microbatch=a.microbatch,
                                    action=str(a), rank=self.rank) from err
            events.append(Event(self.device, t0, time.perf_counter(), a.op, a.stage, a.microbatch, a.version, extra))
        t0 = time.perf_counter()
        self.transport.finish()
        if train and (pending or grad_in) and not self.schedule.asynchronous:
            left = sorted(set(pending) | set(grad_in))
            raise PipelineError(f"device {self.device}: the schedule left work unfinished for (stage, mb) {left[:4]}")
        total = torch.stack([losses[n] for n in sorted(losses)]).sum() if losses else None
        return {"loss": total, "losses": losses, "outputs": [kept[i] for i in sorted(kept)], "events": events,
                "finish_s": time.perf_counter() - t0}

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

    def _explain(self, a: Action, err: Exception, received_spec: Any) -> str:
        where = f"stage {a.stage} (rank {self.rank}) failed at {a}"
        cause = f"{type(err).__name__}: {err}"
        text = str(err).lower()
        peer = self._peer(a)
        if peer is not None and any(k in text for k in ("connection", "closed", "reset by peer", "broken pipe")):
            other = a.stage + (1 if a.op in (B, I, RECV_B) else -1)
            return (f"{where}: device {peer} (stage {other}) stopped answering; it crashed or exited, see its own "
                    f"log ({cause.splitlines()[0][:200]})")
        if a.op == F and a.stage > 0 and received_spec is not None and peer is not None:
            got = describe(received_spec)
            return f"{where}: {cause} (its input from stage {a.stage - 1} on device {peer} was {got})"
        return f"{where}: {cause}"

    def _check_signature(self, signatures: dict[tuple[int, int], tuple[int, Any, Any]], s: int, n: int,
                         out: Any) -> None:
        """Micro-batches of one batch must agree on every dimension but the batch one (batches may differ)."""
        spec = flatten(out)[1]
        shape = _shape_key(spec)
        key = (s, n // self.schedule.batch_microbatches)
        first = signatures.get(key)
        if first is None:
            signatures[key] = (n, spec, shape)
            return
        if first[2] != shape:
            raise PipelineError(
                f"stage {s} returned {describe(spec)} for micro-batch {n} but {describe(first[1])} for micro-batch "
                f"{first[0]}: the output of a stage may change only in its batch dimension within a step, so stage "
                f"{s + 1} cannot rely on it; check stage {s}'s layers", stage=s, microbatch=n, action=f"F{s}")


def _waited(extra: dict[str, Any], t0: float) -> float:
    """Record the time spent waiting for a peer before the computation starts; return the new start."""
    now = time.perf_counter()
    extra["wait_s"] = now - t0
    return now


def _shape_key(spec: Any) -> Any:
    from stagewise.runtime.tree import slots

    return [(tuple(sl[1][1:]), sl[2]) for sl in slots(spec)]
