"""Every rank a thread of this process: `LocalWorld`, its long-lived worker threads, and its collectives.

`Pipeline` with `local_devices=` and `GPipe` run here. `run(fn)` hands `fn(rank)` to a worker
thread per rank and waits for all. With `keep_threads` the workers are started at the first `run`
and kept for the world's life (or until `close`): a fresh thread's first matrix product pays a
per-thread set-up in the BLAS library (milliseconds on the CPU), and GPipe runs two walks per
training step. Otherwise (`Pipeline`) they end with each `run`, so that no idle thread outlives a
pipeline dropped without `close()` (its world may live on in reference cycles until a collection).

Failure policy: the first error aborts every rank waiting on a message or a collective (`abort`),
the others get `timeout` + 2 s to stop, and `run` raises the first error that is not a `PeerError`
(the root cause). A rank stuck in its own computation cannot be stopped from outside: it is left
behind (a daemon thread, named in the error). Either way the world is then failed (`check`
refuses further calls) and its workers end once their current job does.

Messages between ranks go through in-process mailboxes (`LocalTransport`), collectives through a
rendezvous per group; on GPUs both hand tensors over with CUDA events (`stagewise.runtime.streams`).
"""

from __future__ import annotations

import queue
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from stagewise.runtime.errors import PeerError, PipelineError
from stagewise.runtime.grid import Grid, Group
from stagewise.runtime.streams import RankStreams, adopt, ready
from stagewise.runtime.transport import LocalHub, LocalTransport, Transport
from stagewise.runtime.world import World
from stagewise.tree import tensors_of

T = TypeVar("T")


class _Rendezvous:
    """The meeting point of one group's threads: each deposits a value, all read, all leave."""

    def __init__(self, size: int):
        self.size = size
        self.slots: dict[int, Any] = {}
        self.ready: dict[int, Any] = {}  # CUDA events: each deposited value is complete (None on the CPU)
        self.read: dict[int, Any] = {}  # CUDA events: each rank has read the others' values
        self.barrier = threading.Barrier(size) if size > 1 else None


def _serve(inbox: queue.SimpleQueue) -> None:
    """A worker's life: run the jobs of its inbox (each handles its own errors) until it finds None."""
    while True:
        job = inbox.get()
        if job is None:
            return
        job()
        job = None  # let go of the job (what its run computed) while waiting for the next one


class _Workers:
    """One daemon thread per rank, named `{name}-{rank}`."""

    def __init__(self, ranks: Sequence[int], name: str):
        self.inboxes = {r: queue.SimpleQueue() for r in ranks}
        self.threads = {r: threading.Thread(target=_serve, args=(box,), name=f"{name}-{r}", daemon=True)
                        for r, box in self.inboxes.items()}
        for t in self.threads.values():
            t.start()

    def submit(self, rank: int, job: Callable[[], None]) -> None:
        self.inboxes[rank].put(job)

    def close(self, join: bool = True, stuck: Sequence[int] = ()) -> None:
        """Let every worker end once its current job is done; with `join`, wait (briefly) for those not `stuck`."""
        for box in self.inboxes.values():
            box.put(None)
        if join:
            for r, t in self.threads.items():
                if r not in stuck and t is not threading.current_thread():
                    t.join(5.0)


