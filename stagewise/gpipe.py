"""The user API `GPipe`: torchgpipe's one-process pipeline, called like any module.

    model = GPipe(nn.Sequential(...), balance=[4, 3, 3, 4], devices=[0, 1, 2, 3], chunks=4)
    out = model(x)                      # on the last device
    loss_fn(out, y).backward()          # the pipelined backward; .grad on every parameter
    optimizer.step()

`GPipe` resolves its options and composes the parts `Pipeline` runs on: the balance
(`stagewise.partition`); the GPipe schedule from the schedule core (`build("gpipe", P, chunks)`),
its `checkpoint=` mode as RECOMPUTE actions (`recompute_microbatches`), validated and lowered; a
`Stage` per partition and an `Executor` per device, run by the worker threads of a `LocalWorld`
(one per device) whose `LocalTransport` moves activations and gradients between devices. Each call
is a `ModuleCall` (`stagewise.runtime.module_call`: the forward part of the program at the call,
the rest inside `loss.backward()`). Recomputation replays random numbers from a seed per
(partition, micro-batch) and call (`stagewise.runtime.rng`); `DeferredBatchNorm` is in
`stagewise.runtime.batchnorm`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stagewise.measure.layers import MEASURED, layer_facts
from stagewise.partition import PartitionError, PartitionTable, resolve_balance
from stagewise.runtime.batchnorm import DeferredBatchNorm
from stagewise.runtime.executor import Executor
from stagewise.runtime.grid import Grid
from stagewise.runtime.host_memory import keep_freed_host_memory
from stagewise.runtime.microbatch import batch_size, scatter
from stagewise.runtime.module_call import ModuleCall, forward_part, timeline
from stagewise.runtime.stage import Stage
from stagewise.runtime.streams import ActionClock
from stagewise.runtime.threads import LocalWorld
from stagewise.schedules import build, validate
from stagewise.schedules.actions import RECOMPUTE
from stagewise.schedules.recompute import CHECKPOINT_MODES, checkpointed, recompute_microbatches
from stagewise.schedules.timeline import Event, Timeline
from stagewise.tree import map_tensors, tensors_of

DeviceSpec = int | str | torch.device


@dataclass
class _Runtime:
    """What runs the calls: the worker threads (a rank per partition) and each one's executor."""

    world: LocalWorld
    executors: dict[int, Executor]
    cuts: dict[int, int]  # rank -> where its program's forward part ends


