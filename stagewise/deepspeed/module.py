"""DeepSpeed's `PipelineModule`, `LayerSpec` and `TiedLayerSpec`: the model as a list of layers, cut into stages.

`PipelineModule(layers, num_stages=P, ...)` partitions the layers as DeepSpeed does and builds, on
the process group the script initialised, only the layers of this rank's stage: after construction
`model.parameters()` are this rank's, so `Adam(model.parameters())` is built over them, as with
DeepSpeed. `stagewise.deepspeed.initialize` hands those very modules (and the user's optimizer) to a
`stagewise.Pipeline`. Ranks form DeepSpeed's pipe x data grid: rank = stage x D + replica.

Layers may be modules (built already on every rank, as in the seed's script), `LayerSpec`s (built
only by the rank that holds them; `seed_layers=True` seeds layer i with `base_seed + i` first) or
`TiedLayerSpec`s: every spec with one key shares one module on a rank, and its `tied_weight_attr`
parameters across ranks, whose gradients are summed before the step (marked with `stagewise_tie`,
see `stagewise.runtime.ties`). Any other callable is applied as a function.
"""

from __future__ import annotations

import atexit
import os
import random
from collections import namedtuple
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from stagewise.partition import PartitionError
from stagewise.partition.methods import by_parameters, by_type
from stagewise.partition.solver import check_balance, uniform
from stagewise.runtime import launch
from stagewise.runtime.ties import TIE_ATTR


class LayerSpec:
    """A layer's class and arguments; `build()` makes it. Only the rank holding the layer builds it."""

    def __init__(self, typename: type[nn.Module], *module_args: Any, **module_kwargs: Any):
        if not (isinstance(typename, type) and issubclass(typename, nn.Module)):
            raise RuntimeError("LayerSpec only supports torch.nn.Module types")
        self.typename, self.module_args, self.module_kwargs = typename, module_args, module_kwargs

    def build(self, log: bool = False) -> nn.Module:
        return self.typename(*self.module_args, **self.module_kwargs)

    def __repr__(self) -> str:
        args = [repr(a) for a in self.module_args] + [f"{k}={v!r}" for k, v in self.module_kwargs.items()]
        return f"{type(self).__name__}({self.typename.__name__}{', ' if args else ''}{', '.join(args)})"


class TiedLayerSpec(LayerSpec):
    """A layer whose module is shared by every spec with the same `key`: built once per rank, its
    `tied_weight_attr` parameters (dotted names allowed) kept equal across ranks. With `forward_fn`, this
    position computes `forward_fn(module, x)` instead of `module(x)` (e.g. an embedding reused as the head)."""

    def __init__(self, key: str, typename: type[nn.Module], *module_args: Any,
                 forward_fn: Callable[[nn.Module, Any], Any] | None = None,
                 tied_weight_attr: str | Sequence[str] = ("weight",), **module_kwargs: Any):
        super().__init__(typename, *module_args, **module_kwargs)
        self.key, self.forward_fn = key, forward_fn
        self.tied_weight_attr = [tied_weight_attr] if isinstance(tied_weight_attr, str) else list(tied_weight_attr)


class PipeDataParallelTopology:
    """DeepSpeed's pipe x data grid: `num_pp` stages, `num_dp` replicas, rank = stage x num_dp + replica."""

    ProcessCoord = namedtuple("ProcessCoord", "pipe data")

    def __init__(self, num_pp: int, num_dp: int):
        if num_pp < 1 or num_dp < 1:
            raise ValueError(f"num_pp and num_dp must be >= 1, got {num_pp}, {num_dp}")
        self.num_pp, self.num_dp = num_pp, num_dp

    def get_dim(self, axis: str) -> int:
        return {"pipe": self.num_pp, "data": self.num_dp}.get(axis, 1)

    def world_size(self) -> int:
        return self.num_pp * self.num_dp

    def get_coord(self, rank: int) -> Any:
        return self.ProcessCoord(*divmod(rank, self.num_dp))

    def get_rank(self, pipe: int, data: int) -> int:
        return pipe * self.num_dp + data


class FunctionLayer(nn.Module):
    """A function given as a layer (DeepSpeed applies such callables as they are)."""

    def __init__(self, fn: Callable[[Any], Any]):
        super().__init__()
        self.fn = fn

    def forward(self, x: Any) -> Any:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


class TiedForward(nn.Module):
    """A tied module used through its spec's `forward_fn`."""

    def __init__(self, module: nn.Module, forward_fn: Callable[[nn.Module, Any], Any]):
        super().__init__()
        self.module, self.forward_fn = module, forward_fn

    def forward(self, x: Any) -> Any:
        return self.forward_fn(self.module, x)


