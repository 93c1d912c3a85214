"""Sharded data parallelism: each stage's parameters, gradients and optimizer state split over its D replicas.

`Pipeline(..., data_parallel=D, shard=MODE)`; what a rank holds of its stages between steps, per parameter
(fp32 with Adam: 4 bytes of weight, 4 of gradient, 8 of optimizer state):

- "none": everything whole on every replica (16 bytes); gradients all-reduced (`ReduceGradients`).
- "optimizer" (ZeRO-1): weights and gradients whole, optimizer state split (4 + 4 + 8/D): torch's
  `ZeroRedundancyOptimizer` over the stage's data-parallel group steps each parameter on one replica and
  broadcasts it. Gradients are all-reduced as with "none".
- "gradients" (ZeRO-2): weights whole, gradients and optimizer state split (4 + 12/D, plus the 4/D shard the
  optimizer steps): FSDP2 keeps the whole copy between steps; after the optimizer step RESHARD + UNSHARD
  gather the updated shards.
- "full" (ZeRO-3): everything split (16/D): FSDP2 gathers a stage's weights (UNSHARD, prefetched one action
  ahead) before its first forward of the step and releases them (RESHARD) after its last backward.

"gradients" and "full" run on torch's own engine, `torch.distributed.fsdp.fully_shard` (FSDP2), over a
`DeviceMesh` with the axes ("pipeline", "data") of the run's grid; each stage module is sharded over its data
group (with several stages per device each on its own; stages of one rank that share a parameter object,
GPT-2's tie when the embedding and the head land on one device, form one unit). The schedule says when:
the lowering pass `stagewise.schedules.sharding.with_sharding` places UNSHARD/RESHARD, `with_reductions`
places REDUCE after each stage's last backward piece, where FSDP2 reduce-scatters the gradients accumulated
over every micro-batch (once per step, not per micro-batch). FSDP2's hooks never fire here (each unit's
root is a holder module that is never called): the executor's actions drive it, as torch's own pipelining
does (`perform_reduce_grad`). The reduction sums (`set_gradient_divide_factor(1)`): each replica's losses are
already weighted by their share of the global batch (or divided by the global count, `MeanOverCount`), so the
data-parallel mean stays stagewise's own, sample- or token-weighted.

At the step: tied parameters' gradient shards are summed across their stages after the reduce-scatter (the
copies' shards cover the same elements on every replica); the global norm is the norm over every shard
(`clip_grad_norm_` of the unsplit model); MeanOverCount divides the sharded gradients. Accumulating calls
(`train_step(step=False)`) reduce-scatter their gradients too (at RESHARD, where no REDUCE ran), adding to the
sharded gradient, so nothing whole is held between calls. `precision="bf16"` gathers bf16 weights and
reduce-scatters fp32 gradients (FSDP2's `MixedPrecisionPolicy`; micro-batch gradients are accumulated in
fp32). Threads (`local_devices=`) have no process group, which FSDP2 and ZeroRedundancyOptimizer need:
sharding is refused there.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.precision import Precision
from stagewise.runtime.step import (
    ClipGradNorm,
    LossScaling,
    OptimizerStep,
    ReduceGradients,
    Step,
    StepContext,
    StepPart,
    SyncTiedGrads,
    training_step,
)
from stagewise.runtime.ties import Ties
from stagewise.schedules.actions import REDUCE, RESHARD, UNSHARD, Action

if TYPE_CHECKING:
    from stagewise.runtime.stage_set import StageSet
    from stagewise.runtime.world import World

MODES = ("none", "optimizer", "gradients", "full")
FSDP_MODES = ("gradients", "full")  # parameters and gradients sharded by FSDP2
_MESHES: dict[tuple[str, int, int], Any] = {}  # (device type, P, D) -> the DeviceMesh ("pipeline", "data")


def check_shard(shard: Any, data_parallel: int, local_devices: int | None, precision: str = "fp32",
                compile: bool | str = False) -> None:
    """Refuse a `shard` option that cannot run, before anything is built."""
    if shard not in MODES:
        raise ValueError(f"shard must be one of {', '.join(map(repr, MODES))} (what each data-parallel replica "
                         f"keeps whole: see stagewise.runtime.sharding), got {shard!r}")
    if shard == "none":
        return
    if isinstance(data_parallel, int) and not isinstance(data_parallel, bool) and data_parallel < 2:
        raise ValueError(f"shard={shard!r} splits each stage over its data-parallel replicas, but data_parallel="
                         f"{data_parallel} has none to split over: give data_parallel=D >= 2 (P x D processes) or "
                         "leave shard='none'")
    if local_devices is not None:
        what = "ZeroRedundancyOptimizer" if shard == "optimizer" else "FSDP2 (torch.distributed.fsdp.fully_shard)"
        raise ValueError(f"shard={shard!r} needs one process per rank: {what} runs over a torch.distributed process "
                         f"group, which the threads of one process (local_devices={local_devices}) do not have. "
                         "Launch P x D processes instead, without local_devices: `stagewise run -n P*D script.py` "
                         "or `torchrun --nproc_per_node=P*D script.py`")
    if shard in FSDP_MODES and precision == "fp16":
        raise ValueError(f"shard={shard!r} gathers weights in bf16 with precision='bf16' (FSDP2's "
                         "MixedPrecisionPolicy); fp16 loss scaling is not supported with sharded gradients: use "
                         "precision='bf16', or shard='optimizer'")
    if shard in FSDP_MODES and compile:
        raise ValueError(f"shard={shard!r} swaps a stage's parameters between shards and whole copies, which a "
                         "compiled stage would not see: use compile=False with it")


@dataclass(eq=False)
class Unit:
    """Stages of one rank sharded together (one FSDP2 root): one stage, or several sharing a parameter."""

    rank: int
    stages: tuple[int, ...]
    module: Any  # the FSDPModule holding the stage modules (never called)
    state: Any  # its FSDPState
    handle: Any = None  # an all-gather in flight (UnshardHandle), waited for before the first forward
    whole: bool = False
    stale: bool = False  # a whole copy older than the shards (after an optimizer step)
    unreduced: set[int] = field(default_factory=set)  # stages whose REDUCE has not come in this window
    unreleased: set[int] = field(default_factory=set)  # likewise RESHARD
    named: set[int] = field(default_factory=set)  # ids of the whole parameters already given names
    issued: float = 0.0  # when the all-gather in flight was started (host seconds, time.perf_counter)
    spans: list[tuple[float, float, float]] = field(default_factory=list)  # (issued, done, waited) per all-gather
    gather_s: float = 0.0  # seconds waiting for the all-gather, since `take_times`
    reduce_s: float = 0.0  # seconds in the reduce-scatter

    @property
    def groups(self) -> list[Any]:
        return list(self.state._fsdp_param_groups)

    def params(self) -> Iterable[Any]:
        return (fp for g in self.groups for fp in g.fsdp_params)

    def pending_grads(self) -> bool:
        """Whether whole (unsharded) gradients wait to be reduce-scattered."""
        return any(hasattr(fp, "_unsharded_param") and (fp._unsharded_param.grad is not None
                                                        or fp.unsharded_accumulated_grad is not None)
                   for fp in self.params())


class Sharding:
    """The sharding of every local rank's stages (`mode`, see the module notes), its step parts and optimizers.

    Built after the StageSet: the ties are made equal first (on whole weights), then each stage module is sharded
    and `model.owned` / `model.tied` and the ties name the sharded parameters (the ones the optimizer steps)."""

    def __init__(self, mode: str, world: World, model: StageSet, precision: Precision | None = None):
        self.mode, self.world, self.model = mode, world, model
        self.ties = Ties(world, model.tied)
        self.units: dict[int, list[Unit]] = {r: [] for r in world.local_ranks}
        self.unit_of: dict[tuple[int, int], Unit] = {}  # (rank, stage) -> its unit
        self.mesh = None
        self.held: dict[int, torch.optim.Optimizer] = {}  # the optimizers made by `optimizers`
        self.last_spans: dict[int, list[tuple[tuple[int, ...], float, float, float]]] = {}  # see `take_times`
        model.sharding = self  # type: ignore[attr-defined]  # what a checkpoint of the model asks
        if mode != "none" and model.schedule.asynchronous:
            raise ValueError(f"shard={mode!r} needs a synchronous schedule; {model.schedule.name!r} keeps several "
                             "weight versions per stage")
        if mode in FSDP_MODES:
            self._shard(precision or Precision())

    # ---- set-up ----------------------------------------------------------------------------------------------

    def _shard(self, precision: Precision) -> None:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        grid = self.world.grid
        device = self.world.device(self.world.local_ranks[0])
        key = (device.type, grid.pipeline, grid.data)
        if key not in _MESHES:  # its process groups are made once per process (every rank, in the same order)
            _MESHES[key] = init_device_mesh(device.type, key[1:], mesh_dim_names=("pipeline", "data"))
        self.mesh = _MESHES[key]
        low = precision.name == "bf16"
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if low else None,
                                      reduce_dtype=torch.float32 if low else None)
        remap: dict[int, nn.Parameter] = {}  # id(whole parameter) -> its sharded parameter
        replaced: list[nn.Parameter] = []  # kept alive until the ids are remapped (an id is reused once freed)
        for rank in self.world.local_ranks:
            stages = self.model.of_rank(rank)
            for members in _units(stages):
                old = {(s, n): p for s in members for n, p in stages[s].module.named_parameters(remove_duplicate=False)}
                holder = _Holder([stages[s].module for s in members])
                if not old:
                    continue  # nothing to shard
                fully_shard(holder, mesh=self.mesh["data"], reshard_after_forward=False, mp_policy=policy)
                holder.set_gradient_divide_factor(1.0)  # a sum: the replicas' losses are weighted already
                holder.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM; SUM with no division
                holder.set_reshard_after_backward(False)  # RESHARD releases, not the reduction
                state = fully_shard.state(holder)
                state._lazy_init()  # what FSDP2's root pre-forward would do: this root is never called
                unit = Unit(rank, tuple(members), holder, state)
                self.units[rank].append(unit)
                for s in members:
                    self.unit_of[(rank, s)] = unit
                    stages[s].before_forward.append(lambda unit=unit: self._wait(unit))  # F waits for the gather
                for (s, n), p in old.items():
                    remap[id(p)] = stages[s].module.get_parameter(n)
                    replaced.append(p)
        names = next(iter(self.model.all())).names if self.model.all() else {}
        for i, p in remap.items():
            if i in names:
                names.setdefault(id(p), names[i])  # a shared parameter keeps its first (unsplit) name
        for rank in self.world.local_ranks:
            self.model.owned[rank] = _unique(remap.get(id(p), p) for p in self.model.owned[rank])
            self.model.tied[rank] = {k: remap.get(id(p), p) for k, p in self.model.tied[rank].items()}
            self.ties.by_rank[rank] = [(remap.get(id(p), p), g, src) for p, g, src in self.ties.by_rank[rank]]
        self.ties.not_counted = {id(remap[i]) if i in remap else i for i in self.ties.not_counted}
        if self.mode == "gradients":  # whole weights between steps, from the start
            for units in self.units.values():
                for u in units:
                    self._unshard(u, wait=True)

    # ---- the actions -----------------------------------------------------------------------------------------

    def act(self, rank: int, action: Action) -> None:
        """Run an UNSHARD, RESHARD or REDUCE action of `rank` (the executor hands them to the step's parts)."""
        unit = self.unit_of.get((rank, action.stage))
        if unit is None:
            return  # a stage without parameters
        if not unit.unreduced and not unit.unreleased:  # a new window: every member reduces and releases once
            unit.unreduced, unit.unreleased = set(unit.stages), set(unit.stages)
        if action.op == UNSHARD:
            self._unshard(unit, wait=self.mode == "gradients")
        elif action.op == REDUCE:
            unit.unreduced.discard(action.stage)
            if not unit.unreduced:  # the unit's last member: one reduce-scatter for all of them
                self._reduce(unit)
        elif action.op == RESHARD:
            unit.unreleased.discard(action.stage)
            if unit.unreleased:
                return  # another member still works on the shared parameters
            unit.unreduced = set()
            self._wait(unit)
            if unit.pending_grads():  # an accumulating call (no REDUCE ran): nothing whole stays
                self._reduce(unit)
            if self.mode == "gradients" and not unit.stale:
                return  # the whole copy is current: keep it (its UNSHARD then finds it whole)
            unit.module.reshard()
            unit.whole = False

    def release(self, rank: int) -> None:
        """Every unit of `rank` sharded (its whole copies dropped): the module holds the shards the optimizer steps."""
        for unit in self.units.get(rank, []):
            if unit.handle is not None:
                self._wait(unit)
            if unit.whole:
                unit.module.reshard()
                unit.whole = False

    def regather(self, rank: int) -> None:
        """Whole copies again where the mode keeps them between steps ("gradients"), from the current shards."""
        if self.mode == "gradients":
            for unit in self.units.get(rank, []):
                self._unshard(unit, wait=True)

    def _unshard(self, unit: Unit, wait: bool) -> None:
        if unit.whole or unit.handle is not None:
            return
        unit.issued = time.perf_counter()
        unit.handle = unit.module.unshard(async_op=True)  # the all-gather runs while the device computes
        if wait:
            self._wait(unit)

    def _wait(self, unit: Unit) -> None:
        if unit.handle is None:
            if not unit.whole:
                raise PipelineError(f"stage(s) {', '.join(map(str, unit.stages))} computed while sharded: the "
                                    "schedule has no UNSHARD before this work (see stagewise.schedules.sharding)")
            return
        t0 = time.perf_counter()
        unit.handle.wait()
        done = time.perf_counter()
        unit.gather_s += done - t0
        unit.spans.append((unit.issued, done, done - t0))
        unit.handle, unit.whole = None, True
        self._adopt(unit)
        unit.stale = False

    def _adopt(self, unit: Unit) -> None:
        """Name the whole parameters as their shards (shared ones keep their unsplit name), and with a
        low-precision gather accumulate their micro-batch gradients in the reduce dtype (fp32)."""
        names = next(iter(self.model.all())).names
        for fp in unit.params():
            whole = fp._unsharded_param
            if id(whole) in unit.named:
                continue
            unit.named.add(id(whole))
            if id(fp.sharded_param) in names:
                names[id(whole)] = names[id(fp.sharded_param)]
            if fp.reduce_dtype is not None and fp.param_dtype is not None and fp.reduce_dtype != fp.param_dtype:
                whole.register_post_accumulate_grad_hook(lambda _p, fp=fp: _accumulate(fp))

    def _reduce(self, unit: Unit) -> None:
        t0 = time.perf_counter()
        for g in unit.groups:
            g.reduce_grads = True
            g.post_backward()  # FSDP2's own reduce-scatter of the accumulated whole gradients
        unit.state._root_post_backward_final_callback()  # waits for it and resets FSDP2's per-step state
        unit.reduce_s += time.perf_counter() - t0

    # ---- what the Pipeline asks ------------------------------------------------------------------------------

    def optimizers(self, factory: Callable[[list[nn.Parameter]], torch.optim.Optimizer] | None
                   ) -> dict[int, torch.optim.Optimizer]:
        """Each rank's optimizer over the parameters it owns (shards with FSDP2); with "optimizer", a
        ZeroRedundancyOptimizer of the same class and options over the rank's data-parallel group."""
        if factory is None:
            return {}
        out = {r: factory(ps) for r, ps in self.model.owned.items() if ps}
        if self.mode != "optimizer":
            self.held = out
            return out
        from torch.distributed.optim import ZeroRedundancyOptimizer

        zero = {}
        for r, opt in out.items():  # the same class, options and parameter groups (AdamW's decay groups, ...)
            groups = [{**g, "params": list(g["params"])} for g in opt.param_groups]
            data = self.world.grid_groups().data[self.world.grid.coords(r)[0]].handle  # None: the whole world
            takes = inspect.signature(type(opt).__init__).parameters  # defaults may hold more than it takes
            options = {k: v for k, v in opt.defaults.items() if k in takes}
            zero[r] = ZeroRedundancyOptimizer(groups, type(opt), process_group=data, **options)
        self.held = zero
        return zero

    def training_step(self, **options: Any) -> Step:
        """The step's parts (`stagewise.runtime.step.training_step` with `options`), sharded where the mode says."""
        return self.step(training_step(self.world, self.model, self.ties, asynchronous=self.model.schedule.asynchronous,
                                       **options))

    def step(self, step: Step) -> Step:
        """`step` with the sharded parts: the reduce-scatter in place of the all-reduce, tied shards summed, the
        norm over every shard (always measured: the non-finite guard reads it), and, for "gradients", the whole
        copies marked stale after an optimizer step."""
        if self.mode not in FSDP_MODES:
            return step
        parts: list[StepPart] = []
        clip = next((p for p in step.parts if isinstance(p, ClipGradNorm)), None)
        for p in step.parts:
            if isinstance(p, ReduceGradients):
                parts.append(ShardedReduction(self))
            elif isinstance(p, SyncTiedGrads):
                parts.append(SumTiedShards(self))
            elif isinstance(p, LossScaling):
                raise ValueError("fp16 loss scaling is not supported with sharded gradients; use precision='bf16'")
            elif isinstance(p, ClipGradNorm):
                continue
            elif isinstance(p, OptimizerStep):
                parts += [self.clipping(clip.max_norm if clip else None), p, MarkStale(self)]
            else:
                parts.append(p)
        return Step(parts)

    def clipping(self, max_norm: float | None) -> ClipGradNorm:
        """The global gradient norm over every shard of every stage (tied parameters once): the norm
        `clip_grad_norm_` gives the unsplit model, summed over every rank since each holds its own shards."""
        return ClipGradNorm(self.world, self.model, self.ties, max_norm, held=_local,
                            across=lambda rank: self.world.grid_groups().everyone)

    def take_times(self, rank: int) -> dict[str, float]:
        """Seconds of this rank's all-gathers (from start to done, and the part it waited for) and reduce-scatters
        since the last call; their spans stay in `last_spans[rank]`: (stages, start, done, waited), host seconds."""
        units = self.units.get(rank, [])
        self.last_spans[rank] = [(u.stages, *span) for u in units for span in u.spans]
        out = {"all_gather_s": sum(done - start for _, start, done, _ in self.last_spans[rank]),
               "all_gather_wait_s": sum(u.gather_s for u in units), "reduce_scatter_s": sum(u.reduce_s for u in units)}
        for u in units:
            u.gather_s = u.reduce_s = 0.0
            u.spans = []
        return out

    def held_bytes(self) -> dict[int, dict[str, int]]:
        """Per local rank: bytes of parameters, gradients and optimizer state held now (every storage once,
        measured from the tensors themselves: FSDP2's shards, padded, and any whole copy still allocated)."""
        out = {}
        for rank in self.world.local_ranks:
            seen: set[int] = set()
            params, grads = [], []
            for st in self.model.of_rank(rank).values():
                for p in st.module.parameters():
                    params.append(p)
                    grads.append(p.grad)
            for p in self.model.owned[rank]:
                params.append(p)
                grads.append(p.grad)
            for u in self.units.get(rank, []):
                for fp in u.params():
                    params.append(fp._sharded_param_data)
                    if hasattr(fp, "_unsharded_param"):
                        params.append(fp._unsharded_param)
                        grads += [fp._unsharded_param.grad, fp.unsharded_accumulated_grad]
            opt = self.held.get(rank)
            states = [] if opt is None else [v for s in _optimizer_state(opt).values() for v in s.values()]
            out[rank] = {"parameters": _bytes(params, seen), "gradients": _bytes(grads, seen),
                         "optimizer": _bytes(states, seen)}
            out[rank]["total"] = sum(out[rank].values())
        return out


class ShardedReduction(StepPart):
    """FSDP2's reduce-scatter at REDUCE, its all-gather at UNSHARD and release at RESHARD (see the module)."""

    contract = ("every replica of a stage holds its shard of the sum of its replicas' gradients (the full-batch "
                "gradient), and no whole gradient is left")

    def __init__(self, sharding: Sharding):
        self.sharding = sharding

    def reduce(self, rank: int, action: Action) -> None:
        self.sharding.act(rank, action)

    def __call__(self, ctx: StepContext) -> None:
        for unit in self.sharding.units.get(ctx.rank, []):
            if unit.pending_grads():  # a REDUCE the schedule did not place (none should be missing)
                self.sharding._reduce(unit)
        ctx.report.update(self.sharding.take_times(ctx.rank))


class SumTiedShards(StepPart):
    """Sums the gradient shards of parameters tied across ranks (after the reduce-scatter): replica r of every
    holder holds the same elements (shard r of the same shape), so the sum is per element."""

    contract = "every copy of a tied parameter holds (its shard of) the sum of all copies' gradients"

    def __init__(self, sharding: Sharding):
        self.world, self.ties = sharding.world, sharding.ties

    def __call__(self, ctx: StepContext) -> None:
        for p, group, _ in self.ties.by_rank.get(ctx.rank, ()):
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            self.world.all_reduce(ctx.rank, [_local(p.grad)], group)


class MarkStale(StepPart):
    """After an optimizer step the shards are new: a whole copy kept between steps ("gradients") is stale."""

    contract = "a rank whose shards were stepped gathers its whole weights again before its next forward"

    def __init__(self, sharding: Sharding):
        self.sharding = sharding

    def __call__(self, ctx: StepContext) -> None:
        if not ctx.skip and ctx.optimizer is not None:
            for unit in self.sharding.units.get(ctx.rank, []):
                unit.stale = True


class _Holder(nn.Module):
    """The root of one unit's FSDP2 state: holds the unit's stage modules, is never called (the stages run
    their own modules), so FSDP2's forward and backward hooks never fire and the schedule's actions drive it."""

    def __init__(self, modules: list[nn.Module]):
        super().__init__()
        self.stages = nn.ModuleList(modules)

    def forward(self, *args: Any) -> Any:
        raise RuntimeError("a sharding unit's holder is never called: each stage runs its own module")


def _units(stages: dict[int, Any]) -> list[list[int]]:
    """The stages of one rank grouped by shared parameter objects (connected components), in stage order."""
    owner: dict[int, int] = {}
    parent = {s: s for s in stages}

    def find(s: int) -> int:
        while parent[s] != s:
            s = parent[s]
        return s

    for s in sorted(stages):
        for p in stages[s].module.parameters():
            if id(p) in owner:
                parent[find(s)] = find(owner[id(p)])
            else:
                owner[id(p)] = s
    groups: dict[int, list[int]] = {}
    for s in sorted(stages):
        groups.setdefault(find(s), []).append(s)
    return sorted(groups.values())


def _accumulate(fp: Any) -> None:
    """FSDP2's own accumulation of a low-precision micro-batch gradient into its reduce-dtype buffer."""
    if fp.unsharded_accumulated_grad is None:
        fp.to_accumulated_grad_if_needed()
    else:
        fp.accumulate_unsharded_grad_if_needed()


def _local(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (the same storage: in-place work on it changes the DTensor), or `t`."""
    return t.to_local() if hasattr(t, "to_local") else t


def _unique(params: Iterable[nn.Parameter]) -> list[nn.Parameter]:
    seen: set[int] = set()
    return [p for p in params if not (id(p) in seen or seen.add(id(p)))]


def _optimizer_state(opt: torch.optim.Optimizer) -> dict[Any, dict[str, Any]]:
    inner = getattr(opt, "optim", None)  # ZeroRedundancyOptimizer: the local optimizer holds this rank's state
    return dict((inner if inner is not None else opt).state)


def _bytes(tensors: Iterable[Any], seen: set[int]) -> int:
    """Bytes of the storages behind `tensors` not counted yet (a DTensor: its local shard's storage)."""
    total = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor):
            continue
        storage = _local(t).untyped_storage()
        key = storage.data_ptr()
        if storage.nbytes() == 0 or key in seen:
            continue
        seen.add(key)
        total += storage.nbytes()
    return total


__all__ = ["MODES", "Sharding", "check_shard"]