class GPipe(nn.Module):
    """Run an `nn.Sequential` (or a list of layers) as a GPipe pipeline over several devices of this process.

    Args:
        module: the layers, in order; each takes the previous one's output (a tensor, or a tuple, list,
            dict or namedtuple of tensors; other values ride along).
        balance: layers per partition, such as [4, 3, 3, 4]; or a method of `stagewise.partition`:
            "uniform", "parameters", "type:REGEX" (balance the layers whose class name matches), "time"
            (measures every layer on `sample`); with a method there is one partition per device.
        devices: one per partition: CUDA indices, "cuda:1", "cpu" or `torch.device`s (CPU entries run
            that partition on the CPU, handy for tests). Default: the visible GPUs.
        chunks: micro-batches per call (m); a batch of B samples gives micro-batches of B//m or B//m + 1.
        checkpoint: "always", "except_last" (every micro-batch but the last recomputes its forward in the
            backward, keeping only its input meanwhile) or "never"; only in training mode.
        deferred_batch_norm: replace every BatchNorm by a `DeferredBatchNorm`, whose running statistics
            follow the whole mini-batch rather than each micro-batch.
        sample: a batch of inputs, for balance="time".
        show_partition: print the partition table at construction (as `Pipeline` does).
        timeout: seconds a worker waits for another device's activation or gradient before every worker
            stops with an error.
        keep_host_memory: with a CPU device, set glibc's malloc (process-wide) to keep freed memory, as
            `Pipeline` does (`stagewise.runtime.host_memory`): calls then do not pay page faults for the
            activations they allocate again and again.

    Semantics: `model(x)` in training mode with gradients enabled returns the output on the last device,
    carrying a graph; `backward()` from it runs the pipelined backward and leaves every parameter's
    gradient equal to the plain module's. Under `torch.no_grad()` or in eval mode the call runs the
    forwards only and returns an output without a graph. One backward per call (no `retain_graph`), and
    gradients reach the parameters as `.grad` (through `backward()`), not through
    `torch.autograd.grad(out, params)`; the input gets its gradient either way when it requires one.
    A parameter used by several partitions is held by the first; the others use a per-call replica on
    their own device whose gradient is added to it after the backward. In training mode every
    (partition, micro-batch) forward draws its random numbers from its own seed, taken from torch's
    default generator once per call, so a run is reproducible under `torch.manual_seed`.
    """

    def __init__(self, module: nn.Sequential | Sequence[nn.Module], balance: Sequence[int] | str,
                 devices: Sequence[DeviceSpec] | None = None, chunks: int = 1, checkpoint: str = "except_last",
                 deferred_batch_norm: bool = False, sample: Any = None, *, show_partition: bool = True,
                 timeout: float = 300.0, keep_host_memory: bool = True):
        super().__init__()
        names, layers = _named_layers(module)
        if not isinstance(chunks, int) or isinstance(chunks, bool) or chunks < 1:
            raise ValueError(f"chunks must be an integer >= 1, got {chunks!r}")
        if checkpoint not in CHECKPOINT_MODES:
            raise ValueError(f"checkpoint must be one of {', '.join(map(repr, CHECKPOINT_MODES))}, got {checkpoint!r}")
        count = len(balance) if not isinstance(balance, str) else None
        found = _resolve_devices(devices, count)
        if isinstance(balance, str):
            count = len(found)
            if balance in MEASURED and sample is None:
                raise ValueError(f"balance={balance!r} measures every layer: pass sample=, a batch of inputs like "
                                 "the ones the model will be called with")
        else:
            _check_balance(list(balance), len(layers))
        assert count is not None
        if len(found) < count:
            raise ValueError(f"balance {list(balance)} has {count} partitions but only {len(found)} devices are given "
                             f"({', '.join(map(str, found))}): partition {len(found)} has no device; give one device "
                             f"per partition, such as devices=['cpu'] * {count}")
        self.devices = found[:count]
        self.chunks, self.checkpoint, self.timeout = chunks, checkpoint, timeout
        self.schedule = validate(recompute_microbatches(validate(build("gpipe", count, chunks)),
                                                        checkpointed(checkpoint, chunks)))
        self._cuts = {d: forward_part(self.schedule, d) for d in range(count)}
        self._profiles = layer_facts(layers, balance, (sample, None) if sample is not None else None, chunks,
                                     None, self.devices[0])
        self.balance = resolve_balance(balance, len(layers), count, layers=self._profiles, schedule=self.schedule)
        if deferred_batch_norm:
            layers = [DeferredBatchNorm.convert(layer, chunks) for layer in layers]
        for name, layer in zip(names, layers):
            self.add_module(name, layer)
        starts = [sum(self.balance[:j]) for j in range(count)]
        stages = [Stage(j, layers[a:a + n], a) for j, (a, n) in enumerate(zip(starts, self.balance))]
        replays = any(a.op == RECOMPUTE for prog in self.schedule.programs for a in prog)
        # Moved last partition first: a parameter shared by several partitions ends on its first user's device.
        for stage, device in reversed(list(zip(stages, self.devices))):
            stage.module.to(device)
            stage.replays = replays
        # Kept out of the registered children, so state_dict() has the plain module's keys.
        self.__dict__["partitions"] = nn.ModuleList([st.module for st in stages])
        self._stages = stages
        self._shared = _shared_parameters([st.module for st in stages])
        self._deferred = [m for m in self.modules() if isinstance(m, DeferredBatchNorm)]
        self._runtime: _Runtime | None = None
        self.keeps_host_memory = keep_host_memory and any(d.type == "cpu" for d in self.devices) and \
            keep_freed_host_memory()
        self._last_events: dict[int, list[Event]] | None = None  # per rank, the last call's (and its backward's)
        if show_partition:
            print(self.partition_table().format(), flush=True)

    partitions: nn.ModuleList

    def partition_table(self) -> PartitionTable:
        """Which layers every partition holds, with parameters (tied ones once), and measured times with
        balance="time"; the table `Pipeline` prints too."""
        return PartitionTable.of(self.balance, self._profiles, self.schedule)

    def forward(self, input: Any) -> Any:
        m = self.chunks
        size = batch_size(input)
        if size < m:
            raise ValueError(f"GPipe(chunks={m}) got a batch of {size} samples: it cannot be split into {m} "
                             f"micro-batches for partition 0; pass a batch of at least {m} samples or build GPipe "
                             f"with chunks <= {size}")
        graph = torch.is_grad_enabled() and self.training
        if self.training:
            for bn in self._deferred:
                bn.chunks = m
                bn.reset_tracking()
        seed = int(torch.randint(0, 1 << 62, (), dtype=torch.int64).item()) if self.training else None
        on_first = map_tensors(input, lambda t: t.to(self.devices[0]))
        leaves = [t for t in tensors_of(on_first) if t.requires_grad and t.is_floating_point()]
        rt = self._started()
        replicas = self._stand_ins(graph)
        call = ModuleCall(rt.world, rt.executors, rt.cuts, m, lambda: self._add_replica_grads(replicas))
        self._last_events = call.events
        try:
            return call.forward(scatter(on_first, m)[0], leaves, graph, seed)
        finally:
            if not graph:
                self._add_replica_grads(replicas)

    def last_trace(self) -> Timeline:
        """The measured timeline of the last call (and of its backward, once run): the executors' events of
        every F and B (a B starts where the recompute before it started, `extra["recompute_s"]`), with the
        worker thread that ran it in `extra["thread"]`."""
        if self._last_events is None or self._runtime is None:
            raise RuntimeError("the model has not been called yet")
        return timeline(self._last_events, self._runtime.executors, self.schedule)

    def train(self, mode: bool = True) -> GPipe:
        super().train(mode)
        for part in self.partitions:
            part.training = mode  # the containers too (their layers are this module's children)
        return self

    def to(self, *args: Any, **kwargs: Any) -> GPipe:
        """Only a dtype: GPipe keeps its partitions on their devices (move the module before wrapping it)."""
        device = torch._C._nn._parse_to(*args, **kwargs)[0]
        if device is not None:
            raise TypeError("GPipe places its partitions on their devices itself; it cannot be moved with .to(device) "
                            "(move or convert the module before wrapping it; .to(dtype) is allowed)")
        return super().to(*args, **kwargs)

    def cuda(self, device: Any = None) -> GPipe:
        raise TypeError("GPipe places its partitions on their devices itself (devices=); it cannot be moved with "
                        ".cuda()")

    def cpu(self) -> GPipe:
        raise TypeError("GPipe places its partitions on their devices itself (devices=); it cannot be moved with "
                        ".cpu()")

    def __getstate__(self) -> dict[str, Any]:
        """For copy.deepcopy and pickle: without the worker threads (a copy starts its own)."""
        state = dict(self.__dict__)
        state.update(_runtime=None, _last_events=None)
        return state

    def _started(self) -> _Runtime:
        """The worker threads (one per partition, started at the first call; the calling thread for a single
        one) and their executors; new ones after a failure, which leaves a world unusable."""
        rt = self._runtime
        if rt is not None and not rt.world.failed:
            return rt
        if rt is not None:
            rt.world.close()
        P = len(self.devices)
        world = LocalWorld(Grid(P), self.timeout, self.devices, name="stagewise-gpipe", keep_threads=True)
        world.placement = self.schedule.placement
        executors = {d: Executor(self.schedule, d, {d: self._stages[d]}, world.transport(d, P), None, rank=d,
                                 clock=ActionClock(dev), who=lambda s, dev=dev: f"partition {s} (device {dev})")
                     for d, dev in enumerate(self.devices)}
        self._runtime = _Runtime(world, executors, self._cuts)
        return self._runtime

    def _stand_ins(self, graph: bool) -> list[dict[str, torch.Tensor]]:
        """Per partition, this call's replicas of the parameters it shares with an earlier partition."""
        replicas = []
        for stage, shared, device in zip(self._stages, self._shared, self.devices):
            stage.stand_ins = {name: _replica(p, device, graph) for name, p in shared.items()}
            replicas.append(stage.stand_ins)
        return replicas

    def _add_replica_grads(self, replicas: list[dict[str, torch.Tensor]]) -> None:
        """A replica's gradient joins its parameter's, partition by partition (the same order every run)."""
        for stage, shared, mine in zip(self._stages, self._shared, replicas):
            for name, p in shared.items():
                g = mine[name].grad
                if g is not None:
                    g = g.to(p.device)
                    if p.grad is None:
                        p.grad = g
                    else:
                        p.grad.add_(g)
            if stage.stand_ins is mine:
                stage.stand_ins = {}


