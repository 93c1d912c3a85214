"""Where every rank is, kept where its launcher can read it after the rank died.

torchrun ends the other ranks as soon as one exits or is killed, so their own messages, and
the dead rank's, are often lost: only torchrun's `failed (exitcode: -9)` summary shows.
`stagewise run` and `stagewise train` therefore start torchrun through `launch`, which sets
`STAGEWISE_STATUS_DIR` to a fresh folder. Every rank keeps one small memory-mapped file there
(`rank-00001`) and overwrites it in place with what it is doing: joining the process group,
building the Pipeline, the current action of step N, its own error, or "outside stagewise"
between calls. A write is a copy into shared memory (about a microsecond, no system call) and
the page outlives the process, SIGKILL included. When torchrun reports a failure, `launch`
prints every rank's last status beside its exit code. Without the variable (plain torchrun,
threads) nothing is written.
"""

from __future__ import annotations

import mmap
import os
import signal
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ENV = "STAGEWISE_STATUS_DIR"
SIZE = 4096


class RankStatus:
    """One rank's status line, in a memory-mapped file; `prefix` (the stages it holds) starts every line."""

    def __init__(self, path: Path):
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self.map = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self.prefix = ""

    def set(self, text: str) -> None:
        data = (self.prefix + text).encode(errors="replace")[:SIZE - 1] + b"\0"
        self.map[:len(data)] = data


def for_rank(rank: int) -> RankStatus | None:
    """This rank's status file when a stagewise launcher asked for one, else None (never an error)."""
    folder = os.environ.get(ENV)
    if not folder:
        return None
    try:
        return RankStatus(Path(folder) / f"rank-{rank:05d}")
    except OSError:
        return None


def read(folder: str | os.PathLike[str]) -> dict[int, str]:
    """Every rank's last status line in `folder`."""
    out = {}
    for path in sorted(Path(folder).glob("rank-*")):
        try:
            out[int(path.name.split("-")[1])] = path.read_bytes().split(b"\0", 1)[0].decode(errors="replace")
        except (OSError, ValueError):
            continue
    return out


def _ending(exitcode: int | None) -> str:
    if exitcode is None:
        return "failed"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        if name == "SIGTERM":
            return "was ended by the launcher (SIGTERM) after another rank failed"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def explain(failures: dict[int, Any], statuses: dict[int, str], first: int | None = None,
            ranks: Sequence[int] = ()) -> str:
    """One line per rank (`ranks`, and any that failed or left a status): how it ended (`failures`: rank ->
    torchrun's ProcessFailure) and where it was."""
    lines = ["stagewise: the job failed; each rank's last status:"]
    for rank in sorted(set(ranks) | set(failures) | set(statuses)):
        failure = failures.get(rank)
        how = _ending(getattr(failure, "exitcode", None)) if failure is not None else "exited with code 0"
        where = statuses.get(rank)
        if where is None:
            where = "none: it never reached the Pipeline (it failed or exited before constructing it)"
        mark = "  <- first failure" if rank == first else ""
        lines.append(f"  rank {rank} {how}; last status: {where}{mark}")
    return "\n".join(lines)


def launch(argv: list[str], ranks: Sequence[int] = ()) -> int:
    """`torchrun.main(argv)` with a status folder; on failure print where every rank was (`ranks`: those this
    node starts). Returns the exit code."""
    from torch.distributed import run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    with tempfile.TemporaryDirectory(prefix="stagewise-status-") as folder:
        previous = os.environ.get(ENV)
        os.environ[ENV] = folder
        try:
            torchrun.main(argv)
        except ChildFailedError as err:
            first = err.get_first_failure()[0] if err.failures else None
            print(f"{err}\n{explain(err.failures, read(folder), first, ranks)}", file=sys.stderr, flush=True)
            return 1
        finally:
            if previous is None:
                os.environ.pop(ENV, None)
            else:
                os.environ[ENV] = previous
    return 0
