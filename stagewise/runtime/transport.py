"""Moving stage I/O between devices: torch.distributed point-to-point, or in-process mailboxes.

An activation message is a small header (signature id, metadata length), the metadata
(structure, shapes, dtypes) only when the signature is new on that channel, and one
payload buffer. So shapes are negotiated once per signature and again whenever they
change (variable sequence lengths need no padding). A gradient message is just the
payload: the receiver sent the activations and knows their shapes.

A gloo send only moves once its receive is posted, so receives are posted ahead of need
(the executor posts them one compute action early, `posts_early`), and the receiver posts
the activation's payload receive at once, next to the header's, whenever it can predict
the payload: when the last two messages for the same (stage, micro-batch index) had one
signature (steady training). Both sides keep that history, so the sender knows what was
predicted; should the signature then change, it sends a filler of the predicted size in
the payload's place and the real payload under its own tag.
"""

from __future__ import annotations

import queue
import threading
import time
from abc import ABC, abstractmethod
from datetime import timedelta
from typing import Any

import torch

from stagewise.runtime.errors import PeerError, TransportTimeout
from stagewise.runtime.streams import adopt, ready
from stagewise.tree import dumps, flatten, loads, slots, unflatten

_ALIGN = 16


def pack(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One buffer holding all tensors (the tensor itself when there is only one)."""
    if len(tensors) == 1:
        return tensors[0].detach().contiguous()
    parts = []
    for t in tensors:
        b = t.detach().contiguous().view(-1).view(torch.uint8)
        pad = (-b.numel()) % _ALIGN
        parts.append(b)
        if pad:
            parts.append(b.new_zeros(pad))
    if not parts:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.cat(parts)


def buffer_for(specs: list[tuple[tuple[int, ...], torch.dtype]], device: torch.device) -> torch.Tensor:
    if len(specs) == 1:
        shape, dtype = specs[0]
        return torch.empty(shape, dtype=dtype, device=device)
    total = 0
    for shape, dtype in specs:
        n = _nbytes(shape, dtype)
        total += n + (-n) % _ALIGN
    return torch.empty(total, dtype=torch.uint8, device=device)


def unpack(buf: torch.Tensor, specs: list[tuple[tuple[int, ...], torch.dtype]]) -> list[torch.Tensor]:
    if len(specs) == 1:
        return [buf]
    out, offset = [], 0
    for shape, dtype in specs:
        n = _nbytes(shape, dtype)
        out.append(buf[offset:offset + n].view(dtype).view(shape))
        offset += n + (-n) % _ALIGN
    return out


def _nbytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for s in shape:
        numel *= s
    return numel * torch.empty(0, dtype=dtype).element_size()


class Handle(ABC):
    """A posted receive; `wait()` returns what arrived."""

    @abstractmethod
    def wait(self) -> Any:
        """Block (up to the transport's timeout) until the message is here; return it."""


class Transport(ABC):
    """Sends and receives between devices; `src`/`dst` are stages, `peer` the other device.

    Sends return at once (the payload must stay untouched until `finish`); receives are
    posted and waited on later through their `Handle`.
    """

    bytes_sent = 0
    posts_early = False  # receives may be posted before their place in the program (messages matched by tag)

    @abstractmethod
    def send_activation(self, tree: Any, src: int, dst: int, mb: int, peer: int) -> None:
        """Send stage `src`'s output for micro-batch `mb` (a tensor or a nested structure)."""

    @abstractmethod
    def recv_activation(self, src: int, dst: int, mb: int, peer: int) -> Handle:
        """Post the receive of stage `dst`'s input; the handle gives the structure back."""

    @abstractmethod
    def send_grad(self, grads: list[torch.Tensor], src: int, dst: int, mb: int, peer: int) -> None:
        """Send the gradients of stage `src`'s inputs that need one, in flatten order."""

    @abstractmethod
    def recv_grad(self, like: list[torch.Tensor], src: int, dst: int, mb: int, peer: int) -> Handle:
        """Post the receive of gradients shaped like `like` (stage `dst`'s outputs that need one)."""

    @abstractmethod
    def finish(self) -> None:
        """Wait until every send has been delivered."""


def fill_missing_grads(grads: list[torch.Tensor | None], like: list[torch.Tensor]) -> list[torch.Tensor]:
    """Zeros where an input got no gradient (it did not reach the loss), so every message has one per slot."""
    return [torch.zeros_like(x) if g is None else g for g, x in zip(grads, like)]


class DistTransport(Transport):
    """torch.distributed isend/irecv between ranks; `ordered` for backends that match by order (NCCL)."""

    def __init__(self, device: torch.device, num_stages: int, timeout: float, ordered: bool = False,
                 peers: list[int] | None = None):
        import torch.distributed as dist

        self.dist, self.device, self.S = dist, device, num_stages
        self.peers = peers  # pipeline device -> global rank (None: the same numbers)
        self.timeout = timeout
        self.ordered = ordered
        self.sent_sigs: dict[tuple, dict[bytes, int]] = {}
        self.recv_sigs: dict[tuple, dict[int, tuple[Any, bytes]]] = {}
        # (dst stage, micro-batch index) -> (metadata of the last message there, how many in a row had it, up
        # to 2); kept alike on both sides, it says when the receiver predicts the payload (see the module doc).
        self.sent_history: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.recv_history: dict[tuple[int, int], tuple[bytes, int]] = {}
        self.pending_sends: list[tuple[Any, Any]] = []
        self.bytes_sent = 0
        self.posts_early = not ordered

    def _tag(self, direction: int, dst: int, mb: int, part: int) -> int:
        return (((mb % (1 << 20)) * self.S + dst) * 2 + direction) * 4 + part

    def _isend(self, t: torch.Tensor, peer: int, tag: int) -> None:
        work = self.dist.isend(t, self._rank(peer), tag=0 if self.ordered else tag)
        self.pending_sends.append((work, t))
        self.bytes_sent += t.numel() * t.element_size()

    def _irecv(self, t: torch.Tensor, peer: int, tag: int) -> Any:
        return self.dist.irecv(t, self._rank(peer), tag=0 if self.ordered else tag)

    def _rank(self, peer: int) -> int:
        return peer if self.peers is None else self.peers[peer]

    def _wait(self, work: Any, what: str) -> None:
        try:
            work.wait(timedelta(seconds=self.timeout))
        except RuntimeError as err:
            if "timed out" in str(err).lower() or "timeout" in str(err).lower():
                raise TransportTimeout(f"no {what} after {self.timeout:g} s") from err
            raise

    def send_activation(self, tree: Any, src: int, dst: int, mb: int, peer: int) -> None:
        tensors, spec = flatten(tree)
        meta = dumps(spec)
        sigs = self.sent_sigs.setdefault((dst,), {})
        new = meta not in sigs
        if new:
            sigs[meta] = len(sigs)
        header = torch.tensor([sigs[meta], len(meta) if new else 0], dtype=torch.int64, device=self.device)
        self._isend(header, peer, self._tag(0, dst, mb, 0))
        if new:
            self._isend(torch.frombuffer(bytearray(meta), dtype=torch.uint8).to(self.device), peer,
                        self._tag(0, dst, mb, 1))
        part = 2
        predicted = self._predicted(self.sent_history, (dst, mb))
        if predicted is not None and predicted != meta:  # the receiver posted a payload of the old size: fill it
            nbytes = _buffer_bytes(_payload_specs(loads(predicted)))
            if nbytes:
                self._isend(torch.zeros(nbytes, dtype=torch.uint8, device=self.device), peer,
                            self._tag(0, dst, mb, 2))
            part = 3
        if tensors:
            self._isend(pack(tensors), peer, self._tag(0, dst, mb, part))
        _remember(self.sent_history, (dst, mb), meta)

    def recv_activation(self, src: int, dst: int, mb: int, peer: int) -> Handle:
        header = torch.empty(2, dtype=torch.int64, device=self.device)
        work = self._irecv(header, peer, self._tag(0, dst, mb, 0))
        handle = _ActivationHandle(self, header, work, dst, mb, peer, src)
        predicted = self._predicted(self.recv_history, (dst, mb))
        if predicted is not None:
            specs = _payload_specs(loads(predicted))
            buf = buffer_for(specs, self.device) if specs else None
            posted = self._irecv(buf, peer, self._tag(0, dst, mb, 2)) if specs else None
            handle.predicted = (predicted, buf, posted)
        if self.ordered:
            handle.receive_payload()
        return handle

    def _predicted(self, history: dict[tuple[int, int], tuple[bytes, int]], key: tuple[int, int]) -> bytes | None:
        """The metadata the receiver predicts for the next message on `key`: the last one, seen twice in a row.
        Never in ordered mode, where messages match in posting order and nothing is posted out of turn."""
        last = history.get(key)
        return last[0] if not self.ordered and last is not None and last[1] >= 2 else None

    def send_grad(self, grads: list[torch.Tensor], src: int, dst: int, mb: int, peer: int) -> None:
        if grads:
            self._isend(pack(grads), peer, self._tag(1, dst, mb, 2))

    def recv_grad(self, like: list[torch.Tensor], src: int, dst: int, mb: int, peer: int) -> Handle:
        specs = [(tuple(t.shape), t.dtype) for t in like]
        if not specs:
            return _Ready([])
        buf = buffer_for(specs, self.device)
        work = self._irecv(buf, peer, self._tag(1, dst, mb, 2))
        return _GradHandle(self, work, buf, specs, f"gradient for stage {dst} micro-batch {mb} from stage {src}")

    def finish(self) -> None:
        for work, _ in self.pending_sends:
            self._wait(work, "acknowledgement of a send")
        self.pending_sends.clear()


class _Ready(Handle):
    def __init__(self, value: Any):
        self.value = value

    def wait(self) -> Any:
        return self.value


class _GradHandle(Handle):
    def __init__(self, tr: DistTransport, work: Any, buf: torch.Tensor, specs: list, what: str):
        self.tr, self.work, self.buf, self.specs, self.what = tr, work, buf, specs, what

    def wait(self) -> list[torch.Tensor]:
        self.tr._wait(self.work, self.what)
        return unpack(self.buf, self.specs)


class _ActivationHandle(Handle):
    def __init__(self, tr: DistTransport, header: torch.Tensor, work: Any, dst: int, mb: int, peer: int, src: int):
        self.tr, self.header, self.work, self.dst, self.mb, self.peer, self.src = tr, header, work, dst, mb, peer, src
        self.result: tuple[Any, Any, list] | None = None
        self.predicted: tuple[bytes, torch.Tensor | None, Any] | None = None  # (metadata, buffer, work) posted

    def receive_payload(self) -> None:
        tr, what = self.tr, f"activation for stage {self.dst} micro-batch {self.mb} from stage {self.src}"
        tr._wait(self.work, what)
        sig, meta_len = (int(x) for x in self.header.tolist())
        sigs = tr.recv_sigs.setdefault((self.dst,), {})
        if meta_len:
            meta = torch.empty(meta_len, dtype=torch.uint8, device=tr.device)
            tr._wait(tr._irecv(meta, self.peer, tr._tag(0, self.dst, self.mb, 1)), what)
            raw = meta.cpu().numpy().tobytes()
            sigs[sig] = (loads(raw), raw)
        spec, raw = sigs[sig]
        _remember(tr.recv_history, (self.dst, self.mb), raw)
        specs = _payload_specs(spec)
        part = 2
        if self.predicted is not None:
            guessed, gbuf, gwork = self.predicted
            if guessed == raw:  # as predicted: the payload's receive is posted already
                self.result = (spec, gwork, (gbuf, specs))
                return
            if gwork is not None:  # a filler of the predicted size came in the payload's place
                tr._wait(gwork, what)
            part = 3
        buf, work = None, None
        if specs:
            buf = buffer_for(specs, tr.device)
            work = tr._irecv(buf, self.peer, tr._tag(0, self.dst, self.mb, part))
        self.result = (spec, work, (buf, specs))

    def wait(self) -> Any:
        if self.result is None:
            self.receive_payload()
        spec, work, (buf, specs) = self.result
        if work is None:
            return unflatten(spec, [])
        self.tr._wait(work, f"activation for stage {self.dst} micro-batch {self.mb} from stage {self.src}")
        tensors = unpack(buf, specs)
        tensors = [t.requires_grad_(True) if s.requires_grad and t.is_floating_point() else t
                   for t, s in zip(tensors, slots(spec))]
        return unflatten(spec, tensors)


def _remember(history: dict[tuple[int, int], tuple[bytes, int]], key: tuple[int, int], meta: bytes) -> None:
    last = history.get(key)
    history[key] = (meta, min(last[1] + 1, 2)) if last is not None and last[0] == meta else (meta, 1)


def _payload_specs(spec: Any) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(s.shape, s.dtype) for s in slots(spec)]


def _buffer_bytes(specs: list[tuple[tuple[int, ...], torch.dtype]]) -> int:
    """Bytes of the buffer `buffer_for(specs)` allocates (the one a `pack` of such tensors fills)."""
    if len(specs) == 1:
        return _nbytes(*specs[0])
    return sum(n + (-n) % _ALIGN for n in (_nbytes(shape, dtype) for shape, dtype in specs))


class LocalTransport(Transport):
    """In-process transport between ranks that are threads of one process (`LocalWorld`: Pipeline's threads,
    GPipe's partitions).

    A message hands the tensors over as they are (detached: no copy) when the receiver computes on their
    device, else as a copy on the receiver's device (`devices`, pipeline device -> torch device); between
    GPUs the copy is issued on a copy stream of the sender's, so that it overlaps the sender's compute. On
    GPUs every message carries CUDA events (`ready`), which the receiver's stream waits for (`adopt`).
    """

    def __init__(self, hub: LocalHub, timeout: float, rank: int = 0, peers: list[int] | None = None,
                 devices: list[torch.device] | None = None):
        self.hub, self.timeout, self.rank = hub, timeout, rank
        self.peers = peers  # pipeline device -> rank (None: the same numbers)
        self.devices = devices  # pipeline device -> torch device (None: tensors stay where they are)
        self.copy_streams: dict[torch.device, Any] = {}  # source GPU -> its copy stream
        self.bytes_sent = 0

    def _rank(self, peer: int) -> int:
        return peer if self.peers is None else self.peers[peer]

    def _hand_over(self, tensors: list[torch.Tensor | None], peer: int) -> list[torch.Tensor | None]:
        """The tensors as the receiver (pipeline device `peer`) gets them: detached, on its device."""
        dst = None if self.devices is None else self.devices[peer]
        out = []
        for t in tensors:
            if t is not None:
                t = t.detach()
                if dst is not None and t.device != dst:
                    t = self._copy(t, dst)
                self.bytes_sent += t.numel() * t.element_size()
            out.append(t)
        return out

    def _copy(self, t: torch.Tensor, dst: torch.device) -> torch.Tensor:
        if t.device.type != "cuda" or dst.type != "cuda":
            return t.to(dst)  # to or from the host: complete when it returns
        stream = self.copy_streams.get(t.device)
        if stream is None:
            stream = self.copy_streams[t.device] = torch.cuda.Stream(t.device)
        stream.wait_stream(torch.cuda.current_stream(t.device))  # the tensor is complete on the sender's stream
        with torch.cuda.stream(stream):
            moved = t.to(dst, non_blocking=True)  # dst's current stream (where `ready` records) waits for it
        t.record_stream(stream)  # the sender's memory is not reused before the copy has read it
        return moved

    def send_activation(self, tree: Any, src: int, dst: int, mb: int, peer: int) -> None:
        tensors, spec = flatten(tree)
        moved = self._hand_over(tensors, peer)
        self.hub.put(("F", src, dst, mb, self._rank(peer)), (spec, moved, ready(moved)))

    def recv_activation(self, src: int, dst: int, mb: int, peer: int) -> Handle:
        return _LocalHandle(self, ("F", src, dst, mb, self.rank), grad=False)

    def send_grad(self, grads: list[torch.Tensor], src: int, dst: int, mb: int, peer: int) -> None:
        moved = self._hand_over(grads, peer)
        self.hub.put(("B", src, dst, mb, self._rank(peer)), (moved, ready(t for t in moved if t is not None)))

    def recv_grad(self, like: list[torch.Tensor], src: int, dst: int, mb: int, peer: int) -> Handle:
        return _LocalHandle(self, ("B", src, dst, mb, self.rank), grad=True)

    def finish(self) -> None:
        return None


class LocalHub:
    """Mailboxes shared by the devices of one process; `abort()` wakes every waiter with an error."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.boxes: dict[tuple, queue.Queue] = {}
        self.aborted: str | None = None

    def box(self, key: tuple) -> queue.Queue:
        with self.lock:
            return self.boxes.setdefault(key, queue.Queue())

    def put(self, key: tuple, value: Any) -> None:
        self.box(key).put(value)

    def abort(self, why: str) -> None:
        self.aborted = why


class _LocalHandle(Handle):
    def __init__(self, tr: LocalTransport, key: tuple, grad: bool):
        self.tr, self.key, self.grad = tr, key, grad

    def wait(self) -> Any:
        box = self.tr.hub.box(self.key)
        deadline = time.monotonic() + self.tr.timeout
        while True:
            if self.tr.hub.aborted:
                raise PeerError(self.tr.hub.aborted)
            try:
                value = box.get(timeout=0.05)
                break
            except queue.Empty:
                if time.monotonic() > deadline:
                    kind, src, dst, mb, _ = self.key
                    what = "gradient" if self.grad else "activation"
                    raise TransportTimeout(f"no {what} for stage {dst} micro-batch {mb} from stage {src} "
                                           f"after {self.tr.timeout:g} s") from None
        if self.grad:
            grads, events = value
            adopt((g for g in grads if g is not None), events)  # on a GPU: after the sender's stream made them
            return grads
        spec, tensors, events = value
        adopt(tensors, events)
        tensors = [t.requires_grad_(True) if s.requires_grad and t.is_floating_point() else t
                   for t, s in zip(tensors, slots(spec))]
        return unflatten(spec, tensors)


__all__ = ["DistTransport", "Handle", "LocalHub", "LocalTransport", "Transport", "fill_missing_grads"]
