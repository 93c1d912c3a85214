"""One call that proves a pipeline exact before a long run: `stagewise.check(layers, loss_fn, batch, ...)`.

It runs one training step of the pipeline (its devices as threads of this process, `local_devices`) and
the same model unsplit in one process on the same batch, both in float64 by default, and reports the
relative difference of the loss and of every parameter's gradient: max |pipeline - reference| /
max |reference| per tensor. Exact pipelining leaves only float rounding (about 1e-15 in float64); a
model whose layers depend on how the batch is split (batch statistics, state kept across calls, a
random draw per call) or a schedule that drops or repeats work shows up as a large difference, named. A model
that is random by itself (dropout, noise) is told apart: two forwards of the unsplit model on the batch are
compared, and the report says when they differ (`CheckReport.reference_variation`, `deterministic`).
"""

from __future__ import annotations

import copy
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from stagewise.runtime.loss import mean_of
from stagewise.tree import flatten, map_tensors


@dataclass
class CheckReport:
    """The pipeline's loss and gradients against one process: relative errors, the worst, and the verdict."""

    schedule: str
    stages: int
    microbatches: int
    balance: list[int]
    dtype: str
    loss: float
    reference_loss: float
    loss_error: float
    grad_errors: dict[str, float]  # parameter name (as nn.Sequential(*layers) names it) -> relative error
    tolerance: float
    # two forwards of the unsplit model in one process, on the same batch: their relative difference (0: the same)
    reference_variation: float = 0.0

    @property
    def deterministic(self) -> bool:
        """Whether the unsplit model gave the same output twice on the same batch (within the tolerance); a model
        that does not (dropout, random noise, state changed by each call) cannot match any pipeline."""
        return self.reference_variation <= self.tolerance

    @property
    def worst(self) -> tuple[str, float]:
        """(what, error) of the largest relative error, the loss included."""
        items = [("loss", self.loss_error), *self.grad_errors.items()]
        return max(items, key=lambda kv: kv[1])

    @property
    def ok(self) -> bool:
        return self.worst[1] <= self.tolerance

    def to_dict(self) -> dict:
        return {**asdict(self), "worst": list(self.worst), "ok": self.ok, "deterministic": self.deterministic}

    def format(self) -> str:
        name, err = self.worst
        lines = [f"check: {self.schedule} on {self.stages} devices, {self.microbatches} micro-batches, balance "
                 f"{self.balance}, {self.dtype}, against one process on the same batch",
                 f"  loss {self.loss:.17g} vs {self.reference_loss:.17g}: relative error {self.loss_error:.3g}"]
        ranked = sorted(self.grad_errors.items(), key=lambda kv: -kv[1])
        for n, e in ranked[:5]:
            lines.append(f"  grad {n}: relative error {e:.3g}")
        if len(ranked) > 5:
            lines.append(f"  ... {len(ranked) - 5} more gradients, each at most {ranked[5][1]:.3g}")
        verdict = "OK" if self.ok else "FAILED"
        random = "" if self.deterministic else "; the model is random, see below"
        lines.append(f"{verdict}: worst relative error {err:.3g} ({name}), tolerance {self.tolerance:g}{random}")
        if not self.deterministic:
            lines.append(f"  the model is not deterministic: two forwards of the unsplit model in one process on the "
                         f"same batch differ by {self.reference_variation:.3g} (relative), so no pipeline can match "
                         "it. Set dropout to 0 (or call model.eval() on the layers), remove random noise or state "
                         "that changes per call, then check again; seeding alone does not help, as the pipeline "
                         "draws per micro-batch")
        return "\n".join(lines)


def relative_error(got: torch.Tensor | None, want: torch.Tensor | None) -> float:
    """max |got - want| / max |want| (absolute when want is all zeros); a missing gradient counts as zeros."""
    if got is None and want is None:
        return 0.0
    if got is None or want is None:
        present = got if got is not None else want
        got = torch.zeros_like(present) if got is None else got
        want = torch.zeros_like(present) if want is None else want
    got, want = got.detach().double(), want.detach().double()
    if got.shape != want.shape:
        return float("inf")
    diff = (got - want).abs().max().item() if got.numel() else 0.0
    scale = want.abs().max().item() if want.numel() else 0.0
    return diff / scale if scale > 0 else diff


