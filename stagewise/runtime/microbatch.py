"""Split a batch into micro-batches along dim 0, and weigh their losses so the step equals the full batch."""

from __future__ import annotations

from typing import Any

from stagewise.tree import flatten, unflatten


def batch_size(tree: Any) -> int:
    """The common size of dim 0 of every tensor in `tree` (tensors of 0 dims are not split)."""
    sizes = {t.shape[0] for t in flatten(tree)[0] if t.dim() > 0}
    if not sizes:
        raise ValueError("the batch holds no tensor with a batch dimension to split into micro-batches")
    if len(sizes) > 1:
        raise ValueError(f"the batch's tensors disagree on dim 0 (sizes {sorted(sizes)}); "
                         "every tensor of a batch must share its batch dimension")
    return sizes.pop()


def split_sizes(total: int, chunks: int) -> list[int]:
    """Sizes of `chunks` micro-batches of a batch of `total` samples, differing by at most one."""
    if chunks < 1:
        raise ValueError(f"micro-batches must be >= 1, got {chunks}")
    if total < chunks:
        raise ValueError(f"a batch of {total} samples cannot be split into {chunks} micro-batches; "
                         f"use a batch of at least {chunks} samples or fewer micro-batches")
    base, extra = divmod(total, chunks)
    return [base + (1 if i < extra else 0) for i in range(chunks)]


def scatter(tree: Any, chunks: int) -> tuple[list[Any], list[float]]:
    """`chunks` micro-batches of `tree` and each one's share of the batch (weights summing to 1)."""
    total = batch_size(tree)
    sizes = split_sizes(total, chunks)
    tensors, spec = flatten(tree)
    pieces = [t.split(sizes) if t.dim() > 0 else [t] * chunks for t in tensors]
    micro = [unflatten(spec, [p[i] for p in pieces]) for i in range(chunks)]
    return micro, [s / total for s in sizes]
