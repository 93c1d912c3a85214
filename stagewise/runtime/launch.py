"""Process groups: set-up from the environment, failure reporting, and a spawner for tests and notebooks."""

from __future__ import annotations

import atexit
import os
import pickle
import re
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from stagewise.runtime.errors import PipelineError

ERROR_KEY = "stagewise/error"
ANSWER_KEY = "stagewise/answer"  # + /RANK: set by every rank whose collective failed (see `roll_call`)


def init_from_env(timeout: float, backend: str | None = None) -> tuple[int, int]:
    """(rank, world size); initialises the default process group from torchrun's environment if needed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if backend is None:  # NCCL wants one GPU per process on this node; otherwise stay on the CPU with gloo
        local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= local else "gloo"
    # NCCL: this process's GPU is set before the group exists, and named to it (`device_id`), so the communicator
    # is created at once on that GPU (eager init, as torch recommends) rather than at the first collective
    device_id = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if backend == "nccl" else None
    if device_id is not None:
        torch.cuda.set_device(device_id)
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    try:
        if attempt is None:
            dist.init_process_group(backend, timeout=timedelta(seconds=timeout), device_id=device_id)
        else:
            # torchrun keeps one store across restarts (--max-restarts): without a prefix per attempt, a restarted
            # rank can read the addresses (and failure reports) its killed predecessors published there
            rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
            from torch.distributed.rendezvous import rendezvous

            store, _, _ = next(rendezvous("env://", rank, size, timeout=timedelta(seconds=timeout)))
            dist.init_process_group(backend, store=dist.PrefixStore(f"stagewise/attempt-{attempt}", store),
                                    rank=rank, world_size=size, timeout=timedelta(seconds=timeout),
                                    device_id=device_id)
    except Exception as err:
        why = _not_joined(err, timeout)
        if why is None:
            raise
        raise PipelineError(why) from err
    atexit.register(_destroy_group)  # a group left to the interpreter's exit can abort the process
    return dist.get_rank(), dist.get_world_size()


def _not_joined(err: BaseException, timeout: float) -> str | None:
    """What a failed rendezvous means, naming the ranks that never joined when the error tells; None when
    the error is not about peers that never came."""
    rank, size = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    text = str(err)
    where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
    joined = re.search(r"(\d+)/(\d+) clients joined", text)
    keys = re.search(r"wait timeout after \d+ms, keys: (.*)", text)
    if joined:  # rank 0 serves the store and counts the processes that connected
        n = int(joined.group(1))
        who = "rank 1" if size == 2 else f"ranks 1..{size - 1}" if n == 1 else f"{size - n} of ranks 1..{size - 1}"
        what = f"only {n} of {size} processes joined; {who} did not join"
    elif keys:  # every rank publishes its address under a key ending in its rank
        missing = sorted({int(k) for k in re.findall(r"/(\d+)(?=\s|,|$)", keys.group(1))})
        what = f"rank(s) {', '.join(map(str, missing)) or '?'} did not join"
    elif any(k in text.lower() for k in ("connect", "timed out", "refused")) and rank != 0:
        what = f"rank {rank} could not reach the group's store at {where} (rank 0 or the launcher serves it)"
    else:
        return None
    return (f"rank {rank}: the process group of {size} processes did not form within {timeout:g} s: {what}. A rank "
            "that does not join has usually crashed or exited before building the Pipeline (see its own output), "
            "or was never started (check the launcher's process count); a slow start needs a larger `timeout=`. "
            f"({type(err).__name__}: {text.splitlines()[0][:200] if text else ''})")


def _destroy_group() -> None:
    if dist.is_initialized():
        try:
            dist.destroy_process_group()
        except Exception:
            pass


def report_failure(message: str, rank: int) -> None:
    """Publish this rank's failure (first one wins) so the other ranks can say what really happened."""
    try:
        store = dist.distributed_c10d._get_default_store()
        if store.add(ERROR_KEY + "/count", 1) == 1:
            store.set(ERROR_KEY, f"rank {rank}: {message}")
    except Exception:  # the store itself may be gone; the local error is still raised
        pass


def peer_failure(wait_s: float = 2.0) -> str | None:
    """The first failure another rank published, waiting up to `wait_s` for it to appear."""
    try:
        store = dist.distributed_c10d._get_default_store()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            if store.check([ERROR_KEY]):
                return store.get(ERROR_KEY).decode()
            time.sleep(0.05)
    except Exception:
        return None
    return None


