"""The World: which ranks there are, where each computes, how they talk, and what happens when one fails.

Two worlds behind one interface. `LocalWorld` runs every rank as a thread of this process
(notebooks, tests, one machine with several GPUs); `DistWorld` is one rank per process
(torchrun), talking through `torch.distributed`. Code above the World (`Pipeline`, the
training step's parts, ties) never asks which one it has.

Ranks form a grid with named axes, `pipeline` (P devices, one pipeline) and `data` (D
replicas): rank = pipeline device x D + replica, so the D replicas of one pipeline device
are consecutive ranks (on one node, where the gradient reduction is heaviest) and one
pipeline is every D-th rank, as DeepSpeed's and Megatron's pipe-outer layouts give.

Calls come in two kinds:
- rank-level collectives (`all_reduce`, `broadcast`, `all_gather_object`, `barrier`) are
  called by every member rank of a group from inside `run`, naming the calling rank;
- process-level calls (`run`, `gather`, `compute_once`, `group`) are made once per process,
  by the caller's thread, in the same order on every process.
"""

from __future__ import annotations

import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from stagewise.runtime import launch
from stagewise.runtime.errors import PeerError, PipelineError
from stagewise.runtime.status import RankStatus, for_rank
from stagewise.runtime.streams import RankStreams, adopt, ready
from stagewise.runtime.transport import DistTransport, LocalHub, LocalTransport, Transport
from stagewise.tree import tensors_of

T = TypeVar("T")


@dataclass(frozen=True)
class Grid:
    """Ranks as a `pipeline` x `data` grid: rank = device * data + replica."""

    pipeline: int
    data: int = 1

    @property
    def size(self) -> int:
        return self.pipeline * self.data

    def rank(self, device: int, replica: int = 0) -> int:
        return device * self.data + replica

    def coords(self, rank: int) -> tuple[int, int]:
        """(pipeline device, data replica) of `rank`."""
        return divmod(rank, self.data)

    def pipeline_ranks(self, replica: int) -> list[int]:
        """The ranks of one pipeline, indexed by pipeline device."""
        return [self.rank(d, replica) for d in range(self.pipeline)]

    def data_ranks(self, device: int) -> list[int]:
        """The D replicas of one pipeline device."""
        return [self.rank(device, r) for r in range(self.data)]


@dataclass(frozen=True)
class GridGroups:
    """The groups of the grid's axes: one pipeline per replica, the D replicas of each device, and everyone."""

    pipeline: dict[int, Group]  # replica -> the ranks of its pipeline
    data: dict[int, Group]  # pipeline device -> its D replicas
    everyone: Group

    def of_rank(self, grid: Grid, rank: int) -> tuple[Group, Group]:
        """(the pipeline group, the data group) `rank` belongs to."""
        device, replica = grid.coords(rank)
        return self.pipeline[replica], self.data[device]