def _named_layers(module: nn.Sequential | Sequence[nn.Module]) -> tuple[list[str], list[nn.Module]]:
    """The layers with the names nn.Sequential gives them."""
    if isinstance(module, nn.Sequential):
        named = list(module.named_children())
        if len(named) != len(module):
            raise ValueError("the nn.Sequential holds one module under several names; GPipe needs every layer once")
        names, layers = [n for n, _ in named], [m for _, m in named]
    elif isinstance(module, nn.Module):
        raise TypeError(f"GPipe takes an nn.Sequential or a list of layers, not a {type(module).__name__}; wrap the "
                        "model's layers in an nn.Sequential")
    else:
        layers = list(module)
        names = [str(i) for i in range(len(layers))]
    for i, layer in enumerate(layers):
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer {i} is a {type(layer).__name__}, not an nn.Module")
    if not layers:
        raise ValueError("GPipe needs at least one layer")
    return names, layers


def _check_balance(balance: list[int], num_layers: int) -> None:
    """Raise a PartitionError naming the partition at fault unless `balance` cuts `num_layers` layers."""
    if not balance:
        raise PartitionError("balance is empty; give the number of layers of every partition, such as [2, 2]")
    for j, b in enumerate(balance):
        if not isinstance(b, int) or isinstance(b, bool) or b < 1:
            raise PartitionError(f"balance {balance}: partition {j} has {b!r} layers; every partition needs an "
                                 "integer number of layers >= 1")
    total = sum(balance)
    if total < num_layers:
        raise PartitionError(f"balance {balance} covers {total} layers but the module has {num_layers}: layers "
                             f"{total} to {num_layers - 1} are in no partition; give them to a partition (the last "
                             f"one would hold {balance[-1] + num_layers - total}) so the counts sum to {num_layers}")
    if total > num_layers:
        end = 0
        for j, b in enumerate(balance):
            end += b
            if end > num_layers:
                raise PartitionError(f"balance {balance} covers {total} layers but the module has {num_layers}: "
                                     f"partition {j} would hold layers up to {end - 1}; make the counts sum to "
                                     f"{num_layers}")


