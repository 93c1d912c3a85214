"""`initialize` and DeepSpeed's pipeline engine, over one `stagewise.Pipeline`.

`initialize(model=PipelineModule(...), optimizer=..., config={...})` reads the config with DeepSpeed's
meaning (`stagewise.deepspeed.config`) and builds a `Pipeline` over the module's layers as this rank
built them, with the user's optimizer stepping them; it returns `(engine, optimizer, dataloader,
lr_scheduler)` as DeepSpeed does. `engine.train_batch(it)` pulls `gradient_accumulation_steps`
micro-batches from `it` (each `next()` is one micro-batch, passed through `set_batch_fn`'s function),
gathers every data-parallel replica's micro-batches into the step's batch, and runs one pipelined step:
the loss returned is the mean over every micro-batch of every replica, and the gradients those of that
mean, as DeepSpeed computes them; the learning-rate schedule then steps (not after a skipped step).
"""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from stagewise.deepspeed.config import DEEPSPEED_ONLY_OPTIMIZERS, DeepSpeedConfigError, load_config, parse_config
from stagewise.deepspeed.lr_schedules import SCHEDULES
from stagewise.deepspeed.module import PipelineModule
from stagewise.pipeline import Pipeline
from stagewise.runtime import checkpoint
from stagewise.runtime.microbatch import batch_size
from stagewise.schedules.registry import resolve_schedule
from stagewise.tree import describe, flatten, unflatten

LATEST = "latest"  # the file naming the newest tag, as DeepSpeed writes it


class RepeatingLoader:
    """DeepSpeed's `RepeatingLoader`: iterates over a loader again and again (a new epoch at its end)."""

    def __init__(self, loader: Iterable[Any]):
        self.loader = loader
        self.data_iter = iter(loader)

    def __iter__(self) -> RepeatingLoader:
        return self

    def __next__(self) -> Any:
        try:
            return next(self.data_iter)
        except StopIteration:
            self.data_iter = iter(self.loader)
            return next(self.data_iter)