@dataclass(eq=False)
class Group:
    """A set of ranks that take part in a collective together; `handle` is the world's own object for it."""

    ranks: tuple[int, ...]
    handle: Any = None
    index: dict[int, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.index = {r: i for i, r in enumerate(self.ranks)}


class World(ABC):
    """Ranks, their devices, their transports and collectives, and the failure policy."""

    grid: Grid
    timeout: float
    local_ranks: list[int]  # the ranks this process runs
    failed: str | None = None  # set once a step failed: the world is then unusable
    status: RankStatus | None = None  # where this process's rank is, for its launcher (see `status`)
    placement: Sequence[int] | None = None  # stage -> pipeline device, set by the Pipeline (for messages)

    # -- facts -------------------------------------------------------------------------------------
    @property
    def size(self) -> int:
        return self.grid.size

    @abstractmethod
    def device(self, rank: int) -> torch.device:
        """The torch device rank `rank` computes on."""

    @abstractmethod
    def transport(self, rank: int, num_stages: int) -> Transport:
        """Point-to-point messages of `rank` to the other devices of its pipeline (peers named by device)."""

    def who(self, rank: int) -> str:
        """`rank` with the stages it holds, for messages: "rank 3 (stage 1, replica 1)"."""
        device, replica = self.grid.coords(rank)
        stages = [s for s, d in enumerate(self.placement or ()) if d == device]
        parts = [f"stage{'s' if len(stages) > 1 else ''} {', '.join(map(str, stages))}"] if stages else []
        parts += [f"replica {replica}"] if self.grid.data > 1 else []
        return f"rank {rank}" + (f" ({', '.join(parts)})" if parts else "")

    # -- process-level -----------------------------------------------------------------------------
    @abstractmethod
    def run(self, fn: Callable[[int], T], what: str) -> dict[int, T]:
        """`fn(rank)` for every local rank, under the failure policy; their results by rank. `what` names
        the work in error messages ("the step"). A failure on any rank ends every rank with an error."""

    @abstractmethod
    def gather(self, values: dict[int, Any]) -> dict[int, Any]:
        """Every rank's value (picklable), given this process's `{rank: value}` for its local ranks."""

    @abstractmethod
    def compute_once(self, fn: Callable[[], T]) -> T:
        """`fn()` computed by one process and handed to all (so that every rank decides alike)."""

    @abstractmethod
    def group(self, ranks: Sequence[int]) -> Group:
        """A group of `ranks` for rank-level collectives; every process creates the same groups in order."""

    def grid_groups(self) -> GridGroups:
        """The groups of the grid's axes, created once (by every process, in the same order)."""
        cached = getattr(self, "_grid_groups", None)
        if cached is None:
            g = self.grid
            cached = GridGroups({r: self.group(g.pipeline_ranks(r)) for r in range(g.data)},
                                {d: self.group(g.data_ranks(d)) for d in range(g.pipeline)},
                                self.group(range(g.size)))
            self._grid_groups = cached
        return cached

    def all_reduce_async(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> Pending:
        """Start `all_reduce`; the result is in place once the returned handle's `wait()` returns."""
        self.all_reduce(rank, tensors, group)
        return Pending()

    def close(self) -> None:  # noqa: B027 (a world without helper threads has nothing to stop)
        """Stop helper threads (the failure watchdog); idempotent."""

    def check(self) -> None:
        """Raise if an earlier failure ended this world."""
        if self.failed:
            raise PipelineError(f"this pipeline stopped after an earlier failure: {self.failed}")

    # -- rank-level collectives --------------------------------------------------------------------
    @abstractmethod
    def all_reduce(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> None:
        """Sum `tensors` over the group's ranks, in place; every member ends with the same values."""

    @abstractmethod
    def broadcast(self, rank: int, tensor: torch.Tensor, src: int, group: Group) -> None:
        """Copy rank `src`'s `tensor` into every member's, in place."""

    @abstractmethod
    def all_gather_object(self, rank: int, obj: Any, group: Group) -> list[Any]:
        """Every member's `obj`, in the group's rank order."""

    def barrier(self, rank: int, group: Group) -> None:
        """Return once every member of `group` has called it."""
        self.all_gather_object(rank, None, group)


class Pending:
    """A collective started asynchronously; `wait()` blocks until it is done (here: already done)."""

    def __init__(self, works: Sequence[Any] = (), timeout: float | None = None,
                 failed: Callable[[Exception], Exception] | None = None):
        self.works, self.timeout, self.failed = list(works), timeout, failed

    def wait(self) -> None:
        from datetime import timedelta

        try:
            for w in self.works:
                if self.timeout:
                    w.wait(timedelta(seconds=self.timeout))
                else:
                    w.wait()
        except Exception as err:
            named = err if self.failed is None else self.failed(err)
            if named is err:
                raise
            raise named from err
        self.works = []


# ---- threads ----------------------------------------------------------------------------------------

class _Rendezvous:
    """The meeting point of one group's threads: each deposits a value, all read, all leave."""

    def __init__(self, size: int):
        self.size = size
        self.slots: dict[int, Any] = {}
        self.ready: dict[int, Any] = {}  # CUDA events: each deposited value is complete (None on the CPU)
        self.read: dict[int, Any] = {}  # CUDA events: each rank has read the others' values
        self.barrier = threading.Barrier(size) if size > 1 else None


class LocalWorld(World):
    """Every rank is a thread of this process; messages go through in-process mailboxes.

    `devices` gives each rank's torch device (default: the CPU for all).
    """

    def __init__(self, grid: Grid, timeout: float = 30.0, devices: Sequence[torch.device | str] | None = None):
        self.grid, self.timeout = grid, timeout
        self.local_ranks = list(range(grid.size))
        if devices is not None and len(devices) != grid.size:
            raise ValueError(f"{len(devices)} devices given for {grid.size} ranks; give one per rank")
        self.devices = [torch.device(d) for d in devices] if devices is not None else [torch.device("cpu")] * grid.size
        self.hub = LocalHub()
        self._groups: dict[tuple[int, ...], Group] = {}
        self._lock = threading.Lock()
        self.streams = RankStreams()  # on a GPU each rank thread computes on a stream of its own
        self.cuda = any(d.type == "cuda" for d in self.devices)  # collectives then hand tensors over by events

    def device(self, rank: int) -> torch.device:
        return self.devices[rank]

    def transport(self, rank: int, num_stages: int) -> Transport:
        return LocalTransport(self.hub, self.timeout, rank, self.grid.pipeline_ranks(self.grid.coords(rank)[1]))

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
        done = threading.Event()
        callers = {r: RankStreams.caller(self.devices[r]) for r in self.local_ranks}  # this thread's streams
        finished: dict[int, Any] = {}

        def worker(rank: int) -> None:
            try:
                with self.streams.entered(rank, self.devices[rank], callers[rank]) as finished[rank]:
                    results[rank] = fn(rank)
            except BaseException as err:
                errors[rank] = err
                self.abort(f"rank {rank} failed during {what}: {err}")
            finally:
                if len(results) + len(errors) == len(self.local_ranks):
                    done.set()

        threads = [threading.Thread(target=worker, args=(r,), name=f"stagewise-rank-{r}", daemon=True)
                   for r in self.local_ranks]
        for t in threads:
            t.start()
        # Wait for every thread; once one has failed, the others get the timeout plus a grace period to
        # end by themselves. A thread stuck in its own computation cannot be stopped from outside: it is
        # left behind (a daemon thread) and the step fails anyway, so nothing waits for it forever.
        deadline = None
        while not done.wait(0.05):
            if errors and deadline is None:
                deadline = time.monotonic() + self.timeout + 2.0
            if deadline is not None and time.monotonic() > deadline:
                stuck = [f"rank {r}" for r, t in zip(self.local_ranks, threads) if t.is_alive()]
                self.failed = f"{self._root(errors)}; {', '.join(stuck)} did not stop (stuck in its own computation)"
                raise PipelineError(self.failed) from self._root_error(errors)
        if errors:
            self.failed = self._root(errors)
            raise self._root_error(errors)
        for r in self.local_ranks:  # what the ranks computed is read on this thread's streams next
            RankStreams.rejoin(callers[r], finished.get(r))
        return results

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


# ---- processes --------------------------------------------------------------------------------------

class DistWorld(World):
    """One rank per process; `torch.distributed` (gloo on CPUs, NCCL on GPUs) set up from torchrun's
    environment. Failures are published in the group's store so every rank can name the root cause,
    and a watchdog ends a rank stuck in its own computation once another has failed."""

    def __init__(self, timeout: float = 30.0, backend: str | None = None, data: int = 1,
                 device: torch.device | str | None = None):
        self.timeout = timeout
        self.status = for_rank(int(os.environ.get("RANK", "0")))
        if self.status is not None:
            self.status.set("joining the process group (constructing the Pipeline)")
        try:
            self.rank, size = launch.init_from_env(timeout, backend)
        except Exception as err:
            if self.status is not None:
                self.status.set(f"failed: {err}")
            raise
        if self.status is not None:
            self.status.set("constructing the Pipeline")
        if data < 1 or size % data:
            raise ValueError(f"{size} processes cannot form pipelines of data_parallel={data} replicas each: the "
                             f"world size must be P x D; start a multiple of {data} processes")
        self.grid = Grid(size // data, data)
        self.local_ranks = [self.rank]
        self.distributed = size > 1
        self.ordered = self.distributed and launch.dist.get_backend() == "nccl"  # NCCL matches messages by order
        if device is not None:
            self._device = torch.device(device)
        elif self.ordered:
            self._device = torch.device("cuda", torch.cuda.current_device())
        else:
            self._device = torch.device("cpu")
        self._groups: dict[tuple[int, ...], Group] = {}
        self._in_step = 0
        self.watchdog = launch.Watchdog(self.rank) if self.distributed else None

    def device(self, rank: int) -> torch.device:
        return self._device

    def transport(self, rank: int, num_stages: int) -> Transport:
        peers = self.grid.pipeline_ranks(self.grid.coords(rank)[1])
        return DistTransport(self._device, num_stages, self.timeout, ordered=self.ordered, peers=peers)

    def group(self, ranks: Sequence[int]) -> Group:
        key = tuple(ranks)
        if key not in self._groups:
            handle = None  # the default group: the whole world
            if self.distributed and len(key) > 1 and key != tuple(range(self.size)):
                # every process must create every group, in the same order, members or not
                handle = self._guard(lambda: launch.dist.new_group(list(key)), "creating a process group")
            self._groups[key] = Group(key, handle)
        return self._groups[key]

    def run(self, fn: Callable[[int], T], what: str) -> dict[int, T]:
        self.check()
        if self.watchdog is not None:
            self.watchdog.in_step = True
        if self.status is not None:
            self.status.set(what)
        try:
            out = {self.rank: self._guard(lambda: fn(self.rank), what)}
            if self.status is not None:
                self.status.set(f"outside stagewise (in the script), after {what}")
            return out
        finally:
            if self.watchdog is not None:
                self.watchdog.in_step = False

    def gather(self, values: dict[int, Any]) -> dict[int, Any]:
        if not self.distributed:
            return dict(values)
        parts: list[Any] = [None] * self.size
        self._guard(lambda: launch.dist.all_gather_object(parts, values), "gathering values from every rank")
        return {r: v for part in parts for r, v in part.items()}

    def compute_once(self, fn: Callable[[], T]) -> T:
        if not self.distributed:
            return fn()
        box = [fn() if self.rank == 0 else None]
        self._guard(lambda: launch.dist.broadcast_object_list(box, src=0), "sharing rank 0's result")
        return box[0]

    def close(self) -> None:
        if self.watchdog is not None:
            self.watchdog.stop()
            self.watchdog = None

    def all_reduce(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> None:
        if group.handle is None and len(group.ranks) == 1:
            return
        try:
            for t in tensors:
                launch.dist.all_reduce(t, group=group.handle)
        except Exception as err:
            named = self._silent(err, "an all_reduce", group.ranks)
            if named is err:
                raise
            raise named from err

    def all_reduce_async(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> Pending:
        if group.handle is None and len(group.ranks) == 1:
            return Pending()
        works = [launch.dist.all_reduce(t, group=group.handle, async_op=True) for t in tensors]
        return Pending(works, self.timeout, lambda err: self._silent(err, "an all_reduce", group.ranks))

    def broadcast(self, rank: int, tensor: torch.Tensor, src: int, group: Group) -> None:
        if group.handle is None and len(group.ranks) == 1:
            return
        try:
            launch.dist.broadcast(tensor, src=src, group=group.handle)
        except Exception as err:
            named = self._silent(err, f"a broadcast from rank {src}", group.ranks)
            if named is err:
                raise
            raise named from err

    def all_gather_object(self, rank: int, obj: Any, group: Group) -> list[Any]:
        if group.handle is None and len(group.ranks) == 1:
            return [obj]
        out: list[Any] = [None] * len(group.ranks)
        try:
            launch.dist.all_gather_object(out, obj, group=group.handle)
        except Exception as err:
            named = self._silent(err, "an all_gather", group.ranks)
            if named is err:
                raise
            raise named from err
        return out

    def _silent(self, err: Exception, op: str, ranks: Sequence[int]) -> Exception:
        """A collective `op` of `ranks` failed with `err`: when the error only says that a connection closed or a
        wait timed out (gloo: "Connection closed by peer ... GLHF!"), the members that stopped answering, found by
        a roll call in the store (`launch.roll_call`), named in a PeerError; else `err` itself (another rank's
        own failure, which `_guard` names, or nothing to add)."""
        if not self.distributed or isinstance(err, PipelineError) or not _is_connection_error(err):
            return err
        published, silent = launch.roll_call(self.rank, [r for r in ranks if r != self.rank])
        if published is not None or silent == []:
            return err
        text = str(err).strip()
        cause = f"{type(err).__name__}: {text.splitlines()[0][:200] if text else ''}"
        if silent is None:  # the store went with its host
            what = (f"{self.who(0)} stopped answering (the group's store, which it or the launcher serves, is "
                    "unreachable too)" if self.rank != 0 else "the launcher stopped answering (the group's store, "
                    "which it serves, is unreachable)")
        else:
            what = f"{', '.join(self.who(r) for r in silent)} stopped answering"
        named = PeerError(
            f"{self.who(self.rank)}: {what} during {op} (ranks {list(ranks)}). A rank that stops answering crashed, "
            "was killed, or returned from the script without making this call: every rank must call the same "
            "Pipeline methods (train_step, eval_step, train, save_checkpoint, ...) in the same order; see its own "
            f"output for why it stopped ({cause})", rank=self.rank)
        named.roll_called = True  # type: ignore[attr-defined]
        return named

    def _guard(self, fn: Callable[[], T], what: str) -> T:
        """Run `fn`; on failure publish or fetch the root cause, stop the group and raise a PipelineError."""
        try:
            return fn()
        except Exception as caught:
            # a process-level collective (gather, a new group) that failed naming nobody: who stopped answering
            err = caught if isinstance(caught, PipelineError) else self._silent(caught, what, range(self.size))
            own = isinstance(err, PipelineError) and not _is_connection_error(err)
            asked = getattr(err, "roll_called", False)  # the roll call already looked for a published failure
            peer = None if own or asked or not self.distributed else launch.peer_failure()
            if peer is not None:
                self.failed = f"rank {self.rank} stopped during {what} because {peer}"
                if self.status is not None:
                    self.status.set(f"stopped: {self.failed}")
                launch.abort_group()
                raise PeerError(self.failed) from err
            msg = str(err) if isinstance(err, PipelineError) else f"rank {self.rank} failed during {what}: {err}"
            self.failed = msg
            if self.status is not None:
                self.status.set(f"failed: {msg}")
            if self.distributed:
                launch.report_failure(msg, self.rank)
                launch.abort_group()
                if self.rank == 0:
                    time.sleep(2.5)  # the store lives in this process: let the peers read the cause before it exits
            if err is not caught:
                raise err from caught
            if isinstance(err, PipelineError):
                raise
            raise PipelineError(msg, rank=self.rank) from err


def _is_connection_error(err: BaseException) -> bool:
    text = f"{err} {err.__cause__}".lower()
    return any(k in text for k in ("connection", "closed", "reset by peer", "broken pipe", "aborted", "timed out"))


def make_world(local_devices: int | None = None, *, timeout: float = 30.0, backend: str | None = None,
               data_parallel: int = 1, device: torch.device | str | None = None) -> World:
    """Threads of this process when `local_devices` pipeline devices are asked for, else the processes
    torchrun started (a single process without it)."""
    if local_devices is not None:
        grid = Grid(local_devices, data_parallel)
        return LocalWorld(grid, timeout, [device] * grid.size if device is not None else None)
    return DistWorld(timeout, backend, data_parallel, device)


__all__ = ["DistWorld", "Grid", "GridGroups", "Group", "LocalWorld", "Pending", "World", "make_world"]
