"""What the executors read their micro-batches from: one split batch, or consecutive batches pulled lazily."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import torch

from stagewise.runtime.microbatch import batch_size, split_sizes
from stagewise.tree import flatten, map_tensors, unflatten


class Microbatches:
    """Micro-batch inputs, labels and weights (each micro-batch's share of its batch), indexed by micro-batch."""

    def __init__(self, inputs: Any, labels: Any, weights: Any):
        self.inputs, self.labels, self.weights = inputs, labels, weights
        self.per_item = False  # weights per counted item of a (sum, count) loss, not per micro-batch

    @classmethod
    def of_batch(cls, batch: tuple[Any, Any], m: int, device: torch.device, what: str, replica: int = 0,
                 replicas: int = 1, scale: float = 1.0, item_weight: float | None = None) -> Microbatches:
        """Replica `replica`'s share of `batch = (inputs, labels)` (of `replicas` shares differing by at most one
        sample) split into `m` micro-batches on `device`. Each micro-batch's weight is its share of the whole
        batch (times `scale`), so the replicas' weighted losses add up to the batch mean. `what` names the
        schedule in errors. With `item_weight` every micro-batch's weight is that (per counted item of a (sum, count)
        loss; see `stagewise.runtime.loss`)."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("a batch is (inputs, labels); got " + type(batch).__name__)
        inputs, labels = batch
        total = batch_size(inputs)
        if batch_size(labels) != total:
            raise ValueError(f"the batch's inputs hold {total} samples but its labels {batch_size(labels)}; "
                             "give one label entry per sample")
        if total < replicas * m:
            where = f"{replicas} data-parallel replicas x {m} micro-batches" if replicas > 1 else f"{m} micro-batches"
            raise ValueError(f"a batch of {total} samples cannot be split into {where} (schedule {what}); use a "
                             f"batch of at least {replicas * m} samples or fewer micro-batches")
        shares = split_sizes(total, replicas)
        lo = sum(shares[:replica])
        sizes = split_sizes(shares[replica], m)
        cuts = [lo + sum(sizes[:k]) for k in range(m + 1)]
        in_mbs, lab_mbs = _pieces(inputs, cuts), _pieces(labels, cuts)
        if device.type != "cpu":
            in_mbs = [map_tensors(x, lambda t: t.to(device, non_blocking=True)) for x in in_mbs]
            lab_mbs = [map_tensors(x, lambda t: t.to(device, non_blocking=True)) for x in lab_mbs]
        if item_weight is not None:  # a (sum, count) loss that counts ahead: every item weighs 1 / the step's items
            feed = cls(in_mbs, lab_mbs, [item_weight] * m)
            feed.per_item = True
            return feed
        return cls(in_mbs, lab_mbs, [s / total * scale if scale != 1.0 else s / total for s in sizes])


def _pieces(tree: Any, cuts: list[int]) -> list[Any]:
    """The pieces [cuts[k], cuts[k+1]) of every tensor's dim 0 (0-dim tensors are repeated)."""
    tensors, spec = flatten(tree)
    return [unflatten(spec, [t[a:b] if t.dim() > 0 else t for t in tensors]) for a, b in zip(cuts, cuts[1:])]


class MicrobatchFeed:
    """Micro-batches of consecutive batches (an unflushed run), pulled from the iterator only when a stage
    first needs them; micro-batch n is micro-batch n % m of batch n // m (of each replica's share)."""

    def __init__(self, it: Iterator[tuple[Any, Any]], microbatches: int, device: torch.device, keep: int,
                 replicas: int = 1):
        self.it, self.m, self.device, self.keep, self.replicas = it, microbatches, device, keep, replicas
        self.batches: dict[tuple[int, int], Microbatches] = {}  # (batch, replica) -> its micro-batches
        self.pulled = 0
        self.lock = threading.Lock()

    def microbatches(self, replica: int = 0) -> Microbatches:
        return Microbatches(*(_View(self, part, replica) for part in ("inputs", "labels", "weights")))

    def get(self, n: int, part: str, replica: int) -> Any:
        t = n // self.m
        with self.lock:  # ranks that are threads of one process share the feed
            while self.pulled <= t:
                try:
                    batch = next(self.it)
                except StopIteration:
                    raise ValueError(f"the data iterator ran out after {self.pulled} batches") from None
                for r in range(self.replicas):
                    self.batches[(self.pulled, r)] = Microbatches.of_batch(batch, self.m, self.device,
                                                                           "unflushed run", r, self.replicas)
                    self.batches.pop((self.pulled - self.keep, r), None)  # no micro-batch that old is in flight
                self.pulled += 1
            return getattr(self.batches[(t, replica)], part)[n % self.m]


class _View:
    def __init__(self, feed: MicrobatchFeed, part: str, replica: int):
        self.feed, self.part, self.replica = feed, part, replica

    def __getitem__(self, n: int) -> Any:
        return self.feed.get(n, self.part, self.replica)