class LocalWorld(World):
    """Every rank is a thread of this process; messages go through in-process mailboxes.

    `devices` gives each rank's torch device (default: the CPU for all); `name` prefixes the worker
    threads' names (`{name}-{rank}`); `keep_threads` keeps them between runs.
    """

    def __init__(self, grid: Grid, timeout: float = 30.0, devices: Sequence[torch.device | str] | None = None,
                 name: str = "stagewise-rank", keep_threads: bool = False):
        self.grid, self.timeout, self.name, self.keep_threads = grid, timeout, name, keep_threads
        self.local_ranks = list(range(grid.size))
        if devices is not None and len(devices) != grid.size:
            raise ValueError(f"{len(devices)} devices given for {grid.size} ranks; give one per rank")
        self.devices = [torch.device(d) for d in devices] if devices is not None else [torch.device("cpu")] * grid.size
        self.hub = LocalHub()
        self._groups: dict[tuple[int, ...], Group] = {}
        self._lock = threading.Lock()
        self._workers: _Workers | None = None
        self.streams = RankStreams()  # on a GPU each rank thread computes on a stream of its own
        self.cuda = any(d.type == "cuda" for d in self.devices)  # collectives then hand tensors over by events

    def device(self, rank: int) -> torch.device:
        return self.devices[rank]

    def transport(self, rank: int, num_stages: int) -> Transport:
        peers = self.grid.pipeline_ranks(self.grid.coords(rank)[1])
        return LocalTransport(self.hub, self.timeout, rank, peers, [self.devices[r] for r in peers])

    def group(self, ranks: Sequence[int]) -> Group:
        key = tuple(ranks)
        with self._lock:
            if key not in self._groups:
                self._groups[key] = Group(key, _Rendezvous(len(key)))
            return self._groups[key]

    def gather(self, values: dict[int, Any]) -> dict[int, Any]:
        return dict(values)

    def compute_once(self, fn: Callable[[], T]) -> T:
        return fn()

    def abort(self, why: str) -> None:
        """Wake every rank waiting on a message or a collective with `why`."""
        self.hub.abort(why)
        with self._lock:
            groups = list(self._groups.values())
        for g in groups:
            if g.handle.barrier is not None:
                g.handle.barrier.abort()

    def run(self, fn: Callable[[int], T], what: str) -> dict[int, T]:
        self.check()
        if len(self.local_ranks) == 1:
            return self._run_alone(fn, what)
        results: dict[int, T] = {}
        errors: dict[int, BaseException] = {}
        done: queue.SimpleQueue = queue.SimpleQueue()
        callers = {r: RankStreams.caller(self.devices[r]) for r in self.local_ranks}  # this thread's streams
        finished: dict[int, Any] = {}

        def job(rank: int) -> None:
            try:
                with self.streams.entered(rank, self.devices[rank], callers[rank]) as finished[rank]:
                    results[rank] = fn(rank)
            except BaseException as err:
                errors[rank] = err
                self.abort(f"rank {rank} failed during {what}: {err}")
            finally:
                done.put(rank)

        workers = self._start()
        for r in self.local_ranks:
            workers.submit(r, lambda r=r: job(r))
        # Wait for every rank; once one has failed, the others get the timeout plus a grace period to end by
        # themselves. A rank stuck in its own computation is left behind and the call fails anyway.
        left, deadline = set(self.local_ranks), None
        while left:
            try:
                left.discard(done.get(timeout=0.05))
            except queue.Empty:
                pass
            if errors and deadline is None:
                deadline = time.monotonic() + self.timeout + 2.0
            if left and deadline is not None and time.monotonic() > deadline:
                stuck = sorted(left)
                self.failed = f"{self._root(errors)}; {', '.join(f'rank {r}' for r in stuck)} did not stop (stuck " \
                              "in its own computation)"
                self._stop(stuck)
                raise PipelineError(self.failed) from self._root_error(errors)
        if errors:
            self.failed = self._root(errors)
            self._stop()
            raise self._root_error(errors)
        if not self.keep_threads:
            self._stop()
        for r in self.local_ranks:  # what the ranks computed is read on this thread's streams next
            RankStreams.rejoin(callers[r], finished.get(r))
        return results

    def _start(self) -> _Workers:
        if self._workers is None:
            self._workers = _Workers(self.local_ranks, self.name)
            if self.keep_threads:  # a world dropped unclosed lets its threads end
                weakref.finalize(self, self._workers.close, False).atexit = False
        return self._workers

    def _stop(self, stuck: Sequence[int] = ()) -> None:
        if self._workers is not None:
            self._workers.close(stuck=stuck)
            self._workers = None

    def close(self) -> None:
        """End the worker threads (a later `run` starts new ones); idempotent."""
        self._stop()

    def _run_alone(self, fn: Callable[[int], T], what: str) -> dict[int, T]:
        rank = self.local_ranks[0]
        try:
            return {rank: fn(rank)}
        except BaseException as err:
            self.failed = f"rank {rank} failed during {what}: {err}"
            raise

    @staticmethod
    def _root_error(errors: dict[int, BaseException]) -> BaseException:
        root = [e for e in errors.values() if not isinstance(e, PeerError)]
        return (root or list(errors.values()))[0]

    def _root(self, errors: dict[int, BaseException]) -> str:
        return str(self._root_error(errors))

    def _exchange(self, rank: int, value: Any, group: Group, combine: Callable[[dict[int, Any]], T]) -> T:
        """Deposit `value`, wait for every member, compute `combine(values by rank)`, wait again, return it.
        Nobody changes a deposited value before the second wait, so `combine` may read the others' tensors."""
        rv: _Rendezvous = group.handle
        rv.slots[rank] = value
        if not self.cuda:
            self._wait(rank, rv, group)
            out = combine(rv.slots)
            self._wait(rank, rv, group)
            return out
        rv.ready[rank] = ready(tensors_of(value))  # the value is complete once this rank's stream says so
        self._wait(rank, rv, group)
        for r in group.ranks:
            if r != rank:
                adopt(tensors_of(rv.slots[r]), rv.ready[r])
        out = combine(rv.slots)
        rv.read[rank] = ready(t for r in group.ranks for t in tensors_of(rv.slots[r]))
        self._wait(rank, rv, group)
        for r in group.ranks:  # nobody changes its value before every reader's stream is done with it
            adopt((), rv.read[r])
        return out

    def _wait(self, rank: int, rv: _Rendezvous, group: Group) -> None:
        if rv.barrier is None:
            return
        try:
            rv.barrier.wait(self.timeout)
        except threading.BrokenBarrierError:
            if self.hub.aborted:
                raise PeerError(self.hub.aborted) from None
            raise PipelineError(f"rank {rank} waited {self.timeout:g} s in a collective of ranks {list(group.ranks)} "
                                "for ranks that never came; raise `timeout=` if their work is legitimately long",
                                rank=rank) from None

    def all_reduce(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> None:
        if len(group.ranks) == 1:
            return

        def total(slots: dict[int, Any]) -> list[torch.Tensor]:
            # the same order on every rank, so every rank computes the same bits
            return [torch.stack([slots[r][i] for r in group.ranks]).sum(0) for i in range(len(tensors))]

        sums = self._exchange(rank, list(tensors), group, total)
        with torch.no_grad():
            for t, s in zip(tensors, sums):
                t.copy_(s)

    def broadcast(self, rank: int, tensor: torch.Tensor, src: int, group: Group) -> None:
        if len(group.ranks) == 1:
            return
        got = self._exchange(rank, tensor, group, lambda slots: slots[src].detach().clone())
        if rank != src:
            with torch.no_grad():
                tensor.copy_(got)

    def all_gather_object(self, rank: int, obj: Any, group: Group) -> list[Any]:
        if len(group.ranks) == 1:
            return [obj]
        return self._exchange(rank, obj, group, lambda slots: [slots[r] for r in group.ranks])


__all__ = ["LocalWorld"]