class PipelineEngine:
    """DeepSpeed's `PipelineEngine`: `train_batch`, `eval_batch`, checkpoints, the step counters and the
    learning rate, for a `PipelineModule` (use `initialize` to build one)."""

    def __init__(self, module: PipelineModule, config: dict[str, Any],
                 optimizer: torch.optim.Optimizer | Callable[..., torch.optim.Optimizer] | None = None,
                 model_parameters: Iterable[Any] | None = None, lr_scheduler: Any = None,
                 training_data: Any = None, collate_fn: Callable[..., Any] | None = None):
        self.module = module
        self.config = cfg = parse_config(config, module.dp_world_size, module.num_stages)
        self.micro_batches = cfg.gradient_accumulation_steps
        self.global_rank, self.stage_id = module.global_rank, module.stage_id
        self.dp_world_size, self.num_stages = module.dp_world_size, module.num_stages
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.global_steps = self.global_samples = self.skipped_steps = 0
        self.batch_fn: Callable[[Any], Any] | None = None
        self.data_iterator: Iterator[Any] | None = None
        self.agg_train_loss: torch.Tensor | None = None
        self._timer, self._last_print = 0.0, 0

        before = {id(p) for p in module.parameters() if p.requires_grad}
        relaid = self._lay_out()
        self.optimizer = self._make_optimizer(optimizer, model_parameters, before if relaid else None)

        def bind(params: list[torch.nn.Parameter]) -> torch.optim.Optimizer | None:
            held = {id(p) for p in params}
            if self.optimizer is not None and not {id(p) for p in _optimized(self.optimizer)} <= held:
                raise ValueError("the optimizer holds parameters this rank's stage does not: build it over "
                                 "model.parameters() of this rank's PipelineModule")
            return self.optimizer

        interval = module.activation_checkpoint_interval
        loss_fn = module.loss_fn if module.loss_fn is not None else _output_is_loss
        self.pipeline = Pipeline(
            module.pipeline_layers(), loss_fn, schedule=cfg.schedule, microbatches=self.micro_batches,
            partition=module.balance, virtual_stages=cfg.virtual_stages, optimizer=bind, timeout=cfg.timeout,
            data_parallel=self.dp_world_size, max_grad_norm=cfg.gradient_clipping or None,
            precision=cfg.precision, recompute=interval if interval > 0 else "never",
            **({"loss_scale": cfg.loss_scale} if cfg.loss_scale is not None else {}))
        self.device = self.pipeline.device
        self.lr_scheduler = self._make_scheduler(lr_scheduler)
        self.training_dataloader = None
        if training_data is not None:
            self.training_dataloader = self.deepspeed_io(training_data, collate_fn=collate_fn)
            self.set_dataiterator(RepeatingLoader(self.training_dataloader))

    # ---- DeepSpeed's configuration accessors ----

    def train_batch_size(self) -> int:
        return self.config.train_batch_size

    def train_micro_batch_size_per_gpu(self) -> int:
        return self.config.micro_batch_size

    def gradient_accumulation_steps(self) -> int:
        return self.config.gradient_accumulation_steps

    def steps_per_print(self) -> int:
        return self.config.steps_per_print

    def wall_clock_breakdown(self) -> bool:
        return self.config.wall_clock_breakdown

    def gradient_clipping(self) -> float:
        return self.config.gradient_clipping

    def zero_optimization_stage(self) -> int:
        return self.config.zero_stage

    def fp16_enabled(self) -> bool:
        return self.config.precision == "fp16"

    def bfloat16_enabled(self) -> bool:
        return self.config.precision == "bf16"

    def is_first_stage(self) -> bool:
        """Whether this rank holds the first stage (reads the inputs)."""
        return self.pipeline.schedule.placement[0] == self.stage_id

    def is_last_stage(self) -> bool:
        """Whether this rank holds the last stage (computes the loss)."""
        return self.pipeline.schedule.placement[-1] == self.stage_id

    def get_lr(self) -> list[float]:
        return [group["lr"] for group in self.optimizer.param_groups] if self.optimizer is not None else []

    def get_mom(self) -> list[Any]:
        if self.optimizer is None:
            return []
        return [g.get("betas", g.get("momentum")) for g in self.optimizer.param_groups]

    def get_global_grad_norm(self) -> float | None:
        """The global gradient norm of the last step (measured when gradient_clipping is set)."""
        return self.pipeline.last_step.get("grad_norm")

    def was_step_applied(self) -> bool:
        return not self.pipeline.last_step.get("skipped")

    def train(self, mode: bool = True) -> PipelineEngine:
        self.module.train(mode)
        return self

    def eval(self) -> PipelineEngine:
        return self.train(False)

    # ---- data ----

    def set_batch_fn(self, fn: Callable[[Any], Any]) -> None:
        """Apply `fn` to every micro-batch pulled from the data iterator; it returns `(inputs, labels)`."""
        self.batch_fn = fn

    def set_dataiterator(self, iterator: Iterator[Any]) -> None:
        if not isinstance(iterator, Iterator):
            raise TypeError(f"the data iterator must be an iterator (each next() gives one micro-batch), got a "
                            f"{type(iterator).__name__}: pass iter(loader), or a RepeatingLoader(loader)")
        self.data_iterator = iterator

    def set_dataloader(self, loader: Iterable[Any]) -> None:
        self.training_dataloader = loader
        self.data_iterator = iter(loader)

    def deepspeed_io(self, dataset: Any, batch_size: int | None = None, collate_fn: Callable[..., Any] | None = None,
                     route: Any = None, pin_memory: bool = True, data_sampler: Any = None, num_local_io_workers: int = 0
                     ) -> torch.utils.data.DataLoader:
        """A loader of `dataset` in micro-batches, this replica's share (a DistributedSampler over the data-parallel
        replicas, in order, as DeepSpeed's pipeline engine builds it)."""
        from torch.utils.data import DataLoader, DistributedSampler

        sampler = data_sampler or DistributedSampler(dataset, num_replicas=self.dp_world_size,
                                                     rank=self.module.dp_rank, shuffle=False)
        return DataLoader(dataset, batch_size=batch_size or self.config.micro_batch_size, sampler=sampler,
                          collate_fn=collate_fn, num_workers=num_local_io_workers,
                          drop_last=self.config.dataloader_drop_last)

    # ---- training and evaluation ----

    def train_batch(self, data_iter: Iterator[Any] | None = None) -> torch.Tensor:
        """One training step over `gradient_accumulation_steps` micro-batches from `data_iter` (or the iterator set
        before) on every replica; returns the mean loss over them all (every rank)."""
        if self.optimizer is None and any(True for _ in self.module.parameters()):
            raise ValueError("train_batch needs an optimizer: pass initialize(optimizer=...) or a config 'optimizer' "
                             "section")
        if data_iter is not None:
            self.set_dataiterator(data_iter)
        self.module.train()
        start = time.perf_counter()
        batch = self._step_batch("train_batch")
        loss = self.pipeline.train_step(batch)
        self.global_steps += 1
        self.global_samples += batch_size(batch[0])
        if self.pipeline.last_step.get("skipped"):
            self.skipped_steps += 1
        elif self.lr_scheduler is not None:
            self.lr_scheduler.step()
        self.agg_train_loss = loss
        self._timer += time.perf_counter() - start
        if self.global_steps % self.config.steps_per_print == 0:
            self._report(loss)
        return loss

    def eval_batch(self, data_iter: Iterator[Any], return_logits: bool = False, compute_loss: bool = True,
                   reduce_output: str | None = "avg", bcast_loss: bool = True, num_micro_batches: int | None = None
                   ) -> Any:
        """The mean loss over `gradient_accumulation_steps` micro-batches per replica, without gradients and in
        eval mode (every rank); with `return_logits`, `(loss, outputs)`: the outputs of this replica's micro-batches
        (joined along the batch dimension; DeepSpeed gives the last micro-batch's) on the rank holding the last
        stage, None elsewhere."""
        if not compute_loss or reduce_output != "avg":
            raise ValueError("eval_batch supports compute_loss=True with reduce_output='avg' (the mean loss)")
        if num_micro_batches not in (None, self.micro_batches):
            raise ValueError(f"eval_batch runs gradient_accumulation_steps ({self.micro_batches}) micro-batches; "
                             f"num_micro_batches={num_micro_batches} is not supported")
        self.module.eval()
        training = self.data_iterator
        self.set_dataiterator(data_iter)
        try:
            batch = self._step_batch("eval_batch")
        finally:
            self.data_iterator = training
        out = self.pipeline.eval_step(batch)
        return (out["loss"], out["outputs"]) if return_logits else out["loss"]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("only train_batch() and eval_batch() are available in pipeline mode (as in DeepSpeed)")

    __call__ = backward = step = forward

    # ---- checkpoints ----

    def save_checkpoint(self, save_dir: str | os.PathLike[str], tag: Any = None, client_state: dict | None = None,
                        save_latest: bool = True, exclude_frozen_parameters: bool = False) -> bool:
        """Write `save_dir/tag` (default `global_step<N>`) in stagewise's checkpoint format (weights by the unsplit
        model's names, optimizer state, RNG, and the engine's counters, schedule and `client_state`); with
        `save_latest`, `save_dir/latest` names the tag. A collective: call it on every rank."""
        if exclude_frozen_parameters:
            raise ValueError("exclude_frozen_parameters is not supported: every parameter is saved")
        tag = str(tag if tag is not None else f"global_step{self.global_steps}")
        extra = {"deepspeed": {"global_steps": self.global_steps, "global_samples": self.global_samples,
                               "skipped_steps": self.skipped_steps, "client_state": client_state or {},
                               "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None
                               else None,
                               "loss_scaler": {r: s.state_dict() for r, s in self.pipeline.loss_scalers.items()}}}
        self.pipeline.save_checkpoint(Path(save_dir) / tag, extra=extra)
        if save_latest and self.global_rank == 0:
            tmp = Path(save_dir) / f".{LATEST}.tmp"
            tmp.write_text(tag)
            os.replace(tmp, Path(save_dir) / LATEST)
        self._barrier("writing the checkpoint's 'latest' file")
        return True

    def load_checkpoint(self, load_dir: str | os.PathLike[str], tag: Any = None, load_module_strict: bool = True,
                        load_optimizer_states: bool = True, load_lr_scheduler_states: bool = True,
                        load_module_only: bool = False, custom_load_fn: Any = None) -> tuple[str | None, Any]:
        """Load `load_dir/tag` (default: the tag `load_dir/latest` names); returns `(path, client_state)`, or
        `(None, None)` when there is no `latest` to follow, as DeepSpeed. A collective."""
        if custom_load_fn is not None:
            raise ValueError("custom_load_fn is not supported")
        if tag is None:
            latest = Path(load_dir) / LATEST
            if not latest.is_file():
                warnings.warn(f"unable to find the latest file at {latest}; pass an explicit tag to load_checkpoint",
                              stacklevel=2)
                return None, None
            tag = latest.read_text().strip()
        folder = Path(load_dir) / str(tag)
        optimizers = self.pipeline.optimizers if load_optimizer_states and not load_module_only else {}
        manifest = checkpoint.load(folder, self.pipeline.world, self.pipeline.model, optimizers,
                                   strict=load_module_strict)
        state = (manifest.get("extra") or {}).get("deepspeed", {})
        if not load_module_only:
            self.global_steps = state.get("global_steps", 0)
            self.global_samples = state.get("global_samples", 0)
            self.skipped_steps = state.get("skipped_steps", 0)
            sched = state.get("lr_scheduler")
            if load_lr_scheduler_states and self.lr_scheduler is not None and sched is not None:
                self.lr_scheduler.load_state_dict(sched)
            for r, s in (state.get("loss_scaler") or {}).items():
                if int(r) in self.pipeline.loss_scalers:
                    self.pipeline.loss_scalers[int(r)].load_state_dict(s)
        return str(folder), state.get("client_state", {})

    # ---- the parts ----

    def _lay_out(self) -> bool:
        """Hold the stages the schedule places on this rank's device: DeepSpeed's one stage per device unless
        the config names a schedule with several stages per device (then the layers are partitioned again over
        its stages and this rank builds its new ones). Returns whether the layout changed."""
        module, cfg = self.module, self.config
        base = resolve_schedule(cfg.schedule, module.num_stages, self.micro_batches, cfg.virtual_stages)
        mine = base.stages_of(self.stage_id)
        if base.num_stages == module.num_stages and mine == [self.stage_id]:
            return False
        module.balance = module.partition(base.num_stages)
        starts = [sum(module.balance[:s]) for s in range(base.num_stages + 1)]
        module.parts = starts
        module.hold(i for s in mine for i in range(starts[s], starts[s + 1]))
        return True

    def _make_optimizer(self, optimizer: Any, model_parameters: Iterable[Any] | None, before: set[int] | None
                        ) -> torch.optim.Optimizer | None:
        """The optimizer over this rank's parameters; `before`: the parameters held before the layers were laid out
        again (None when they were not)."""
        spec, relaid = self.config.optimizer, before is not None
        if optimizer is not None and spec is not None:
            raise DeepSpeedConfigError("an optimizer was given both to initialize(optimizer=...) and in the config's "
                                       "'optimizer' section; give one")
        params = list(model_parameters) if model_parameters is not None else None
        held = [p for p in self.module.parameters() if p.requires_grad]
        if isinstance(optimizer, torch.optim.Optimizer):
            if relaid and {id(p) for p in _optimized(optimizer)} != {id(p) for p in held}:
                return _rebuilt(optimizer, held, self.config.schedule, self.global_rank)
            return optimizer
        if relaid and params is not None:
            given = {id(p) for x in params for p in (x["params"] if isinstance(x, dict) else [x])}
            if given not in (before, {id(p) for p in held}):  # a generator of model.parameters() reads the new ones
                raise ValueError(f"schedule {self.config.schedule!r} places several stages on a device, so this "
                                 "rank's layers changed after model_parameters were taken; pass all of "
                                 "model.parameters() (then the new layers' are used) or leave model_parameters out")
            params = None  # all of the old layout's: this rank's parameters are the new ones
        if callable(optimizer):
            return optimizer(params if params is not None else held)
        if optimizer is not None:
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or a callable(params), got "
                            f"{type(optimizer).__name__}")
        if spec is None:
            return None
        return build_optimizer(spec, params if params is not None else held)

    def _make_scheduler(self, lr_scheduler: Any) -> Any:
        spec = self.config.scheduler
        if lr_scheduler is not None and spec is not None:
            raise DeepSpeedConfigError("a learning-rate scheduler was given both to initialize(lr_scheduler=...) and "
                                       "in the config's 'scheduler' section; give one")
        if lr_scheduler is not None:
            if hasattr(lr_scheduler, "step"):
                return lr_scheduler
            return lr_scheduler(self.optimizer)
        if spec is None or self.optimizer is None:
            return None
        return build_scheduler(spec, self.optimizer)

    def _step_batch(self, what: str) -> tuple[Any, Any]:
        """The step's batch: this replica's micro-batches, joined, then every replica's in replica order."""
        if self.data_iterator is None:
            raise ValueError(f"{what}: no data iterator: pass one (every rank reads the batch in stagewise, so that "
                             "it can check they all have the same), or initialize(training_data=...)")
        micro = []
        for _ in range(self.micro_batches):
            batch = next(self.data_iterator)
            if self.batch_fn is not None:
                batch = self.batch_fn(batch)
            if not (isinstance(batch, (tuple, list)) and len(batch) == 2):
                raise TypeError(f"{what}: a micro-batch must be (inputs, labels), got {type(batch).__name__}; turn "
                                "the loader's batches into pairs with engine.set_batch_fn(fn)")
            micro.append(tuple(batch))
        local = _join(micro, what, "micro-batch")
        if self.dp_world_size == 1:
            return local
        world = self.pipeline.world
        group = world.grid_groups().data[self.stage_id]
        parts = world.run(lambda r: world.all_gather_object(r, local, group),
                          "gathering every data-parallel replica's micro-batches")[self.global_rank]
        return _join(parts, what, "replica")

    def _report(self, loss: torch.Tensor) -> None:
        breakdown = self.pipeline.last_trace() if self.config.wall_clock_breakdown else None  # a collective
        if self.global_rank != 0:
            return
        steps = self.global_steps - self._last_print
        iter_time = self._timer / max(steps, 1)
        self._timer, self._last_print = 0.0, self.global_steps
        print(f"[Rank 0] step={self.global_steps}, skipped={self.skipped_steps}, lr={self.get_lr()}, "
              f"mom={self.get_mom()}", flush=True)
        print(f"steps: {self.global_steps} loss: {loss.item():0.4f} iter time (s): {iter_time:0.3f} samples/sec: "
              f"{self.config.train_batch_size / iter_time if iter_time > 0 else 0.0:0.3f}", flush=True)
        if breakdown is not None:
            totals: dict[str, float] = {}
            for e in breakdown.events:
                if e.device == 0:
                    totals[e.op] = totals.get(e.op, 0.0) + (e.end - e.start)
            print("time (ms) | " + " | ".join(f"{op}: {1000 * t:.2f}" for op, t in sorted(totals.items())), flush=True)

    def _barrier(self, what: str) -> None:
        world = self.pipeline.world
        everyone = world.grid_groups().everyone
        world.run(lambda r: world.barrier(r, everyone), what)


