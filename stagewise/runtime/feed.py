"""Feeding an unflushed run: micro-batches of consecutive batches, pulled from the data iterator lazily."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from stagewise.runtime.microbatch import scatter
from stagewise.runtime.tree import map_tensors


class MicrobatchFeed:
    """Micro-batches of consecutive batches, pulled from the iterator only when a stage first needs them."""

    def __init__(self, it: Iterator[tuple[Any, Any]], microbatches: int, device: torch.device, keep: int):
        self.it, self.m, self.device, self.keep = it, microbatches, device, keep
        self.batches: dict[int, tuple[list, list, list[float]]] = {}
        self.pulled = 0
        self.lock = threading.Lock()
        self.inputs, self.labels, self.weights = _View(self, 0), _View(self, 1), _View(self, 2)

    def get(self, n: int, part: int) -> Any:
        t = n // self.m
        with self.lock:  # device threads of one process share the feed
            while self.pulled <= t:
                try:
                    inputs, labels = next(self.it)
                except StopIteration:
                    raise ValueError(f"the data iterator ran out after {self.pulled} batches") from None
                in_mbs, weights = scatter(inputs, self.m)
                lab_mbs, _ = scatter(labels, self.m)
                if self.device.type != "cpu":
                    in_mbs = [map_tensors(x, lambda v: v.to(self.device)) for x in in_mbs]
                    lab_mbs = [map_tensors(x, lambda v: v.to(self.device)) for x in lab_mbs]
                self.batches[self.pulled] = (in_mbs, lab_mbs, weights)
                self.pulled += 1
                self.batches.pop(self.pulled - 1 - self.keep, None)  # no micro-batch that old is in flight
            return self.batches[t][part][n % self.m]


class _View:
    def __init__(self, feed: MicrobatchFeed, part: int):
        self.feed, self.part = feed, part

    def __getitem__(self, n: int) -> Any:
        return self.feed.get(n, self.part)
