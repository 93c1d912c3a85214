"""Losses for language models in the (sum, count) form, whose pipelined gradients equal the unsplit model's
token mean on padded batches (see `stagewise.runtime.loss`)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100  # the label cross-entropy skips (padding), as in transformers and F.cross_entropy


class CausalLMLoss:
    """(summed cross-entropy, number of label tokens) of logits (B, T, V) against labels (B, T).

    Labels equal to `ignore_index` (padding) count in neither. The pipeline's loss is then the mean over
    every label token of the batch (all micro-batches, replicas and accumulating calls), as
    `F.cross_entropy(..., ignore_index=-100)` of the unsplit batch gives, whatever the padding. Labels are
    aligned with the logits (label t is the target of position t, as `stagewise.data` makes them); with
    `shift=True` they are the inputs themselves, as in transformers (`labels=input_ids`), and position t is
    scored against label t + 1. `count(labels)` tells the pipeline a batch's label tokens before it runs, so
    each micro-batch's backward starts from 1 / count as the unsplit mean's does.
    """

    def __init__(self, shift: bool = False, ignore_index: int = IGNORE_INDEX):
        self.shift, self.ignore_index = shift, ignore_index

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor, *, shift: bool | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        if self.shift if shift is None else shift:
            logits, labels = logits[:, :-1], labels[:, 1:]
        if logits.dtype in (torch.float16, torch.bfloat16):  # a sum over many tokens needs float32's range
            logits = logits.float()
        total = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=self.ignore_index,
                                reduction="sum")
        return total, (labels != self.ignore_index).sum()

    def count(self, labels: torch.Tensor) -> int:
        """The label tokens of `labels` (B, T): what `__call__` returns as the count, summed over the batch."""
        if self.shift:
            labels = labels[:, 1:]
        return int((labels != self.ignore_index).sum().item())

    def __repr__(self) -> str:
        return f"CausalLMLoss(shift={self.shift}, ignore_index={self.ignore_index})"

    def __reduce__(self) -> tuple[Any, ...]:  # spawned ranks get an equal loss
        return CausalLMLoss, (self.shift, self.ignore_index)


causal_lm_loss = CausalLMLoss()