def initialize(args: Any = None, model: PipelineModule | None = None, optimizer: Any = None,
               model_parameters: Iterable[Any] | None = None, training_data: Any = None, lr_scheduler: Any = None,
               distributed_port: int | None = None, mpu: Any = None, dist_init_required: bool | None = None,
               collate_fn: Callable[..., Any] | None = None, config: dict[str, Any] | str | None = None,
               config_params: dict[str, Any] | str | None = None) -> tuple[PipelineEngine, Any, Any, Any]:
    """DeepSpeed's `initialize` for a `PipelineModule`: returns `(engine, optimizer, training_dataloader,
    lr_scheduler)`. The config is a dict or a JSON file's path (`config`, `config_params` or
    `args.deepspeed_config`); `optimizer` an optimizer built over `model.parameters()`, a callable(params), or
    None with a config 'optimizer' section; `lr_scheduler` a scheduler, a callable(optimizer), or None."""
    if model is None:
        raise ValueError("initialize needs model=, a PipelineModule")
    if not isinstance(model, PipelineModule):
        raise TypeError(f"stagewise.deepspeed runs pipeline models: give a PipelineModule, got {type(model).__name__}")
    if mpu is not None:
        raise ValueError("mpu (model parallelism) is not supported: the grid is pipeline x data parallel")
    given = [c for c in (config, config_params) if c is not None]
    from_args = getattr(args, "deepspeed_config", None) if args is not None else None
    if from_args is not None:
        given.append(from_args)
    if len(given) > 1:
        raise DeepSpeedConfigError("the DeepSpeed config was given more than once (config, config_params, "
                                   "args.deepspeed_config); give it once")
    raw = load_config(given[0] if given else None)
    engine = PipelineEngine(model, raw, optimizer, model_parameters, lr_scheduler, training_data, collate_fn)
    return engine, engine.optimizer, engine.training_dataloader, engine.lr_scheduler


