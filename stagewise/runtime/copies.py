"""Moving stage I/O between the devices of one process; on GPUs, on copy streams so copies overlap compute.

Every pipeline device has a `Lane`: its torch device, the stream its partition computes on (the
caller's current stream on that device, taken when the model is called) and, on a GPU, a copy
stream of its own. A copy from device a to device b is issued by a's worker thread:

- a's copy stream first waits for a's compute stream (the tensors are ready);
- the copy runs with a's copy stream current on a and b's copy stream current on b (a copy
  between GPUs runs on the source's current stream and makes the destination's current stream
  wait, so neither compute stream is held up);
- an event recorded on b's copy stream travels with the tensors, and b's compute stream waits
  for it where b's worker takes them (`receive`);
- `record_stream` tells the caching allocator that the source tensors are read on a's copy stream
  and the copies used on b's compute stream, so no memory is reused too early.

Tensors on one device (the CPU, or two partitions on one GPU) pass as they are. This CUDA path
has not been run on GPUs yet (the development machine has none).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch

from stagewise.tree import flatten, unflatten


@dataclass(frozen=True)
class Lane:
    """A pipeline device as the copies see it (streams are None off CUDA)."""

    device: torch.device
    compute: Any = None  # torch.cuda.Stream
    copy: Any = None  # torch.cuda.Stream

    @classmethod
    def of(cls, device: torch.device, copy_stream: Any = None) -> Lane:
        """The lane of `device`, computing on the caller's current stream there."""
        if device.type != "cuda":
            return cls(device)
        return cls(device, torch.cuda.current_stream(device), copy_stream)

    @contextmanager
    def active(self) -> Iterator[None]:
        """Make this lane's device and compute stream current in the calling thread."""
        if self.compute is None:
            yield
            return
        with torch.cuda.device(self.device), torch.cuda.stream(self.compute):
            yield

    def settle(self) -> None:
        """Make the calling thread's current stream on this device wait for the lane's compute stream (after
        the workers are done, before the caller uses what they produced)."""
        if self.compute is not None:
            torch.cuda.current_stream(self.device).wait_stream(self.compute)

    def catch_up(self) -> None:
        """Make the lane's compute stream wait for the calling thread's current stream (before the workers use
        what the caller produced)."""
        if self.compute is not None:
            self.compute.wait_stream(torch.cuda.current_stream(self.device))


@dataclass
class Parcel:
    """Tensors on their way to a device, and the event that says they have arrived (CUDA only)."""

    tree: Any
    ready: Any = None  # torch.cuda.Event


def send(tree: Any, src: Lane, dst: Lane) -> Parcel:
    """A copy of `tree` on `dst`'s device, issued from `src`'s worker thread: its tensors are leaves that
    require a gradient where the originals did."""
    tensors, spec = flatten(tree)
    wants = [t.requires_grad for t in tensors]
    tensors = [t.detach() for t in tensors]
    if src.device == dst.device:
        return Parcel(unflatten(spec, _leaves(tensors, wants)))
    if src.copy is None and dst.copy is None:
        return Parcel(unflatten(spec, _leaves([t.to(dst.device) for t in tensors], wants)))
    with ExitStack() as streams:
        if src.copy is not None:
            src.copy.wait_stream(src.compute)
            streams.enter_context(torch.cuda.stream(src.copy))
        if dst.copy is not None:
            streams.enter_context(torch.cuda.stream(dst.copy))
        # non-blocking only between GPUs: a copy into host memory must be complete when the receiver reads it
        moved = [t.to(dst.device, non_blocking=src.copy is not None and dst.copy is not None) for t in tensors]
        ready = None
        if dst.copy is not None:
            ready = torch.cuda.Event()
            ready.record(dst.copy)
    if src.copy is not None:
        for t in tensors:
            t.record_stream(src.copy)
    if dst.compute is not None:
        for t in moved:
            t.record_stream(dst.compute)
    return Parcel(unflatten(spec, _leaves(moved, wants)), ready)


def _leaves(tensors: list[torch.Tensor], wants: list[bool]) -> list[torch.Tensor]:
    return [t.requires_grad_(True) if w else t for t, w in zip(tensors, wants)]


def receive(parcel: Parcel, dst: Lane) -> Any:
    """The tensors of `parcel`, usable on `dst`'s compute stream."""
    if parcel.ready is not None:
        dst.compute.wait_event(parcel.ready)
    return parcel.tree
