"""The configurations and the two pipelines `bench_vs_torch.py` compares besides stagewise's own `Pipeline`.

`Settings` (what the spawned workers get), `parallel_ranks` (the cores' bound), `torch_supports` (which
configurations torch.distributed.pipelining runs), `SingleThreads` (the n-thread single process) and `TorchPipe`
(torch.distributed.pipelining over manual `PipelineStage`s).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

# torch and stagewise are imported inside the functions so that `stagewise --help` stays fast.

TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
                   "zbv": "ScheduleZBVZeroBubble"}


@dataclass(frozen=True)
class Settings:
    """Everything the worker processes need (picklable)."""

    configs: tuple[tuple[str, int], ...]  # (schedule, m) for this P
    auto: bool
    torch_side: bool
    planner: bool
    even: bool
    single_threads: int
    steps: int
    repeats: int
    warmup: int
    block_warmup: int
    batch: int
    seq_len: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    lr: float
    seed: int
    tie: bool
    timeout: float
    compile: bool = False  # also stagewise with compiled stages (`Pipeline(compile=True)`) on the even split


def parallel_ranks(P: int) -> int:
    """How many of P one-thread ranks can compute at once on this machine: the bound is that many times
    the single process."""
    return min(P, os.cpu_count() or 1)


def torch_supports(schedule: str, P: int, m: int) -> str | None:
    """Why torch.distributed.pipelining cannot run this configuration, or None."""
    if schedule not in TORCH_SCHEDULES:
        return "no such schedule in torch.distributed.pipelining"
    if schedule == "1f1b" and m < P:
        return "Schedule1F1B needs m >= P"
    if schedule == "interleaved" and m % max(1, m // P):
        return "ScheduleInterleaved1F1B needs m % max(1, m // P) == 0"
    return None


class SingleThreads:
    """The single-process baseline with `threads` intra-op threads on rank 0 (the other ranks do nothing), as a
    pipeline-like object for the rotation."""

    def __init__(self, s: Any, rank: int, threads: int) -> None:
        from _common import SingleProcess

        self.model = SingleProcess(s) if rank == 0 else None
        self.threads = threads

    def train_step(self, batch: Any) -> float | None:
        """One step of the single process with `threads` threads; its loss on rank 0, None elsewhere."""
        if self.model is None:
            return None
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.model.step(batch)
        finally:
            torch.set_num_threads(before)


class TorchPipe:
    """torch.distributed.pipelining over this rank's stages: manual PipelineStages, one schedule, Adam."""

    def __init__(self, layers: list, balance: list[int], placement: tuple[int, ...], schedule: str, m: int,
                 rank: int, group: Any, lr: float, loss_fn: Any) -> None:
        import torch
        from torch import nn
        from torch.distributed import pipelining as tp
        from torch.distributed.pipelining.schedules import PipelineScheduleMulti

        S = len(balance)
        starts = [sum(balance[:s]) for s in range(S)]
        self.stage_ids = [s for s in range(S) if placement[s] == rank]
        self.modules = [nn.Sequential(*layers[starts[s]:starts[s] + balance[s]]) for s in self.stage_ids]
        stages = [tp.PipelineStage(mod, s, S, torch.device("cpu"), group=group)
                  for mod, s in zip(self.modules, self.stage_ids)]
        cls = getattr(tp, TORCH_SCHEDULES[schedule])
        multi = issubclass(cls, PipelineScheduleMulti)
        self.schedule = cls(stages if multi else stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=True)
        self.first, self.last = 0 in self.stage_ids, S - 1 in self.stage_ids
        self.optimizer = torch.optim.Adam([p for mod in self.modules for p in mod.parameters()], lr=lr)

    def train_step(self, batch: Any) -> float | None:
        """One step; the batch loss (mean of the micro-batch means) on the rank with the last stage."""
        self.optimizer.zero_grad(set_to_none=True)
        losses: list | None = [] if self.last else None
        args = (batch[0],) if self.first else ()
        self.schedule.step(*args, target=batch[1] if self.last else None, losses=losses)
        self.optimizer.step()
        return float(sum(x.item() for x in losses) / len(losses)) if losses else None