def roll_call(rank: int, others: Sequence[int], wait_s: float = 3.0) -> tuple[str | None, list[int] | None]:
    """After a collective failed without a word from its peers (gloo's "Connection closed by peer", a timeout):
    who is still there. This rank answers in the group's store, then waits up to `wait_s` for the answers of
    `others` (the collective's other members, whose own collectives failed as well) or a failure another rank
    published. Returns (that published failure or None, the ranks of `others` that did not answer; None when
    the store itself cannot be reached). Costs nothing unless a collective failed."""
    try:
        store = dist.distributed_c10d._get_default_store()
        store.set(f"{ANSWER_KEY}/{rank}", "here")
        deadline = time.monotonic() + wait_s
        while True:
            if store.check([ERROR_KEY]):
                return store.get(ERROR_KEY).decode(), []
            silent = [r for r in others if not store.check([f"{ANSWER_KEY}/{r}"])]
            if not silent or time.monotonic() >= deadline:
                return None, silent
            time.sleep(0.05)
    except Exception:  # the store is gone: its host (rank 0, or the launcher) ended
        return None, None


def abort_group() -> None:
    """Tear the process group down so that peers blocked on this rank fail now instead of at their timeout."""
    try:
        abort = getattr(dist.distributed_c10d, "_abort_process_group", None)
        if abort is not None:
            abort()
        else:
            dist.destroy_process_group()
    except Exception:
        pass


class Watchdog:
    """Ends this process when another rank has failed and this one stays stuck in a step.

    Waits on peers fail by themselves (a closed connection, a timeout); this covers a rank
    stuck in its own computation, which would otherwise never notice. It polls the store
    for a published failure while a step runs and, `grace` seconds after one appears,
    prints it and exits the process with status 1.
    """

    def __init__(self, rank: int, grace: float = 5.0, every: float = 0.5):
        import threading

        self.rank, self.grace, self.every = rank, grace, every
        self.in_step = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="stagewise-watchdog", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def _loop(self) -> None:
        import sys

        seen_at = None
        while not self._stop.wait(self.every):
            if not self.in_step:
                seen_at = None
                continue
            why = None
            try:
                store = dist.distributed_c10d._get_default_store()
                if store.check([ERROR_KEY]):
                    why = store.get(ERROR_KEY).decode()
            except Exception:  # the store is served by rank 0: gone means the group is gone
                why = "the group's store stopped answering (rank 0 ended)"
            if why is None or why.startswith(f"rank {self.rank}:"):
                continue
            seen_at = seen_at or time.monotonic()
            if time.monotonic() - seen_at >= self.grace and self.in_step:
                print(f"stagewise: rank {self.rank} is stuck in a step after a failure elsewhere; ending it. "
                      f"Cause: {why}", file=sys.stderr, flush=True)
                os._exit(1)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=2 * self.every)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(fn: Callable, rank: int, world: int, port: int, args: tuple, results: Any, threads: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(threads)
    try:
        # plain pickle: tensors travel by value, not as shared memory that dies with this process
        results.put((rank, "ok", pickle.dumps(fn(rank, world, *args))))
    except BaseException as err:  # report everything, including SystemExit from a test
        results.put((rank, "error", f"{type(err).__name__}: {err}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:
                pass


def spawn(fn: Callable[..., Any], nprocs: int, args: tuple = (), timeout: float = 300.0,
          threads: int = 1) -> list[Any]:
    """Run `fn(rank, world, *args)` in `nprocs` fresh processes on this machine; return their results by rank.

    Every process gets torchrun's environment variables and `threads` intra-op threads.
    Results must be picklable. If any process fails, the others are stopped and a
    RuntimeError carries every rank's error; nothing waits longer than `timeout` seconds.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_worker, args=(fn, r, nprocs, port, args, results, threads), daemon=True)
             for r in range(nprocs)]
    for p in procs:
        p.start()
    out: dict[int, Any] = {}
    errors: dict[int, str] = {}
    deadline = time.monotonic() + timeout
    grace = 15.0  # once a rank failed, the others get this long to report before they are stopped
    try:
        while len(out) + len(errors) < nprocs:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                missing = sorted(set(range(nprocs)) - set(out) - set(errors))
                errors.update({r: "no result in time (stopped)" for r in missing})
                break
            try:
                rank, status, value = results.get(timeout=min(remaining, 0.5))
            except Exception:
                dead = [r for r, p in enumerate(procs) if not p.is_alive() and r not in out and r not in errors]
                if dead:
                    time.sleep(0.5)  # its message may still be in flight
                    while not results.empty():
                        rank, status, value = results.get()
                        (out if status == "ok" else errors)[rank] = value
                    for r in dead:
                        if r not in out and r not in errors:
                            errors[r] = f"process exited with code {procs[r].exitcode} before reporting"
                continue
            (out if status == "ok" else errors)[rank] = value
            if errors:
                deadline = min(deadline, time.monotonic() + grace)
    finally:
        for p in procs:
            p.join(timeout=5 if not errors else 1)
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=5)
    out = {r: pickle.loads(v) for r, v in out.items()}
    if errors:
        text = "\n".join(f"--- rank {r} ---\n{errors[r]}" for r in sorted(errors))
        err = RuntimeError(f"{len(errors)} of {nprocs} processes failed:\n{text}")
        err.rank_errors = errors  # type: ignore[attr-defined]
        err.rank_results = out  # type: ignore[attr-defined]
        raise err
    return [out[r] for r in range(nprocs)]
