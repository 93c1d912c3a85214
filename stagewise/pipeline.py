"""The user API: `Pipeline`, one process (rank) per pipeline device, torchrun-style."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from stagewise.partition import resolve_balance
from stagewise.runtime import checkpoint, launch, ties
from stagewise.runtime.errors import PeerError, PipelineError
from stagewise.runtime.executor import Executor
from stagewise.runtime.feed import MicrobatchFeed
from stagewise.runtime.host_memory import keep_freed_host_memory
from stagewise.runtime.microbatch import scatter
from stagewise.runtime.stage import Stage
from stagewise.runtime.transport import DistTransport, LocalHub, LocalTransport, Transport
from stagewise.runtime.tree import map_tensors
from stagewise.runtime.versions import WeightVersions
from stagewise.schedules import SCHEDULES, Schedule, build, validate
from stagewise.schedules.timeline import Event, Timeline

LayerSpec = nn.Module | Callable[[], nn.Module]


class Pipeline:
    """Train a model given as a list of layers on a pipeline of devices, under any synchronous schedule.

    Run one process per device (`torchrun --nproc_per_node=P script.py` or
    `stagewise run -n P script.py`); every rank constructs the same `Pipeline` and calls
    `train_step` with the same batch. With `local_devices=P` the P devices instead run
    as threads of this one process (handy for notebooks and tests).

    Args:
        layers: an `nn.Sequential`, a list of modules, or zero-argument factories (each rank
            then builds only its own layers; `seed` makes that deterministic).
        loss_fn: `(last stage output, labels) -> scalar`, the mean over that micro-batch.
        schedule: naive, gpipe, 1f1b, interleaved, zb-h1 or zbv.
        microbatches: m; a batch of B samples gives micro-batches of B//m or B//m + 1 samples.
        partition: a balance list with one layer count per stage (devices x chunks), or a method:
            "uniform", "parameters", "type:REGEX" (DeepSpeed's), "time", "memory" or "auto" (these three
            measure the layers on `sample` and, for "memory"/"auto", respect `memory_limit` bytes per device).
        chunks: virtual stages per device (interleaved, zbv); default from the schedule.
        optimizer: `params -> torch.optim.Optimizer`, built over this rank's parameters.
        timeout: seconds any wait on another device may take before every rank stops with an error.
        show_partition: print the partition table on rank 0 at start-up (DeepSpeed-style);
            `partition_table()` returns it as data either way.
        keep_host_memory: on CPU, set glibc's malloc (process-wide) to keep freed memory instead of
            handing it back to the kernel, so steps do not pay page faults for their activations
            (4-7% of a step measured here); the process then keeps its peak heap. See
            `stagewise.runtime.host_memory`.
    """

    def __init__(self, layers: nn.Sequential | Sequence[LayerSpec],
                 loss_fn: Callable[[Any, Any], torch.Tensor] | None,
                 schedule: str = "1f1b", microbatches: int = 4, partition: str | Sequence[int] = "uniform",
                 chunks: int | None = None,
                 optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None = None,
                 timeout: float = 30.0, device: torch.device | str | None = None, seed: int | None = None,
                 local_devices: int | None = None, backend: str | None = None,
                 sample: tuple[Any, Any] | None = None, memory_limit: float | None = None,
                 vertical_sync: bool = False, show_partition: bool = True, keep_host_memory: bool = True):
        info = SCHEDULES.get(schedule)
        if info is None:
            raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")
        self.loss_fn, self.timeout, self.microbatches = loss_fn, timeout, microbatches
        if local_devices is not None:
            self.rank, self.world, self.local = 0, local_devices, True
        else:
            self.rank, self.world = launch.init_from_env(timeout, backend)
            self.local = False
        self.schedule_name, self.chunks, self.asynchronous = schedule, chunks, info.asynchronous
        self.schedule_options = {"vertical_sync": True} if vertical_sync else {}
        if vertical_sync and schedule != "pipedream":
            raise ValueError("vertical_sync applies to the 'pipedream' schedule only")
        self.schedule: Schedule = validate(build(schedule, self.world, microbatches, chunks, **self.schedule_options))
        layer_list = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
        self.profiles = self._profiles(layer_list, partition, sample)
        self.balance = resolve_balance(partition, len(layer_list), self.schedule.num_stages, layers=self.profiles,
                                       schedule=self.schedule, memory_limit=memory_limit)
        self.device = torch.device(device) if device is not None else self._default_device()
        self.keeps_host_memory = keep_host_memory and self.device.type == "cpu" and keep_freed_host_memory()
        starts = [sum(self.balance[:s]) for s in range(len(self.balance))]
        self.layer_ranges = [(a, a + n) for a, n in zip(starts, self.balance)]
        self.devices = list(range(self.world)) if self.local else [self.rank]
        self.stages: dict[int, Stage] = {}
        names, shared = ties.canonical_names(layer_list), ties.shared_ids(layer_list)
        for d in self.devices:
            for s in self.schedule.stages_of(d):
                lo, hi = self.layer_ranges[s]
                built = [_build_layer(layer_list[i], i, seed) for i in range(lo, hi)]
                self.stages[s] = Stage(s, [m.to(self.device) for m in built], lo, names)
        # Each device owns the parameters of its stages; a parameter shared by two stages of one
        # process is owned (and stepped) once, by the first device that holds it.
        owned: dict[int, list[nn.Parameter]] = {d: [] for d in self.devices}
        tied: dict[int, dict[str, nn.Parameter]] = {d: {} for d in self.devices}
        seen: set[int] = set()
        for d in self.devices:
            for s in self.schedule.stages_of(d):
                for p in self.stages[s].parameters():
                    key = ties.tie_key(p, names, shared)
                    if key is not None:
                        tied[d][key] = p
                    if id(p) not in seen:
                        seen.add(id(p))
                        owned[d].append(p)
        if self.local:
            self._ties: Any = ties.LocalTies(tied, timeout)
        elif self.world > 1:
            self._ties = ties.DistTies(tied[self.rank], self.rank, self.world)
        else:
            self._ties = None
        if self.asynchronous and any(tied.values()):
            raise ValueError(f"schedule {schedule!r} keeps several weight versions per stage; parameters tied "
                             "across stages (such as GPT-2's embedding and head) are not supported with it. Untie "
                             "them or use a synchronous schedule")
        self.optimizers = {d: optimizer(ps) for d, ps in owned.items() if optimizer is not None and ps}
        self._failed: str | None = None
        self._events: list[Event] = []
        self._hub = LocalHub() if self.local else None
        self._executors = {d: self._executor(d) for d in self.devices}
        self._watchdog = launch.Watchdog(self.rank) if not self.local and self.world > 1 else None
        if show_partition and self.rank == 0:
            print(self.partition_table().format(), flush=True)

    # ---- set-up ----

    def _profiles(self, layer_list: list, partition: str | Sequence[int], sample: tuple[Any, Any] | None):
        """Layer facts for the partitioner: static (names, parameters), or measured when the method needs times."""
        from stagewise.partition.profile import describe_layers, profile_layers

        if not all(isinstance(layer, nn.Module) for layer in layer_list):
            if isinstance(partition, str) and partition != "uniform":
                raise ValueError(f"partition={partition!r} needs the layers themselves; with layer factories "
                                 "use 'uniform' or an explicit balance list")
            return None
        if partition not in ("time", "memory", "auto"):
            return describe_layers(layer_list)
        if sample is None:
            raise ValueError(f"partition={partition!r} measures every layer: pass sample=(inputs, labels), a batch "
                             "like the ones you will train on")
        measured = None
        if self.local or self.rank == 0:  # one rank measures, so that every rank cuts the model the same way
            micro = scatter(sample[0], self.microbatches)[0][0]
            labels = scatter(sample[1], self.microbatches)[0][0] if self.loss_fn is not None else None
            device = torch.device("cuda", torch.cuda.current_device()) if self._uses_cuda() else torch.device("cpu")
            measured = profile_layers(layer_list, micro, device=device, loss_fn=self.loss_fn, labels=labels)
        if not self.local and self.world > 1:
            box = [measured]
            launch.dist.broadcast_object_list(box, src=0)
            measured = box[0]
        return measured

    def _uses_cuda(self) -> bool:
        return (not self.local and torch.cuda.is_available() and launch.dist.is_initialized()
                and launch.dist.get_backend() == "nccl")

    def partition_table(self):
        """Which layers every stage holds, with parameters (tied ones once), and with measured time and
        memory when the partition was measured (`partition="time" | "memory" | "auto"`)."""
        from stagewise.partition import PartitionTable

        if self.profiles is None:
            return PartitionTable.build(self.balance, [f"layer {i}" for i in range(sum(self.balance))],
                                        placement=self.schedule.placement)
        if any(p.time > 0 for p in self.profiles):
            return PartitionTable.from_profiles(self.balance, self.profiles, self.schedule)
        return PartitionTable.build(self.balance, [p.name for p in self.profiles],
                                    params=[p.params for p in self.profiles],
                                    shared=[p.shared for p in self.profiles], placement=self.schedule.placement)

    def _default_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self._uses_cuda() else torch.device("cpu")

    def _executor(self, d: int, schedule: Schedule | None = None) -> Executor:
        schedule = schedule or self.schedule
        stages = {s: self.stages[s] for s in schedule.stages_of(d)}
        transport: Transport
        if self.local:
            transport = LocalTransport(self._hub, self.timeout)
        else:
            ordered = self.world > 1 and launch.dist.get_backend() == "nccl"
            transport = DistTransport(self.device, self.schedule.num_stages, self.timeout, ordered=ordered)
        return Executor(schedule, d, stages, transport, self.loss_fn, lambda a: self._optimizer_step(d, a), rank=d)

    def _optimizer_step(self, d: int, action: Any) -> None:
        """The STEP action: make tied copies agree, then step this device's optimizer. In an
        asynchronous schedule the updated weights become the version the action names."""
        if isinstance(self._ties, ties.LocalTies):
            self._ties.sync_grads(d)
        elif self._ties is not None:
            self._ties.sync_grads()
        opt = self.optimizers.get(d)
        if opt is not None:
            opt.step()
        if self.asynchronous:
            for s in self.schedule.stages_of(d):
                st = self.stages[s]
                st.module.zero_grad(set_to_none=True)
                if st.versions is not None:
                    st.versions.created(action.version)

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """This rank's optimizer (None without `optimizer=`); with `local_devices`, device 0's."""
        return self.optimizers.get(self.devices[0])

    # ---- the API ----

    def named_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """This rank's parameters, named as `nn.Sequential(*layers).named_parameters()` names them (a
        parameter shared by two layers keeps its first name, and is listed once per process)."""
        out, seen = [], set()
        for s in sorted(self.stages):
            for name, p in self.stages[s].named_parameters():
                if id(p) not in seen:
                    seen.add(id(p))
                    out.append((name, p))
        return out

    def parameters(self) -> list[nn.Parameter]:
        return [p for _, p in self.named_parameters()]

    @property
    def stage_indices(self) -> list[int]:
        """The stages this process holds."""
        return sorted(self.stages)

    @property
    def is_last_rank(self) -> bool:
        return self.schedule.placement[-1] in self.devices

    def train_step(self, batch: tuple[Any, Any]) -> torch.Tensor:
        """One pipelined step over `batch = (inputs, labels)`: forward, backward, and the optimizer step
        if an optimizer was given. Gradients are zeroed first. Returns the batch loss (the mean over
        the batch, as one unpipelined `loss_fn(model(inputs), labels)` would give) on every rank, as a
        float64 scalar tensor."""
        if self.asynchronous:  # one batch as its own program: the pipeline fills and drains around it
            return torch.tensor(self.train(iter([batch]), 1)[0], dtype=torch.float64)
        return self._step(batch, train=True)["loss"]

    def eval_step(self, batch: tuple[Any, Any]) -> dict[str, Any]:
        """Loss without gradients: `{"loss": scalar, "outputs": last-stage outputs or None}` (outputs
        only on the rank that holds the last stage)."""
        return self._step(batch, train=False)

    def train_batch(self, data_iter: Iterator[tuple[Any, Any]] | Iterable[tuple[Any, Any]]) -> torch.Tensor:
        """DeepSpeed-style: pull one batch from `data_iter` and run `train_step` on it."""
        it = data_iter if isinstance(data_iter, Iterator) else iter(data_iter)
        return self.train_step(next(it))

    def train(self, data_iter: Iterable[tuple[Any, Any]], steps: int) -> list[float]:
        """Train on `steps` batches from `data_iter`; returns the loss of each batch (every rank).

        Synchronous schedules run `train_step` per batch (a flush each). The asynchronous ones,
        `pipedream` and `2bw`, run all the batches as one program that never drains between
        optimizer steps: PipeDream steps every stage after each micro-batch's backward, with
        weight stashing; 2BW accumulates a batch's gradients and steps once per batch, each
        batch using the weights from two steps back (W(t+1) = W(t) - lr * grad(W(t-1)) for SGD).
        """
        it = iter(data_iter)
        if not self.asynchronous:
            return [self.train_step(next(it)).item() for _ in range(steps)]
        if self._failed:
            raise PipelineError(f"this pipeline stopped after an earlier failure: {self._failed}")
        schedule = validate(build(self.schedule_name, self.world, self.microbatches, self.chunks, batches=steps,
                                  **self.schedule_options))
        feed = MicrobatchFeed(it, self.microbatches, self.device, keep=self.world // self.microbatches + 2)
        for s, st in self.stages.items():
            uses: dict[int, int] = {}
            for a in schedule.actions[schedule.placement[s]]:
                if a.op == "B" and a.stage == s:
                    uses[a.version] = uses.get(a.version, 0) + 1
            st.versions = WeightVersions(st.module, uses)
            st.module.zero_grad(set_to_none=True)
        executors = {d: self._executor(d, schedule) for d in self.devices}
        if self._watchdog is not None:
            self._watchdog.in_step = True
        try:
            results = self._run_all(feed.inputs, feed.labels, feed.weights, True, executors)
        finally:
            if self._watchdog is not None:
                self._watchdog.in_step = False
            self.version_peaks = {s: st.versions.peak for s, st in self.stages.items() if st.versions is not None}
            for st in self.stages.values():
                st.versions = None
        self._events = [e for r in results.values() for e in r["events"]]
        last = schedule.placement[-1]
        per_step = torch.zeros(steps, dtype=torch.float64, device=self.device)
        if last in results:
            for n, value in results[last]["losses"].items():
                per_step[n // self.microbatches] += value.to(torch.float64)
        if not self.local and self.world > 1:
            self._guard(lambda: launch.dist.broadcast(per_step, src=last), f"broadcasting the losses from rank {last}")
        return per_step.tolist()

    def close(self) -> None:
        """Stop this pipeline's failure watchdog thread (one per multi-process pipeline); idempotent. Call it
        when a process builds many pipelines in turn; the process group stays for the caller to destroy."""
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None

    def last_trace(self) -> Timeline:
        """The measured timeline of the last step, every device's events (seconds; same clock on one
        machine). With several processes this is a collective: call it on every rank."""
        events = list(self._events)
        if not self.local and self.world > 1:
            gathered: list[Any] = [None] * self.world
            launch.dist.all_gather_object(gathered, events)
            events = [e for part in gathered for e in part]
        return Timeline(self.world, sorted(events, key=lambda e: (e.device, e.start)),
                        title=f"measured: {self.schedule.describe()}", unit="s",
                        num_stages=self.schedule.num_stages)

    def save_checkpoint(self, folder: str | os.PathLike[str], extra: dict[str, Any] | None = None) -> None:
        """Write every stage's weights (and this rank's optimizer state) under `folder`, each file
        atomically (a temporary name, then a rename), so a crash never leaves a half-written checkpoint.
        With several processes this is a collective: every rank writes its own stages."""
        meta = None
        if 0 in self.devices:
            meta = {"schedule": self.schedule.name, "devices": self.world, "microbatches": self.microbatches,
                    "balance": self.balance, "placement": list(self.schedule.placement), **(extra or {})}
        checkpoint.save(folder, {s: (self.layer_ranges[s], st.module) for s, st in self.stages.items()},
                        self.optimizers, meta)
        if not self.local and self.world > 1:
            self._guard(launch.dist.barrier, "the checkpoint barrier")

    def load_checkpoint(self, folder: str | os.PathLike[str]) -> dict[str, Any]:
        """Load what `save_checkpoint` wrote for this process's stages (same balance); returns meta.json."""
        return checkpoint.load(folder, self.balance, {s: st.module for s, st in self.stages.items()},
                               self.optimizers)

    def peak_activation_bytes(self) -> dict[int, int]:
        """Peak saved-activation bytes per stage held by this process, since construction."""
        return {s: st.peak_bytes for s, st in self.stages.items()}

    # ---- running ----

    def _step(self, batch: tuple[Any, Any], train: bool) -> dict[str, Any]:
        if self._failed:
            raise PipelineError(f"this pipeline stopped after an earlier failure: {self._failed}")
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
            raise TypeError("a batch is (inputs, labels); got " + type(batch).__name__)
        inputs, labels = batch
        m = self.schedule.microbatches
        try:
            in_mbs, weights = scatter(inputs, m)
            lab_mbs, _ = scatter(labels, m)
        except ValueError as err:
            raise ValueError(f"{err} (schedule {self.schedule.name}, {m} micro-batches)") from None
        if self.device.type != "cpu":
            in_mbs = [map_tensors(x, lambda t: t.to(self.device, non_blocking=True)) for x in in_mbs]
            lab_mbs = [map_tensors(x, lambda t: t.to(self.device, non_blocking=True)) for x in lab_mbs]
        if train:
            for st in self.stages.values():
                st.module.zero_grad(set_to_none=True)
        if self._watchdog is not None:
            self._watchdog.in_step = True
        try:
            return self._finish_step(self._run_all(in_mbs, lab_mbs, weights, train), train)
        finally:
            if self._watchdog is not None:
                self._watchdog.in_step = False

    def _finish_step(self, results: dict[int, dict], train: bool) -> dict[str, Any]:
        self._events = [e for r in results.values() for e in r["events"]]
        last = self.schedule.placement[-1]
        loss = results[last]["loss"] if last in results else None
        if not self.local and self.world > 1:
            # float64 so that the loss every rank sees is the last stage's to the last bit
            buf = (loss.detach().clone() if loss is not None else torch.zeros((), device=self.device))
            buf = buf.to(self.device, torch.float64).reshape(1)
            self._guard(lambda: launch.dist.broadcast(buf, src=last), f"broadcasting the loss from rank {last}")
            loss = buf[0]
        outputs = results[last]["outputs"] if last in results and not train else None
        loss = loss.detach().to(torch.float64) if loss is not None else None
        return {"loss": loss, "outputs": outputs}

    def _run_all(self, in_mbs: Any, lab_mbs: Any, weights: Any, train: bool,
                 executors: dict[int, Executor] | None = None) -> dict[int, dict]:
        executors = executors or self._executors

        def run(d: int) -> dict:
            return executors[d].run(in_mbs, lab_mbs, weights, train=train, keep_outputs=not train)

        if not self.local:
            return {self.rank: self._guard(lambda: run(self.rank), "the step")}
        results: dict[int, dict] = {}
        errors: dict[int, BaseException] = {}

        def worker(d: int) -> None:
            try:
                results[d] = run(d)
            except BaseException as err:
                errors[d] = err
                self._hub.abort(f"device {d} failed: {err}")
                if self._ties is not None:
                    self._ties.abort()

        threads = [threading.Thread(target=worker, args=(d,), daemon=True) for d in self.devices]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            root = [e for e in errors.values() if not isinstance(e, PeerError)]
            err = (root or list(errors.values()))[0]
            self._failed = str(err)
            raise err
        return results

    def _guard(self, fn: Callable[[], Any], what: str) -> Any:
        """Run `fn`; on failure publish or fetch the root cause, stop the group and raise a PipelineError."""
        try:
            return fn()
        except Exception as err:
            own = isinstance(err, PipelineError) and not _is_connection_error(err)
            peer = None if own else launch.peer_failure()
            if peer is not None:
                msg = f"rank {self.rank} stopped during {what} because {peer}"
                self._failed = msg
                launch.abort_group()
                raise PeerError(msg) from err
            msg = str(err) if isinstance(err, PipelineError) else f"rank {self.rank} failed during {what}: {err}"
            self._failed = msg
            launch.report_failure(msg, self.rank)
            launch.abort_group()
            if self.rank == 0 and self.world > 1:
                time.sleep(2.5)  # the store lives in this process: let the peers read the cause before it exits
            if isinstance(err, PipelineError):
                raise
            raise PipelineError(msg, rank=self.rank) from err


def _is_connection_error(err: BaseException) -> bool:
    text = f"{err} {err.__cause__}".lower()
    return any(k in text for k in ("connection", "closed", "reset by peer", "broken pipe", "aborted", "timed out"))


def _build_layer(spec: LayerSpec, index: int, seed: int | None) -> nn.Module:
    if isinstance(spec, nn.Module):
        return spec
    if not callable(spec):
        raise TypeError(f"layer {index} is neither an nn.Module nor a zero-argument factory: {spec!r}")
    if seed is not None:
        torch.manual_seed(seed + index)
    module = spec()
    if not isinstance(module, nn.Module):
        raise TypeError(f"layer factory {index} returned {type(module).__name__}, not an nn.Module")
    return module
