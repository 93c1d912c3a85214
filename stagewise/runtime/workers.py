"""Long-lived worker threads, one per pipeline device, for the in-process GPipe.

`LocalWorld.run` starts fresh threads for every call. GPipe runs two phases per training step
(its forward, then its backward), and here a fresh thread's first matrix product costs about
3 ms more than on a thread that has run one (per-thread set-up in the BLAS library): on a
100 ms step of a small model with 4 partitions that is 20-30 ms of CPU. So the workers stay:
`run(fn)` hands `fn(device)` to every worker and waits for all.

Failure policy (LocalWorld's): the first error calls `abort(why)` (the caller wakes every worker
waiting on a message with it), the others get `timeout` + 2 s to stop, and `run` raises the
first error that is not a `PeerError` (the root cause). A worker that does not stop in time is
left behind (a daemon thread) and the pool is marked broken; its owner starts a new one.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from stagewise.runtime.errors import PeerError, PipelineError


def _serve(inbox: queue.SimpleQueue, results: queue.SimpleQueue, device: int) -> None:
    while True:
        job = inbox.get()
        if job is None:
            return
        try:
            job(device)
            results.put((device, None))
        except BaseException as err:
            results.put((device, err))
            del err
        job = None  # let go of the run (its activations) while waiting for the next job


class WorkerPool:
    """`size` daemon threads named `{prefix}-{device}`."""

    def __init__(self, size: int, timeout: float, prefix: str = "stagewise-gpipe"):
        self.size, self.timeout = size, timeout
        self.inboxes: list[queue.SimpleQueue] = [queue.SimpleQueue() for _ in range(size)]
        self.results: queue.SimpleQueue = queue.SimpleQueue()
        self.broken = False
        self.threads = [threading.Thread(target=_serve, args=(box, self.results, d), name=f"{prefix}-{d}", daemon=True)
                        for d, box in enumerate(self.inboxes)]
        for t in self.threads:
            t.start()

    def run(self, fn: Callable[[int], None], what: str, abort: Callable[[str], None]) -> None:
        """`fn(device)` on every worker; returns when all are done, raises the root error when one failed."""
        if self.broken:
            raise PipelineError("this worker pool was left behind by a stuck worker")
        for box in self.inboxes:
            box.put(fn)
        errors: dict[int, BaseException] = {}
        done, deadline = 0, None
        while done < self.size:
            try:
                device, err = self.results.get(timeout=0.05)
            except queue.Empty:
                if deadline is not None and time.monotonic() > deadline:
                    self.broken = True
                    stuck = [t.name for d, t in enumerate(self.threads) if t.is_alive() and d not in errors]
                    raise PipelineError(f"{_root(errors)}; {', '.join(stuck)} did not stop (stuck in its own "
                                        "computation)") from _root_error(errors)
                continue
            done += 1
            if err is not None:
                errors[device] = err
                if deadline is None:
                    abort(f"device {device} failed during {what}: {err}")
                    deadline = time.monotonic() + self.timeout + 2.0
        if errors:
            raise _root_error(errors)

    def close(self) -> None:
        """Let every worker end once it is idle."""
        for box in self.inboxes:
            box.put(None)


def _root_error(errors: dict[int, BaseException]) -> BaseException:
    root = [e for _, e in sorted(errors.items()) if not isinstance(e, PeerError)]
    return (root or [e for _, e in sorted(errors.items())])[0]


def _root(errors: dict[int, BaseException]) -> str:
    return str(_root_error(errors))


__all__ = ["WorkerPool"]
