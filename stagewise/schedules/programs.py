"""Device programs stored as columns: the form validate, lower and simulate work on at scale.

A schedule with P=64 devices and 1024 micro-batches has about a million actions; as
Python tuples they cost seconds to walk. `Programs` keeps one numpy array per field
(device-major, each device's actions in program order) and builds a device's `Action`
tuples only when someone asks for them (the runtime asks for its own device only).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from stagewise.schedules.actions import OPS, STEP, Action

OP_CODE = {op: k for k, op in enumerate(OPS)}
UNKNOWN = -1


class Programs(Sequence):
    """The action list of every device, column by column.

    `op` holds codes into `OPS` (-1 for an op this library does not know); `offsets[d]`
    is where device d's actions start. Optional columns: `start`, a unit-cost start time
    for every compute action (a generator's own execution, checked before use; NaN for
    communication), and `order`, one global order key per action of a lowered schedule
    (the certificate that its communication cannot deadlock, checked before use).
    """

    __slots__ = ("op", "stage", "microbatch", "version", "peer", "offsets", "start", "order", "_lists", "_cache")

    def __init__(self, op: np.ndarray, stage: np.ndarray, microbatch: np.ndarray, version: np.ndarray,
                 peer: np.ndarray, offsets: np.ndarray, start: np.ndarray | None = None,
                 order: np.ndarray | None = None, lists: tuple[tuple[Action, ...], ...] | None = None) -> None:
        self.op = np.asarray(op, dtype=np.int8)
        self.stage = np.asarray(stage, dtype=np.int64)
        self.microbatch = np.asarray(microbatch, dtype=np.int64)
        self.version = np.asarray(version, dtype=np.int64)
        self.peer = np.asarray(peer, dtype=np.int64)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.start = start
        self.order = order
        self._lists = lists
        self._cache: dict = {}

    @classmethod
    def from_lists(cls, lists: Sequence[Sequence[Action]]) -> Programs:
        """Columns from per-device action lists (kept as given, so nothing is lost)."""
        lists = tuple(tuple(p) for p in lists)
        flat = [a for p in lists for a in p]
        sizes = [len(p) for p in lists]
        offsets = np.zeros(len(lists) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(sizes)
        if not flat:
            e = np.zeros(0, dtype=np.int64)
            return cls(e, e, e, e, e, offsets, lists=lists)
        op = np.fromiter((OP_CODE.get(a[0], UNKNOWN) for a in flat), dtype=np.int8, count=len(flat))
        cols = np.array([(a[1], a[2], a[3], a[4]) for a in flat], dtype=np.int64).reshape(-1, 4)
        return cls(op, cols[:, 0], cols[:, 1], cols[:, 2], cols[:, 3], offsets, lists=lists)

    @classmethod
    def from_rows(cls, num_devices: int, device: np.ndarray, op: np.ndarray, stage: np.ndarray,
                  microbatch: np.ndarray, version: np.ndarray | None = None, peer: np.ndarray | None = None,
                  start: np.ndarray | None = None, order: np.ndarray | None = None,
                  sort: np.ndarray | None = None) -> Programs:
        """Columns from flat rows; rows are ordered by device, then by `sort` (else kept in given order)."""
        device = np.asarray(device, dtype=np.int64)
        n = len(device)
        if sort is None:
            idx = np.argsort(device, kind="stable")
        else:
            sort = np.asarray(sort, dtype=np.int64)
            span = int(sort.max(initial=0)) - int(sort.min(initial=0)) + 1
            if n and span * (num_devices + 1) < 2**62:  # one integer key sorts faster than lexsort
                idx = np.argsort(device * span + (sort - sort.min()), kind="stable")
            else:
                idx = np.lexsort((sort, device))
        zeros = np.zeros(n, dtype=np.int64)
        offsets = np.zeros(num_devices + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(device, minlength=num_devices))
        return cls(np.asarray(op)[idx], np.asarray(stage)[idx], np.asarray(microbatch)[idx],
                   (zeros if version is None else np.asarray(version))[idx],
                   (zeros - 1 if peer is None else np.asarray(peer))[idx], offsets,
                   None if start is None else np.asarray(start, dtype=np.float64)[idx],
                   None if order is None else np.asarray(order, dtype=np.int64)[idx])

    @classmethod
    def flushed(cls, num_devices: int, device: np.ndarray, op: np.ndarray, stage: np.ndarray,
                microbatch: np.ndarray, start: np.ndarray | None = None,
                device_free: np.ndarray | None = None) -> Programs:
        """A synchronous schedule's rows (versions 0), each device ending with the optimizer step
        that creates version 1. `start` (unit-cost start times) needs `device_free`, when each
        device finished: that is where its step starts."""
        d = np.arange(num_devices, dtype=np.int64)
        n = len(device)
        version = np.r_[np.zeros(n, dtype=np.int64), np.ones(num_devices, dtype=np.int64)]
        return cls.from_rows(num_devices, np.r_[device, d], np.r_[op, np.full(num_devices, OP_CODE[STEP])],
                             np.r_[stage, d], np.r_[microbatch, np.full(num_devices, -1)], version,
                             start=None if start is None else np.r_[start, device_free])

    # -- the Sequence of per-device tuples ---------------------------------------------------------
    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, device):  # type: ignore[override]
        if isinstance(device, slice):
            return tuple(self[d] for d in range(len(self))[device])
        if self._lists is not None:
            return self._lists[device]
        d = range(len(self))[device]
        got = self._cache.get(d)
        if got is None:
            a, b = self.offsets[d], self.offsets[d + 1]
            ops = [OPS[k] for k in self.op[a:b].tolist()]
            got = tuple(map(Action, ops, self.stage[a:b].tolist(), self.microbatch[a:b].tolist(),
                            self.version[a:b].tolist(), self.peer[a:b].tolist()))
            self._cache[d] = got
        return got

    def __iter__(self) -> Iterator[tuple[Action, ...]]:
        return (self[d] for d in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Programs):
            return all(np.array_equal(getattr(self, f), getattr(other, f))
                       for f in ("offsets", "op", "stage", "microbatch", "version", "peer")) and (
                self._lists is None or other._lists is None or self._lists == other._lists)
        if isinstance(other, tuple):
            return tuple(self) == other
        return NotImplemented

    def __hash__(self) -> int:
        return hash((len(self), len(self.op), self.op[:64].tobytes(), self.microbatch[-64:].tobytes()))

    def __repr__(self) -> str:
        return f"Programs({len(self)} devices, {len(self.op)} actions)"

    # -- columns ------------------------------------------------------------------------------------
    @property
    def num_actions(self) -> int:
        return len(self.op)

    def device(self) -> np.ndarray:
        """The device of every row."""
        return np.repeat(np.arange(len(self), dtype=np.int64), np.diff(self.offsets))

    def select(self, mask: np.ndarray) -> Programs:
        """The rows where `mask` holds, each device's order kept (no lists, no order keys)."""
        dev = self.device()[mask]
        offsets = np.zeros(len(self) + 1, dtype=np.int64)
        offsets[1:] = np.cumsum(np.bincount(dev, minlength=len(self)))
        return Programs(self.op[mask], self.stage[mask], self.microbatch[mask], self.version[mask],
                        self.peer[mask], offsets, None if self.start is None else self.start[mask])

    def cached(self, key: str, make):
        """A value derived from these (immutable) columns, computed once."""
        if key not in self._cache:
            self._cache[key] = make()
        return self._cache[key]