def init_distributed(dist_backend: str | None = None, auto_mpi_discovery: bool = True, distributed_port: int = 29500,
                     verbose: bool = True, timeout: Any = None, init_method: str | None = None,
                     dist_init_required: bool | None = None, config: Any = None, rank: int = -1,
                     world_size: int = -1) -> None:
    """Join the process group from torchrun's (or `stagewise run`'s) environment, if not joined yet."""
    from stagewise.runtime import launch

    seconds = timeout.total_seconds() if hasattr(timeout, "total_seconds") else float(timeout or 1800)
    launch.init_from_env(seconds, dist_backend)


def build_optimizer(spec: dict[str, Any], params: list[Any]) -> torch.optim.Optimizer:
    """The optimizer of a config's 'optimizer' section, with DeepSpeed's meaning: Adam is AdamW unless
    `adam_w_mode` is false (DeepSpeed's FusedAdam), weight decay 0 by default; other names are torch.optim's."""
    name, kw = spec["type"], dict(spec["params"])
    low = name.lower()
    if low in ("adam", "adamw"):
        for key, ok in (("torch_adam", None), ("bias_correction", True)):
            if key in kw and ok is not None and kw[key] != ok:
                raise DeepSpeedConfigError(f"optimizer.params.{key} = {kw[key]!r} is not supported")
            kw.pop(key, None)
        w_mode = kw.pop("adam_w_mode", True) if low == "adam" else True
        kw.setdefault("weight_decay", 0.0)
        cls: type[torch.optim.Optimizer] = torch.optim.AdamW if w_mode else torch.optim.Adam
    elif low in DEEPSPEED_ONLY_OPTIMIZERS:
        raise DeepSpeedConfigError(f"optimizer {name!r} is DeepSpeed's own and not supported; use a torch.optim "
                                   "one (Adam, AdamW, SGD, Adagrad, ...)")
    elif low == "adagrad":
        cls = torch.optim.Adagrad
    else:
        found = getattr(torch.optim, name, None)
        if not (isinstance(found, type) and issubclass(found, torch.optim.Optimizer)):
            raise DeepSpeedConfigError(f"optimizer.type {name!r} is not known: use Adam, AdamW, Adagrad or a "
                                       "torch.optim class name")
        cls = found
    try:
        return cls(params, **kw)
    except TypeError as err:
        raise DeepSpeedConfigError(f"optimizer.params for {name}: {err}") from None


