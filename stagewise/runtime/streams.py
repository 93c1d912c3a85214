"""CUDA streams and events for ranks that are threads of one process, and the clock that times actions.

On a GPU every rank thread computes on a stream of its own (`RankStreams`), so two stages on one GPU
overlap as far as the hardware lets them. Whatever crosses from one rank's stream to another's carries
an event (`ready`): the receiver's stream waits for it before using the tensors and `record_stream`
tells the caching allocator they are used there, so their memory is not reused while the receiver's
kernels still read them. On the CPU all of this is a no-op: the functions take the device from the
tensors and return at once when it is not CUDA.

`ActionClock` stamps an action's start and end: host `perf_counter` on the CPU; CUDA events on a GPU
(kernels run asynchronously, so the host's clock would time the launches, not the work), turned into
seconds on the host's clock once the pass is over (`resolve`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

import torch


def _cuda_devices(tensors: Iterable[torch.Tensor]) -> list[torch.device]:
    seen: list[torch.device] = []
    for t in tensors:
        if t.device.type == "cuda" and t.device not in seen:
            seen.append(t.device)
    return seen


def ready(tensors: Iterable[torch.Tensor]) -> dict[torch.device, Any] | None:
    """Events recorded on the calling thread's current stream of every CUDA device the tensors live on: what
    another thread's stream must wait for before reading them (None when none is on a GPU)."""
    devices = _cuda_devices(tensors)
    if not devices:
        return None
    events = {}
    for d in devices:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(d))
        events[d] = ev
    return events


def adopt(tensors: Iterable[torch.Tensor], events: dict[torch.device, Any] | None) -> None:
    """Make the calling thread's current streams wait for `events` (from `ready`) and mark the tensors as used
    on them, so the allocator keeps their memory until this stream is done with them."""
    if not events:
        return
    for d, ev in events.items():
        torch.cuda.current_stream(d).wait_event(ev)
    for t in tensors:
        if t.device.type == "cuda":
            t.record_stream(torch.cuda.current_stream(t.device))


class RankStreams:
    """A CUDA stream per rank thread (created on first use, kept for the World's life)."""

    def __init__(self) -> None:
        self.streams: dict[int, Any] = {}

    @contextmanager
    def entered(self, rank: int, device: torch.device, caller: Any) -> Iterator[Any]:
        """Run the block on `rank`'s stream, after what `caller` (the launching thread's stream) queued; yields
        an event the caller's stream waits for afterwards (`rejoin`). A no-op off CUDA (yields None)."""
        if device.type != "cuda":
            yield None
            return
        stream = self.streams.get(rank)
        if stream is None:
            stream = self.streams[rank] = torch.cuda.Stream(device)
        stream.wait_stream(caller)
        with torch.cuda.device(device), torch.cuda.stream(stream):
            done = torch.cuda.Event()
            try:
                yield done
            finally:
                done.record(stream)

    @staticmethod
    def caller(device: torch.device) -> Any:
        """The launching thread's current stream on `device` (None off CUDA), taken before the ranks start."""
        return torch.cuda.current_stream(device) if device.type == "cuda" else None

    @staticmethod
    def rejoin(caller: Any, done: Any) -> None:
        """Make the launching thread's stream wait for a rank's work (its `done` event)."""
        if caller is not None and done is not None:
            caller.wait_event(done)


class ActionClock:
    """Start and end stamps of a device's actions: host seconds on the CPU, CUDA events on a GPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.device = device
        self.origin: tuple[float, Any] | None = None

    def stamp(self) -> Any:
        """Now: a host time, or an event recorded on the current stream."""
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record(torch.cuda.current_stream(self.device))
        if self.origin is None:
            self.origin = (time.perf_counter(), ev)
        return ev

    def seconds(self, stamp: Any) -> float:
        """A stamp in host seconds (CUDA: the origin's host time plus the GPU time elapsed since it); a stamp
        already in seconds is returned as it is."""
        if not self.cuda or isinstance(stamp, float):
            return stamp
        host, first = self.origin
        stamp.synchronize()
        return host + first.elapsed_time(stamp) / 1e3

    def reset(self) -> None:
        self.origin = None
