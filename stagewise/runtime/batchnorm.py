"""BatchNorm whose running statistics follow the whole mini-batch, not each micro-batch (torchgpipe's idea).

A pipeline runs a BatchNorm layer once per micro-batch. Plain `nn.BatchNorm*` would then move
its running mean and variance m times per step, each time towards one micro-batch's statistics.
`DeferredBatchNorm` instead, in training mode:

- normalises each micro-batch with that micro-batch's own mean and (biased) variance, as
  torchgpipe does (the gradient is that of BatchNorm over the micro-batch);
- accumulates count, mean and sum of squared deviations over the micro-batches (merged exactly,
  Chan et al.), skipping recomputations (`stagewise.runtime.stage.is_recomputing()`);
- after the `chunks`-th micro-batch, updates the running statistics once, exactly as
  `nn.BatchNorm` would for the whole mini-batch: running_mean <- (1 - f) running_mean + f mean,
  running_var <- (1 - f) running_var + f var (the unbiased variance of the mini-batch, n/(n-1)),
  num_batches_tracked += 1, with f = momentum, or 1/num_batches_tracked when momentum is None.
  (torchgpipe's version puts the biased variance into running_var; this one matches `nn.BatchNorm`.)

In eval mode it normalises with the running statistics, like `nn.BatchNorm`. Its state_dict is
that of the BatchNorm it replaces (the accumulators are not buffers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from stagewise.runtime.stage import is_recomputing


class DeferredBatchNorm(_BatchNorm):
    """See the module docstring. `chunks`: micro-batches per mini-batch (GPipe sets it)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 chunks: int = 1, device: torch.device | None = None, dtype: torch.dtype | None = None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        self.chunks = chunks
        self.reset_tracking()

    def reset_tracking(self) -> None:
        """Forget the micro-batches tracked so far (GPipe calls it at the start of every mini-batch)."""
        self.tracked = 0
        self.count = 0
        self.mean: torch.Tensor | None = None
        self.m2: torch.Tensor | None = None

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"DeferredBatchNorm expects an input of at least 2 dimensions (N, C, ...), "
                             f"got {input.dim()}")

    def _track(self, x: torch.Tensor) -> None:
        dims = [0, *range(2, x.dim())]
        with torch.no_grad():
            x = x.detach().to(torch.promote_types(x.dtype, torch.float32))
            n = x.numel() // x.size(1)
            mean = x.mean(dims)
            m2 = ((x - mean.view(1, -1, *([1] * (x.dim() - 2)))) ** 2).sum(dims)
            if self.mean is None:
                self.count, self.mean, self.m2 = n, mean, m2
            else:
                total = self.count + n
                delta = mean - self.mean
                self.mean = self.mean + delta * (n / total)
                self.m2 = self.m2 + m2 + delta * delta * (self.count * n / total)
                self.count = total
        self.tracked += 1
        if self.tracked >= self.chunks:
            self._commit()

    def _commit(self) -> None:
        assert self.mean is not None and self.m2 is not None
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
            var = self.m2 / max(self.count - 1, 1)
            self.running_mean.mul_(1 - f).add_(self.mean.to(self.running_mean.dtype), alpha=f)
            self.running_var.mul_(1 - f).add_(var.to(self.running_var.dtype), alpha=f)
        self.reset_tracking()

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(input)
        if not self.training:
            return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0,
                                self.eps)
        if not is_recomputing():
            self._track(input)
        return F.batch_norm(input, None, None, self.weight, self.bias, True, 0.0, self.eps)

    @classmethod
    def convert(cls, module: nn.Module, chunks: int = 1) -> nn.Module:
        """`module` with every `nn.BatchNorm*` that tracks running statistics replaced by a DeferredBatchNorm
        sharing its parameters and buffers (children are replaced in place); returns the module, or its
        replacement when `module` itself is such a BatchNorm."""
        if isinstance(module, DeferredBatchNorm):
            module.chunks = chunks
            return module
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            new = cls(module.num_features, module.eps, module.momentum, module.affine, chunks)
            if module.affine:
                new.register_parameter("weight", module.weight)
                new.register_parameter("bias", module.bias)
            new.register_buffer("running_mean", module.running_mean)
            new.register_buffer("running_var", module.running_var)
            new.register_buffer("num_batches_tracked", module.num_batches_tracked)
            new.train(module.training)
            return new
        for name, child in module.named_children():
            converted = cls.convert(child, chunks)
            if converted is not child:
                module.add_module(name, converted)
        return module