def build_scheduler(spec: dict[str, Any], optimizer: torch.optim.Optimizer) -> Any:
    """The schedule of a config's 'scheduler' section: DeepSpeed's WarmupLR, WarmupDecayLR, WarmupCosineLR, or a
    torch.optim.lr_scheduler class by name."""
    name, kw = spec["type"], spec["params"]
    if name in SCHEDULES:
        cls: Any = SCHEDULES[name]
    elif name in ("OneCycle", "LRRangeTest"):
        raise DeepSpeedConfigError(f"scheduler {name!r} is not supported; use WarmupLR, WarmupDecayLR, "
                                   "WarmupCosineLR or a torch.optim.lr_scheduler class")
    else:
        cls = getattr(torch.optim.lr_scheduler, name, None)
        if not isinstance(cls, type):
            raise DeepSpeedConfigError(f"scheduler.type {name!r} is not known: use WarmupLR, WarmupDecayLR, "
                                       "WarmupCosineLR or a torch.optim.lr_scheduler class name")
    try:
        return cls(optimizer, **kw)
    except TypeError as err:
        raise DeepSpeedConfigError(f"scheduler.params for {name}: {err}") from None


def _output_is_loss(outputs: Any, labels: Any) -> Any:
    """Without a loss_fn the last stage's output is the loss (as DeepSpeed takes it)."""
    return outputs