class PipelineModule(nn.Module):
    """DeepSpeed's PipelineModule: this rank's stage of `layers`, partitioned over `num_stages` stages.

    Args (DeepSpeed's): layers (modules, LayerSpecs, TiedLayerSpecs, functions; an nn.Sequential is taken
    apart), num_stages or topology (a `PipeDataParallelTopology`), loss_fn(outputs, labels), seed_layers and
    base_seed (layer i is built after seeding `base_seed + i`; `seed_fn(seed)` instead of the default
    seeding), partition_method ("parameters", "uniform", "type:REGEX"; stagewise also takes a list of layer
    counts), activation_checkpoint_interval (N layers per recomputed group; 0: none). Data parallelism is the
    world size / num_stages.
    """

    def __init__(self, layers: Iterable[Any], num_stages: int | None = None,
                 topology: PipeDataParallelTopology | None = None, loss_fn: Callable[[Any, Any], Any] | None = None,
                 seed_layers: bool = False, seed_fn: Callable[[int], None] | None = None, base_seed: int = 1234,
                 partition_method: str | Sequence[int] = "parameters", activation_checkpoint_interval: int = 0,
                 activation_checkpoint_func: Callable[..., Any] | None = None,
                 checkpointable_layers: Sequence[str] | None = None, dynamic_shape: bool = False):
        super().__init__()
        if num_stages is None and topology is None:
            raise RuntimeError("PipelineModule needs num_stages or topology")
        if activation_checkpoint_func is not None:
            raise ValueError("activation_checkpoint_func is not supported: stagewise recomputes through its schedule's "
                             "RECOMPUTE actions; give activation_checkpoint_interval alone")
        if checkpointable_layers is not None:
            raise ValueError("checkpointable_layers is not supported: with activation_checkpoint_interval every group "
                             "of that many layers is recomputed")
        if isinstance(activation_checkpoint_interval, bool) or not isinstance(activation_checkpoint_interval, int) \
                or activation_checkpoint_interval < 0:
            raise ValueError(f"activation_checkpoint_interval must be an integer >= 0, got "
                             f"{activation_checkpoint_interval!r}")
        self.global_rank, self.world_size = _join_group()
        if topology is not None:
            pp, dp = topology.get_dim("pipe"), topology.get_dim("data")
            if num_stages is not None and num_stages != pp:
                raise ValueError(f"num_stages={num_stages} disagrees with the topology's {pp} pipeline stages")
            if pp * dp != self.world_size:
                raise ValueError(f"the topology has {pp} x {dp} ranks but the world has {self.world_size} processes")
        else:
            assert num_stages is not None
            if isinstance(num_stages, bool) or not isinstance(num_stages, int) or num_stages < 1:
                raise ValueError(f"num_stages must be an integer >= 1, got {num_stages!r}")
            if self.world_size % num_stages:
                raise ValueError(f"the world size ({self.world_size} processes) is not divisible by num_stages "
                                 f"({num_stages}): start a multiple of {num_stages} processes")
            pp, dp = num_stages, self.world_size // num_stages
        self._topo = topology or PipeDataParallelTopology(pp, dp)
        self.num_stages, self.dp_world_size = pp, dp
        self.stage_id, self.dp_rank = divmod(self.global_rank, dp)
        self.loss_fn = loss_fn
        self.seed_layers, self.seed_fn, self.base_seed = seed_layers, seed_fn, base_seed
        self.activation_checkpoint_interval = activation_checkpoint_interval
        self.dynamic_shape = dynamic_shape
        self._layer_specs = list(layers.children()) if isinstance(layers, nn.Sequential) else list(layers)
        if not self._layer_specs:
            raise ValueError("PipelineModule needs at least one layer")
        self.partition_method = partition_method
        self.tied_modules: dict[str, nn.Module] = {}
        self._built: dict[int, nn.Module] = {}  # layer index -> what this rank runs at that position
        self.balance = self.partition(pp)
        self.parts = [sum(self.balance[:s]) for s in range(pp + 1)]  # DeepSpeed's stage boundaries
        self.hold(range(self.parts[self.stage_id], self.parts[self.stage_id + 1]))

    # ---- DeepSpeed's accessors ----

    def topology(self) -> PipeDataParallelTopology:
        return self._topo

    def num_layers(self) -> int:
        return len(self._layer_specs)

    @property
    def held(self) -> list[int]:
        """The layer indices this rank holds, in order."""
        return sorted(self._built)

    def forward(self, x: Any) -> Any:
        """This rank's layers in order (a pipeline runs them through the engine's `train_batch`)."""
        for i in self.held:
            x = self._built[i](x)
        return x

    # ---- partitioning and building ----

    def partition(self, num_parts: int) -> list[int]:
        """Layers per stage for `num_parts` stages by `partition_method`, as DeepSpeed partitions them."""
        n, method = len(self._layer_specs), self.partition_method
        if not isinstance(method, str):
            return check_balance(list(method), n, num_parts)
        low = method.lower()
        try:
            if low == "uniform":
                return uniform(n, num_parts)
            if low == "parameters":
                return by_parameters([self._count_params(spec) for spec in self._layer_specs], num_parts)
            if low.startswith("type:"):
                return by_type([_class_name(spec) for spec in self._layer_specs], method[len("type:"):], num_parts)
        except PartitionError as err:
            raise PartitionError(f"partition_method={method!r} over {n} layers and {num_parts} stages: {err}") from None
        why = " (DeepSpeed does not implement it either)" if low == "profile" else ""
        raise ValueError(f"partition_method={method!r} is not one stagewise knows{why}; use 'parameters', 'uniform', "
                         "'type:REGEX' or a list of layer counts")

    def hold(self, indices: Iterable[int]) -> None:
        """Hold exactly the layers `indices`: build the missing ones (DeepSpeed's seeding), drop the others."""
        want = sorted(set(indices))
        for i in [i for i in self._built if i not in want]:
            del self._built[i]
            delattr(self, str(i))
        for i in want:
            if i not in self._built:
                self._built[i] = self._build(i)
                self.add_module(str(i), self._built[i])
        for key in [k for k in self.tied_modules if not any(_holds_tied(m, self.tied_modules[k])
                                                            for m in self._built.values())]:
            del self.tied_modules[key]

    def pipeline_layers(self) -> list[Any]:
        """The layer list for `stagewise.Pipeline`: this rank's built modules; the user's own modules elsewhere
        (so parameters shared across stages by identity are found as ties); for layers held by other ranks, which
        this rank never builds, an `_Elsewhere` layer factory, which only the owning rank would call."""
        return [self._built[i] if i in self._built else spec if isinstance(spec, nn.Module) else _Elsewhere(i)
                for i, spec in enumerate(self._layer_specs)]

    def _build(self, index: int) -> nn.Module:
        spec = self._layer_specs[index]
        if self.seed_layers:
            seed = self.base_seed + index
            if self.seed_fn is not None:
                self.seed_fn(seed)
            else:
                _set_random_seed(seed)
        if isinstance(spec, nn.Module):
            return spec
        if isinstance(spec, TiedLayerSpec):
            if spec.key not in self.tied_modules:
                module = spec.build()
                for attr in spec.tied_weight_attr:
                    p = _get_attr(module, attr, spec)
                    setattr(p, TIE_ATTR, f"deepspeed-tied:{spec.key}:{attr}")
                self.tied_modules[spec.key] = module
            module = self.tied_modules[spec.key]
            return module if spec.forward_fn is None else TiedForward(module, spec.forward_fn)
        if isinstance(spec, LayerSpec):
            return spec.build()
        if callable(spec):
            return FunctionLayer(spec)
        raise TypeError(f"layer {index} is neither an nn.Module, a LayerSpec nor a callable: {spec!r}")

    def _count_params(self, spec: Any) -> int:
        """Trainable parameter elements of a layer (a spec is built on the meta device, the RNG untouched)."""
        if isinstance(spec, nn.Module):
            return sum(p.numel() for p in spec.parameters() if p.requires_grad)
        if isinstance(spec, LayerSpec):
            with torch.random.fork_rng(devices=[]):
                try:
                    with torch.device("meta"):
                        module = spec.build()
                except Exception:  # a layer that cannot be built without memory: build it for real
                    module = spec.build()
            return sum(p.numel() for p in module.parameters() if p.requires_grad)
        return 0


