"""What the executors read their micro-batches from: one split batch, or consecutive batches pulled lazily."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from stagewise.runtime.microbatch import scatter
from stagewise.tree import map_tensors


class Microbatches:
    """Micro-batch inputs, labels and weights (each micro-batch's share of its batch), indexed by micro-batch."""

    def __init__(self, inputs: Any, labels: Any, weights: Any):
        self.inputs, self.labels, self.weights = inputs, labels, weights

    @classmethod
    def of_batch(cls, batch: tuple[Any, Any], m: int, device: torch.device, what: str) -> Microbatches:
        """`batch = (inputs, labels)` split into `m` micro-batches on `device`; `what` names the schedule in errors."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("a batch is (inputs, labels); got " + type(batch).__name__)
        inputs, labels = batch
        try:
            in_mbs, weights = scatter(inputs, m)
            lab_mbs, _ = scatter(labels, m)
        except ValueError as err:
            raise ValueError(f"{err} (schedule {what}, {m} micro-batches)") from None
        if device.type != "cpu":
            in_mbs = [map_tensors(x, lambda t: t.to(device, non_blocking=True)) for x in in_mbs]
            lab_mbs = [map_tensors(x, lambda t: t.to(device, non_blocking=True)) for x in lab_mbs]
        return cls(in_mbs, lab_mbs, weights)


class MicrobatchFeed:
    """Micro-batches of consecutive batches (an unflushed run), pulled from the iterator only when a stage
    first needs them; micro-batch n is micro-batch n % m of batch n // m."""

    def __init__(self, it: Iterator[tuple[Any, Any]], microbatches: int, device: torch.device, keep: int):
        self.it, self.m, self.device, self.keep = it, microbatches, device, keep
        self.batches: dict[int, Microbatches] = {}
        self.pulled = 0
        self.lock = threading.Lock()

    def microbatches(self) -> Microbatches:
        return Microbatches(_View(self, "inputs"), _View(self, "labels"), _View(self, "weights"))

    def get(self, n: int, part: str) -> Any:
        t = n // self.m
        with self.lock:  # ranks that are threads of one process share the feed
            while self.pulled <= t:
                try:
                    batch = next(self.it)
                except StopIteration:
                    raise ValueError(f"the data iterator ran out after {self.pulled} batches") from None
                self.batches[self.pulled] = Microbatches.of_batch(batch, self.m, self.device, "unflushed run")
                self.pulled += 1
                self.batches.pop(self.pulled - 1 - self.keep, None)  # no micro-batch that old is in flight
            return getattr(self.batches[t], part)[n % self.m]


class _View:
    def __init__(self, feed: MicrobatchFeed, part: str):
        self.feed, self.part = feed, part

    def __getitem__(self, n: int) -> Any:
        return self.feed.get(n, self.part)