def _optimized(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _rebuilt(optimizer: torch.optim.Optimizer, params: list[torch.nn.Parameter], schedule: str, rank: int
             ) -> torch.optim.Optimizer:
    """The user's optimizer rebuilt over this rank's parameters after a new layout (same class and settings)."""
    if optimizer.state or len(optimizer.param_groups) != 1:
        raise ValueError(f"schedule {schedule!r} places several stages on a device, so this rank's layers changed "
                         "after the optimizer was built; an optimizer with several param groups or with state cannot "
                         "be moved onto them: give the optimizer in the config or as a callable(params)")
    group = optimizer.param_groups[0]
    rebuilt = type(optimizer)(params, **{k: group[k] for k in optimizer.defaults if k in group})
    if rank == 0:
        warnings.warn(f"schedule {schedule!r} places several stages on a device: the optimizer was rebuilt over this "
                      "rank's layers; use the optimizer initialize() returns", stacklevel=5)
    return rebuilt


def _join(parts: list[tuple[Any, Any]], what: str, name: str) -> tuple[Any, Any]:
    """Concatenate (inputs, labels) pairs along the batch dimension; every part must have the same shapes."""
    if len(parts) == 1:
        return parts[0]
    out = []
    for side, label in ((0, "inputs"), (1, "labels")):
        flats = [flatten(p[side]) for p in parts]
        first, spec = flats[0]
        for k, (ts, s) in enumerate(flats[1:], 1):
            if s.treespec != spec.treespec or [t.shape for t in ts] != [t.shape for t in first]:
                raise ValueError(f"{what}: {name} {k}'s {label} are {describe(s)} but {name} 0's are {describe(spec)}; "
                                 "the micro-batches of one step must have the same structure and shapes (as in "
                                 "DeepSpeed's pipeline): pad them to one length, or drop a last smaller batch")
        out.append(unflatten(spec, [torch.cat([ts[i] for ts, _ in flats]) if t.dim() > 0 else t
                                    for i, t in enumerate(first)]))
    return out[0], out[1]


__all__ = ["PipelineEngine", "RepeatingLoader", "build_optimizer", "build_scheduler", "init_distributed", "initialize"]