def _resolve_devices(devices: Sequence[DeviceSpec] | None, count: int | None) -> list[torch.device]:
    """torch devices for the partitions, each checked to exist."""
    if devices is None:
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if visible == 0:
            want = f"devices=['cpu'] * {count}" if count else "devices=['cpu', 'cpu', ...]"
            raise ValueError(f"no devices given and no GPU is visible; pass {want} to run the partitions on the CPU")
        devices = list(range(visible))
    out = []
    for j, d in enumerate(devices):
        try:
            dev = torch.device("cuda", d) if isinstance(d, int) and not isinstance(d, bool) else torch.device(d)
        except (RuntimeError, TypeError) as err:
            raise ValueError(f"devices[{j}] = {d!r} is not a device: {err}") from None
        if count is not None and j >= count:
            out.append(dev)
            continue
        out.append(_check_device(dev, j))
    return out


def _check_device(dev: torch.device, partition: int) -> torch.device:
    if dev.type == "cpu":
        return torch.device("cpu")
    if dev.type == "cuda":
        visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = dev.index if dev.index is not None else (torch.cuda.current_device() if visible else 0)
        if index >= visible:
            seen = ("torch sees no GPU" if visible == 0
                    else f"only {visible} GPUs are visible (cuda:0 to cuda:{visible - 1})")
            raise ValueError(f"partition {partition} is placed on cuda:{index}, but {seen}; pass devices= that exist "
                             "(entries such as 'cpu' run a partition on the CPU)")
        return torch.device("cuda", index)
    try:
        torch.empty(0, device=dev)
    except Exception as err:
        raise ValueError(f"partition {partition} is placed on {dev}, which is not available here ({err}); pass "
                         "devices= that exist") from None
    return dev


def _replica(p: nn.Parameter, device: torch.device, graph: bool) -> torch.Tensor:
    """A stand-in for `p` on `device` for one call: a leaf of its own, whose gradient is added to p's after
    the backward (no copy when p already lives there)."""
    return p.detach().to(device).requires_grad_(p.requires_grad and graph)


def _shared_parameters(parts: list[nn.Sequential]) -> list[dict[str, nn.Parameter]]:
    """Per partition, its parameters (by name in the partition) that an earlier partition also uses."""
    first: dict[int, int] = {}
    shared: list[dict[str, nn.Parameter]] = [{} for _ in parts]
    for j, part in enumerate(parts):
        for name, p in part.named_parameters(remove_duplicate=False):
            if first.setdefault(id(p), j) != j:
                shared[j][name] = p
    return shared


__all__ = ["DeferredBatchNorm", "GPipe"]
