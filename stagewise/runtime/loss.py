"""What a `loss_fn` may return, and how a step turns it into the objective.

Two forms:

- a scalar tensor, the mean over the micro-batch's samples. Each micro-batch's loss is weighted by its
  share of the batch's samples, so the step's loss and gradients are those of the batch's sample mean.
  Exact whenever the unsplit loss is a mean over samples (every sample weighs the same).
- a pair `(sum, count)`: a scalar tensor summed over the micro-batch's items (label tokens, say) and how
  many items it covers (a number or a 0-dim tensor; it carries no gradient). The step's loss is
  `sum(sums) / sum(counts)` over every micro-batch, every data-parallel replica and every
  `train_step(step=False)` call since the last step, and the gradients are exactly those of that global
  mean. This is the form for padded language-model batches, where a token mean is not a sample mean
  (`stagewise.models.causal_lm_loss`).

  When the loss also has a method `count(labels) -> number` (the items of a whole batch's labels, the sum
  of the counts it will return), every rank knows the step's count before anything runs: each micro-batch's
  backward starts from 1 / count, exactly as the unsplit mean's backward does (so float32 code inside the
  model rounds the same values), and earlier accumulating calls' gradients are rescaled as items come in.
  Without it the backward runs on the sums and the `MeanOverCount` step part divides the gradients by the
  count once the last forward has given it: the same mean, with the division in another place (float64:
  the same to about 1e-15; a model computing in float32 inside rounds the two differently, about 1e-6).
"""

from __future__ import annotations

from typing import Any

import torch


class LossError(ValueError):
    """A loss_fn returned something that is neither a scalar tensor nor a (sum, count) pair."""


def split_loss(value: Any) -> tuple[torch.Tensor, float | None]:
    """`(scalar, None)` for a mean, `(sum, count)` for a pair; anything else is a `LossError`."""
    if isinstance(value, torch.Tensor):
        if value.dim() != 0:
            raise LossError(f"loss_fn must return a scalar tensor or a (sum, count) pair, got a tensor of shape "
                            f"{list(value.shape)}")
        return value, None
    if isinstance(value, (tuple, list)) and len(value) == 2:
        total, count = value
        if not isinstance(total, torch.Tensor) or total.dim() != 0:
            got = f"a tensor of shape {list(total.shape)}" if isinstance(total, torch.Tensor) else type(total).__name__
            raise LossError(f"loss_fn returned a pair whose first item (the sum) is {got}, not a scalar tensor")
        if isinstance(count, torch.Tensor):
            if count.numel() != 1:
                raise LossError(f"loss_fn returned a pair whose count is a tensor of shape {list(count.shape)}, "
                                "not a number")
            count = count.item()
        if isinstance(count, bool) or not isinstance(count, (int, float)) or count < 0:
            raise LossError(f"loss_fn returned a pair whose count is {count!r}; it must be a number >= 0 (how many "
                            "items the sum covers)")
        return total, float(count)
    raise LossError(f"loss_fn must return a scalar tensor (a mean) or a (sum, count) pair, got "
                    f"{type(value).__name__}")


def mean_of(value: Any) -> torch.Tensor:
    """The loss a single process would report for one `loss_fn` result: the scalar, or sum / count."""
    total, count = split_loss(value)
    if count is None:
        return total
    return total / count if count else total * 0.0