def variation(model: nn.Module, inputs: Any) -> float:
    """The relative difference (as `relative_error`, the worst tensor) of two forwards of `model` on `inputs` in a
    row, in this process and in the model's current mode, without gradients; 0 for a deterministic model. The
    global random generators are left as they were."""
    cuda = sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)
    with torch.no_grad(), torch.random.fork_rng(devices=cuda):
        first, second = flatten(model(inputs)), flatten(model(inputs))
    if first[1].treespec != second[1].treespec or len(first[0]) != len(second[0]):
        return float("inf")
    return max((relative_error(b, a) for a, b in zip(first[0], second[0])), default=0.0)


def _as_dtype(tree: Any, dtype: torch.dtype) -> Any:
    return map_tensors(tree, lambda t: t.to(dtype) if t.is_floating_point() else t)


def check(layers: nn.Sequential | Sequence[nn.Module], loss_fn: Callable[[Any, Any], torch.Tensor],
          batch: tuple[Any, Any], *, schedule: str = "1f1b", stages: int = 2, microbatches: int = 4,
          partition: str | Sequence[int] = "uniform", virtual_stages: int | None = None,
          dtype: torch.dtype | None = torch.float64, tolerance: float | None = None,
          timeout: float = 60.0) -> CheckReport:
    """Run one step of `layers` pipelined (`schedule` on `stages` devices as threads, `microbatches`,
    `partition`, `virtual_stages`) and unpipelined on `batch = (inputs, labels)`; compare the loss and every gradient.

    The layers are copied (yours are left untouched) and, with `dtype` (default float64; None keeps
    theirs), converted with the batch's floating tensors. `tolerance` defaults to 1e-10 in float64 and
    1e-4 otherwise (float32 rounding depends on the micro-batch split). Returns a `CheckReport`;
    `report.ok` says whether every error is within the tolerance.
    """
    from stagewise.pipeline import Pipeline

    mods = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
    if not all(isinstance(m, nn.Module) for m in mods):
        raise ValueError("check compares against the unsplit model, so it needs the layers themselves (modules), "
                         "not factories")
    both = copy.deepcopy(nn.ModuleList(mods))  # one copy keeps ties between the layers
    if dtype is not None:
        both.to(dtype)
        batch = _as_dtype(batch, dtype)
    reference = copy.deepcopy(both)
    pipe_layers = list(both)
    ref_dtype = next((p.dtype for p in reference.parameters()), torch.get_default_dtype())
    tol = tolerance if tolerance is not None else (1e-10 if ref_dtype == torch.float64 else 1e-4)

    model = nn.Sequential(*reference)
    model.zero_grad(set_to_none=True)
    ref_loss = mean_of(loss_fn(model(batch[0]), batch[1]))  # a (sum, count) pair's reference is sum / count
    ref_loss.backward()
    want = {n: p.grad for n, p in model.named_parameters()}
    varies = variation(model, batch[0])  # a random model fails any check: said in the report

    pipe = Pipeline(pipe_layers, loss_fn, schedule=schedule, microbatches=microbatches, partition=partition,
                    virtual_stages=virtual_stages, local_devices=stages, timeout=timeout, show_partition=False)
    try:
        with warnings.catch_warnings():  # no optimizer on purpose: the gradients are compared
            warnings.filterwarnings("ignore", "stagewise: this Pipeline has no optimizer")
            loss = pipe.train_step(batch)
        got = {n: p.grad for n, p in pipe.named_parameters()}
        errors = {n: relative_error(got.get(n), g) for n, g in want.items()}
        ref = ref_loss.item()
        loss_error = abs(loss.item() - ref) / abs(ref) if ref else abs(loss.item())
        return CheckReport(pipe.schedule.name, stages, pipe.microbatches, list(pipe.balance), str(ref_dtype),
                           loss.item(), ref, loss_error, errors, tol, varies)
    finally:
        pipe.close()
