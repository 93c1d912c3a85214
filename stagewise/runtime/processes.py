"""One rank per process: `DistWorld`, over `torch.distributed` set up from torchrun's environment; and
`make_world`, which picks the World a `Pipeline` runs in."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import torch

from stagewise.runtime import launch
from stagewise.runtime.errors import PeerError, PipelineError
from stagewise.runtime.grid import Grid, Group
from stagewise.runtime.status import for_rank
from stagewise.runtime.threads import LocalWorld
from stagewise.runtime.transport import DistTransport, Transport
from stagewise.runtime.world import PendingCollective, World

T = TypeVar("T")


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

    def all_reduce_async(self, rank: int, tensors: Sequence[torch.Tensor], group: Group) -> PendingCollective:
        if group.handle is None and len(group.ranks) == 1:
            return PendingCollective()
        works = [launch.dist.all_reduce(t, group=group.handle, async_op=True) for t in tensors]
        return PendingCollective(works, self.timeout, lambda err: self._silent(err, "an all_reduce", group.ranks))

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


__all__ = ["DistWorld", "make_world"]