class _Elsewhere:
    """A layer held by another rank: never built here."""

    def __init__(self, index: int):
        self.index = index

    def __call__(self) -> nn.Module:
        raise RuntimeError(f"layer {self.index} belongs to another rank's stage and is not built on this one")


def _join_group() -> tuple[int, int]:
    """(rank, world size) of the process group the script initialised (set up from torchrun's environment when
    it has not been yet); on NCCL, this process's GPU is its local rank's, as DeepSpeed sets it."""
    joined = launch.dist.is_available() and launch.dist.is_initialized()
    rank, size = launch.init_from_env(300.0)
    if joined:  # the script's own group: leaving it to the interpreter's exit can abort the process
        atexit.register(_leave_group)
    if size > 1 and launch.dist.get_backend() == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return rank, size


def _leave_group() -> None:
    if launch.dist.is_initialized():
        try:
            launch.dist.destroy_process_group()
        except Exception:  # already torn down by an error: nothing to leave
            pass


def _set_random_seed(seed: int) -> None:
    random.seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # numpy is optional
        pass
    torch.manual_seed(seed)


def _class_name(spec: Any) -> str:
    if isinstance(spec, LayerSpec):
        return spec.typename.__name__
    if isinstance(spec, nn.Module):
        return type(spec).__name__
    return getattr(spec, "__name__", "")


def _get_attr(module: nn.Module, attr: str, spec: TiedLayerSpec) -> nn.Parameter:
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise AttributeError(f"TiedLayerSpec {spec.key!r}: {spec.typename.__name__} has no attribute {attr!r} "
                                 "(tied_weight_attr)")
        obj = getattr(obj, part)
    if not isinstance(obj, nn.Parameter):
        raise TypeError(f"TiedLayerSpec {spec.key!r}: {attr!r} of {spec.typename.__name__} is not a parameter")
    return obj


def _holds_tied(layer: nn.Module, tied: nn.Module) -> bool:
    return layer is tied or (isinstance(layer, TiedForward) and layer.module is tied)


__all__ = ["FunctionLayer", "LayerSpec", "PipeDataParallelTopology", "PipelineModule", "TiedForward", "TiedLayerSpec"]
