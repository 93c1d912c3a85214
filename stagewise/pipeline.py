"""The user API: `Pipeline`, one rank per pipeline device (torchrun-style processes, or threads).

`Pipeline` resolves its options and composes the runtime's parts: a World (ranks and how
they talk), the stages each rank holds, an executor per rank that walks its action list,
and the training step's parts that run at every STEP action.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.measure.layers import layer_facts
from stagewise.measure.plan_model import plan_if_auto
from stagewise.partition import PartitionTable, resolve_balance
from stagewise.runtime import checkpoint, claims
from stagewise.runtime.host_memory import keep_freed_host_memory
from stagewise.runtime.options import resolve_options
from stagewise.runtime.precision import LossScaler, Precision
from stagewise.runtime.processes import make_world
from stagewise.runtime.runner import Runner
from stagewise.runtime.sharding import Sharding
from stagewise.runtime.stage_set import LayerSpec, StageSet, as_layer_list
from stagewise.schedules import Schedule
from stagewise.schedules.recompute import check_mode
from stagewise.schedules.registry import resolve_schedule
from stagewise.schedules.timeline import Timeline
from stagewise.tree import concat


class Pipeline:
    """Train a model given as a list of layers on a pipeline of devices.

    Run one process per device (`torchrun --nproc_per_node=P script.py` or
    `stagewise run -n P script.py`); every rank constructs the same `Pipeline` and calls
    `train_step` with the same batch. With `local_devices=P` the P devices instead run
    as threads of this one process (handy for notebooks and tests).
    Refused, not trained wrongly: bad options (before anything runs), ranks given different batches (a checksum
    of every byte), and a training step whose loss does not require grad (an integer or detached output, a frozen
    model), named by stage and layer where plain PyTorch's `loss.backward()` raises.

    Args:
        layers: an `nn.Sequential`, a list of modules, or zero-argument factories (each rank
            then builds only its own layers; `seed` makes that deterministic).
        loss_fn: `(last stage output, labels) -> scalar`, the mean over that micro-batch's samples (weighted by its
            share of samples: exact for sample means), or `-> (sum, count)`: the step's loss is then
            sum(sums) / sum(counts) over every micro-batch, replica and accumulating call, exact for token means
            of padded batches (`stagewise.models.causal_lm_loss`; see `stagewise.runtime.loss`).
        schedule: a registered name (see `stagewise simulate --list`), the path of a schedule file (.csv/.txt), a
            `Schedule` built by hand for P devices (validated before anything runs), or "auto": the planner
            (`stagewise.partition.plan_search`) measures the layers on `sample` and picks schedule, m and balance within
            `memory_limit` (bytes or text like "2GiB"); `self.plan` holds its table. `planner`: its options.
        microbatches: m (default 4; taken from the schedule when a `Schedule` or a file is given), or "auto"; a
            batch of B samples gives micro-batches of B//m or B//m + 1 samples.
        partition: a balance list with one layer count per stage (devices x virtual stages), or a method:
            "uniform", "parameters", "type:REGEX" (DeepSpeed's), "time", "memory" or "auto" (these three
            measure the layers on `sample` and, for "memory"/"auto", respect `memory_limit` bytes per device).
        virtual_stages: virtual stages per device (interleaved, looped-bfs; V-shaped: 2); default from the schedule.
        optimizer: `params -> torch.optim.Optimizer`, built over each rank's parameters.
        data_parallel: D >= 1 replicas of the whole pipeline: P x D ranks (rank = device x D + replica). Every rank is
            given the same batch; replica r trains on its share; gradients are reduced over replicas before the step.
        shard: "none", "optimizer", "gradients" or "full": ZeRO-1/2/3 over the replicas (`stagewise.runtime.sharding`).
        max_grad_norm: > 0: clip the gradients by their global norm (every stage and replica, tied parameters once)
            as `clip_grad_norm_` does; `last_step["grad_norm"]` is the norm (`track_grad_norm`: measured only).
        timeout: seconds any wait on another device may take before every rank stops with an error (> 0).
        on_nonfinite: a NaN/inf loss or gradient never steps: "raise" names the stage and micro-batch, "skip" warns.
        vertical_sync: an option of the schedule's generator (pipedream); other generator options are refused.
        show_partition: print the partition table on rank 0 at start-up (`partition_table()` returns it).
        keep_host_memory: on CPU, keep freed memory in glibc's malloc (process-wide): no page faults per step
            (4-7% of a step here); see `stagewise.runtime.host_memory`.
        precision: "fp32", "bf16" or "fp16": forwards under autocast, low-precision stage I/O; fp16 scales the
            loss dynamically (`last_step["loss_scale"]`, `["overflow_skips"]`, `loss_scalers`; a non-finite loss is
            `on_nonfinite`'s, not an overflow). See `stagewise.runtime.precision`.
        loss_scale: fp16's `LossScaler` options: `init_scale`, `growth_factor`, `backoff_factor`, `growth_interval`,
            `min_scale` (1), `max_consecutive_skips` (20): an overflow at min_scale or after that many skips raises.
        recompute: "never", "except_last", "always" or N layers per checkpointed group: which
            forwards keep only their input and recompute (RECOMPUTE actions); "auto": the planner's choice.
        compile: `torch.compile` each stage in place, names kept: True (inductor, else aot_eager) or a backend's name.
    """

    def __init__(self, layers: nn.Sequential | Sequence[LayerSpec],
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None,
                 schedule: str | Schedule = "1f1b", microbatches: int | str | None = None,
                 partition: str | Sequence[int] = "uniform", virtual_stages: int | None = None,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 timeout: float = 30.0, device: torch.device | str | None = None, seed: int | None = None,
                 local_devices: int | None = None, backend: str | None = None, sample: tuple[Any, Any] | None = None,
                 memory_limit: float | str | None = None, planner: dict | None = None,
                 vertical_sync: bool = False, show_partition: bool = True, keep_host_memory: bool = True,
                 data_parallel: int = 1, max_grad_norm: float | None = None, track_grad_norm: bool = False,
                 precision: str = "fp32", recompute: str | int = "never", on_nonfinite: str = "raise",
                 loss_scale: dict[str, Any] | None = None, compile: bool | str = False, shard: str = "none"):
        self.loss_fn, self.timeout = loss_fn, timeout
        options, scaling, planner = resolve_options(schedule, timeout, on_nonfinite, max_grad_norm, data_parallel,
                                                    vertical_sync, loss_scale, precision, shard, local_devices,
                                                    compile, planner)  # checked before anything runs
        self.world = make_world(local_devices, timeout=timeout, backend=backend, device=device,
                                data_parallel=data_parallel)
        layer_list = claims.claim(as_layer_list(layers), self)  # warns when another live Pipeline holds them
        self.precision = Precision(precision)  # a bad name fails here, on every rank, before any planning
        self.plan = plan_if_auto(layer_list, loss_fn, sample, self.world, schedule, microbatches, partition,  # or None
                                 virtual_stages, memory_limit, recompute, planner, precision)
        if self.plan is not None:
            schedule, microbatches, virtual_stages, partition, recompute = self.plan.choice.settings()
        self.schedule = resolve_schedule(schedule, self.world.grid.pipeline, microbatches, virtual_stages,
                                         data_parallel, check_mode(recompute), shard=shard, **options)
        self.microbatches = self.schedule.microbatches
        self._rebuild = (schedule, virtual_stages, options) if isinstance(schedule, str) else None
        self.device = self.world.device(self.world.local_ranks[0])
        self.profiles = self.world.compute_once(lambda: layer_facts(layer_list, partition, sample, self.microbatches,
                                                                    loss_fn, self.device, precision))
        self.balance = resolve_balance(partition, len(layer_list), self.schedule.num_stages, layers=self.profiles,
                                       schedule=self.schedule, memory_limit=memory_limit)
        self.keeps_host_memory = keep_host_memory and self.device.type == "cpu" and keep_freed_host_memory()
        self.model = StageSet(layer_list, self.balance, self.schedule, self.world, seed, self.precision,
                              recompute if isinstance(recompute, int) else None, compile)
        self.loss_scalers = {r: LossScaler(**scaling) for r in self.world.local_ranks} if precision == "fp16" else {}
        self.stages, self.layer_ranges = self.model.stages, self.model.layer_ranges
        self.sharding = Sharding(shard, self.world, self.model, self.precision)  # ties made equal, stages sharded
        self.optimizers = self.sharding.optimizers(optimizer)
        self.step_parts = self.sharding.training_step(max_grad_norm=max_grad_norm, track_grad_norm=track_grad_norm,
                                                      scalers=self.loss_scalers, optimizer=optimizer is not None)
        self.last_step: dict[str, Any] = {}  # the last step's loss, and what its parts reported (grad_norm, ...)
        self.runner = Runner(self.world, self.model, self.schedule, loss_fn, self.step_parts, self.optimizers,
                             self.loss_scalers, on_nonfinite)
        if show_partition and 0 in self.world.local_ranks:
            print(self.partition_table().format(), flush=True)

    # ---- the API ----

    def partition_table(self) -> PartitionTable:
        """Which layers every stage holds, with parameters (tied ones once), and with measured time and
        memory when the partition was measured (`partition="time" | "memory" | "auto"`)."""
        return PartitionTable.of(self.balance, self.profiles, self.schedule)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """This rank's optimizer (None without `optimizer=`); with `local_devices`, rank 0's."""
        return self.optimizers.get(self.world.local_ranks[0])

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This process's parameters (of its first data replica), named as `nn.Sequential(*layers)` names them
        (a parameter shared by two layers keeps its first name, and is listed once per process)."""
        return self.model.named_parameters()

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    @property
    def rank(self) -> int:
        """This process's rank (with `local_devices`, 0: the process runs every rank)."""
        return self.world.local_ranks[0]

    @property
    def stage_indices(self) -> list[int]:
        """The stages this process holds."""
        return sorted(self.stages)

    def train_step(self, batch: tuple[Any, Any], step: bool = True) -> torch.Tensor:
        """One pipelined step over `batch = (inputs, labels)`: forward, backward, and the optimizer step if an
        optimizer was given. Returns the batch's loss (as one unpipelined `loss_fn(model(inputs), labels)` gives;
        sum / count for a pair) on every rank, a float64 scalar tensor. With `step=False` the gradients are only
        accumulated; the next call with `step=True` steps on the mean over every sample (or counted item) since the
        last step, and `last_step["loss"]` is the loss over all those calls."""
        if self.schedule.asynchronous:  # one batch as its own program: the pipeline fills and drains around it
            if not step:
                raise ValueError(f"schedule {self.schedule.name!r} steps by itself; step=False needs a synchronous one")
            return torch.tensor(self.train(iter([batch]), 1)[0], dtype=torch.float64)
        return self._step(batch, train=True, step=step)["loss"]

    def eval_step(self, batch: tuple[Any, Any]) -> dict[str, Any]:
        """`{"loss", "outputs"}` without gradients, in eval mode (each module's mode restored after). `outputs`: the
        last stage's, joined as one forward gives them (`stagewise.tree.concat`); None off the last stage; with D > 1
        replicas, this process's first replica's share (a contiguous slice of the batch); `loss` is the batch's."""
        with self.model.evaluating():
            out = self._step(batch, train=False)
        return {**out, "outputs": None if out["outputs"] is None else concat(out["outputs"])}

    def train_batch(self, data_iter: Iterator[tuple[Any, Any]] | Iterable[tuple[Any, Any]]) -> torch.Tensor:
        """DeepSpeed-style: pull one batch from `data_iter` and run `train_step` on it."""
        return self.train_step(next(data_iter if isinstance(data_iter, Iterator) else iter(data_iter)))

    def train(self, data_iter: Iterable[tuple[Any, Any]], steps: int) -> list[float]:
        """Train on `steps` batches from `data_iter`; returns the loss of each batch (every rank).

        Synchronous schedules run `train_step` per batch (a flush each). The asynchronous ones,
        `pipedream` and `2bw`, run all the batches as one program that never drains between
        optimizer steps: PipeDream steps every stage after each micro-batch's backward, with
        weight stashing; 2BW accumulates a batch's gradients and steps once per batch, each
        batch using the weights from two steps back (W(t+1) = W(t) - lr * grad(W(t-1)) for SGD).
        """
        it = iter(data_iter)
        if not self.schedule.asynchronous:
            return [self.train_step(next(it)).item() for _ in range(steps)]
        self.world.check()
        losses, self.version_peaks = self.runner.unflushed(it, self._rebuild, steps)
        return losses

    def close(self) -> None:
        """Stop this pipeline's failure watchdog thread (when building many pipelines); the process group stays."""
        self.world.close()
        self.closed = True  # its modules may go to another Pipeline without a warning

    def last_trace(self) -> Timeline:
        """The measured timeline of the last step, every device's events (seconds; same clock on one
        machine). With several processes this is a collective: call it on every rank."""
        return self.runner.trace()

    def save_checkpoint(self, folder: str | os.PathLike[str], step: int | None = None,
                        extra: dict[str, Any] | None = None, keep: int | None = 3) -> Path:
        """Write weights, optimizer state, every rank's RNG state and `extra` (e.g. the data position; state
        dicts may hold tensors) as one checkpoint keyed by the unsplit model's names (a collective). With
        `step`, `folder` is a root and the checkpoint is `folder/step-NNNNNNNN` (the newest `keep` are kept);
        else `folder` itself. Atomic: nothing is visible until every rank's files are fsynced and rank 0 has
        renamed the finished folder into place. Format: `stagewise.runtime.checkpoint`."""
        return checkpoint.save(folder, self.world, self.model, self.optimizers, step=step, extra=extra, keep=keep)

    def load_checkpoint(self, folder: str | os.PathLike[str], fallback: bool = False,
                        strict: bool = True) -> dict[str, Any]:
        """Restore weights, optimizer state and RNG from a checkpoint folder or root (its newest), written by
        any pipeline shape (P, schedule, balance, virtual_stages, D). Files are verified first; a damaged checkpoint
        is refused unless `fallback` (then the newest intact one is used, and said). Returns the manifest:
        `step`, `extra`, `path` (what was loaded), `skipped` (damaged ones passed over)."""
        return checkpoint.load(folder, self.world, self.model, self.optimizers, fallback=fallback, strict=strict)

    def peak_activation_bytes(self) -> dict[int, int]:
        """Peak saved-activation bytes per stage held by this process, since construction."""
        return {s: st.peak_bytes for s, st in self.stages.items()}

    def peak_device_activation_bytes(self) -> dict[int, int]:
        """Peak saved-activation bytes per pipeline device held by this process (all its stages at once)."""
        return self.model.device_peaks()

    def _step(self, batch: tuple[Any, Any], train: bool, step: bool = True) -> dict[str, Any]:
        self.world.check()
        loss = self.runner.step_batch(batch, self.microbatches, train, step)
        if train and step:
            self.last_step = {"loss": self.runner.step_loss, "grad_norm": None, "skipped": None, **self.runner.report()}
            if self.last_step["skipped"] and 0 in self.world.local_ranks:
                warnings.warn(f"stagewise: step skipped on every rank: {self.last_step['skipped']}", stacklevel=3)
        return {"loss": loss, "outputs": None if train else self.runner.outputs()}
