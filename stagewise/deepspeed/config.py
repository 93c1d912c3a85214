"""DeepSpeed's JSON config, read with DeepSpeed's meaning: the keys a pipeline user sets, checked up front.

Every key is either honoured or refused with an error naming it (`DeepSpeedConfigError`); none is
silently ignored. A few DeepSpeed keys that only tune DeepSpeed's own implementation (bucket sizes,
communication overlap) are accepted because they change no result; they are listed in `NO_EFFECT`.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config key that is unknown, unsupported by stagewise, or has a bad value."""


TOP_LEVEL = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "optimizer",
             "scheduler", "gradient_clipping", "fp16", "bf16", "bfloat16", "steps_per_print", "wall_clock_breakdown",
             "pipeline", "zero_optimization", "dataloader_drop_last", "zero_allow_untested_optimizer",
             "prescale_gradients", "gradient_predivide_factor")
FP16_KEYS = ("enabled", "loss_scale", "initial_scale_power", "loss_scale_window", "hysteresis",
             "consecutive_hysteresis", "min_loss_scale", "auto_cast", "fp16_master_weights_and_grads")
# DeepSpeed's own pipeline keys, then stagewise's extensions
PIPELINE_KEYS = ("stages", "partition", "seed_layers", "activation_checkpoint_interval", "pipe_partitioned",
                 "grad_partitioned", "use_reentrant", "schedule", "virtual_stages", "timeout")
# keys that tune only DeepSpeed's implementation (bucket sizes, overlap): accepted, no effect on any result
NO_EFFECT = {"zero_optimization": ("reduce_bucket_size", "allgather_bucket_size", "overlap_comm",
                                   "contiguous_gradients", "reduce_scatter", "allgather_partitions",
                                   "round_robin_gradients", "load_from_fp32_weights", "elastic_checkpoint",
                                   "ignore_unused_parameters")}
# DeepSpeed optimizers with no torch equivalent
DEEPSPEED_ONLY_OPTIMIZERS = ("lamb", "onebitadam", "zerooneadam", "onebitlamb", "lion", "muadam", "muadamw", "musgd",
                             "cpu_adam", "fusedadam")


@dataclass
class DeepSpeedConfig:
    """The settings read from a DeepSpeed config (batch sizes resolved for `dp` data-parallel replicas)."""

    train_batch_size: int
    micro_batch_size: int
    gradient_accumulation_steps: int
    optimizer: dict[str, Any] | None = None  # {"type": ..., "params": {...}}
    scheduler: dict[str, Any] | None = None
    gradient_clipping: float = 0.0
    precision: str = "fp32"
    loss_scale: dict[str, Any] | None = None  # options of stagewise's LossScaler (fp16)
    steps_per_print: int = 10
    wall_clock_breakdown: bool = False
    schedule: str = "1f1b"
    virtual_stages: int | None = None
    timeout: float = 30.0
    zero_stage: int = 0
    dataloader_drop_last: bool = False
    pipeline: dict[str, Any] = field(default_factory=dict)  # the pipeline section as given


def load_config(config: dict[str, Any] | str | os.PathLike[str] | None) -> dict[str, Any]:
    """The config as a dict: given as one, or read from a JSON file."""
    if config is None:
        raise DeepSpeedConfigError("no DeepSpeed config given: pass initialize(config={...}) or the path of a JSON "
                                   "file (at least train_batch_size or train_micro_batch_size_per_gpu)")
    if isinstance(config, dict):
        return dict(config)
    if isinstance(config, (str, os.PathLike)):
        try:
            with open(config, encoding="utf-8") as f:
                loaded = json.load(f)
        except FileNotFoundError:
            raise DeepSpeedConfigError(f"DeepSpeed config file {os.fspath(config)!r} not found") from None
        except json.JSONDecodeError as err:
            raise DeepSpeedConfigError(f"DeepSpeed config file {os.fspath(config)!r} is not valid JSON: "
                                       f"{err}") from None
        if not isinstance(loaded, dict):
            raise DeepSpeedConfigError(f"DeepSpeed config file {os.fspath(config)!r} must hold a JSON object")
        return loaded
    raise DeepSpeedConfigError(f"config must be a dict or the path of a JSON file, got {type(config).__name__}")


def parse_config(raw: dict[str, Any], dp: int, num_stages: int = 1) -> DeepSpeedConfig:
    """Check every key of `raw` and resolve the batch sizes for `dp` replicas, as DeepSpeed does."""
    _known(raw, TOP_LEVEL, "")
    tbs, mb, gas = _batch_sizes(raw, dp)
    cfg = DeepSpeedConfig(train_batch_size=tbs, micro_batch_size=mb, gradient_accumulation_steps=gas)
    cfg.optimizer = _typed_section(raw, "optimizer")
    cfg.scheduler = _typed_section(raw, "scheduler")
    clip = raw.get("gradient_clipping", 0.0)
    if not _number(clip) or clip < 0:
        raise DeepSpeedConfigError(f"gradient_clipping must be a number >= 0 (0: no clipping), got {clip!r}")
    cfg.gradient_clipping = float(clip)
    cfg.steps_per_print = _integer(raw, "steps_per_print", 10, low=1)
    cfg.wall_clock_breakdown = _boolean(raw, "wall_clock_breakdown", False)
    cfg.dataloader_drop_last = _boolean(raw, "dataloader_drop_last", False)
    _boolean(raw, "zero_allow_untested_optimizer", False)
    if raw.get("prescale_gradients", False) is not False:
        raise DeepSpeedConfigError("prescale_gradients=true is not supported: stagewise reduces gradients in one way "
                                   "(the mean over replicas); leave it out or set it to false")
    if raw.get("gradient_predivide_factor", 1.0) != 1.0:
        raise DeepSpeedConfigError("gradient_predivide_factor other than 1.0 is not supported (stagewise reduces "
                                   "gradients as the mean over replicas); leave it out")
    cfg.precision, cfg.loss_scale = _precision(raw)
    _pipeline(raw, cfg, num_stages)
    cfg.zero_stage = _zero(raw)
    return cfg


def _batch_sizes(raw: dict[str, Any], dp: int) -> tuple[int, int, int]:
    """DeepSpeed's rule: train_batch_size = micro batch per GPU x gradient accumulation steps x data-parallel size;
    any two give the third, one of the first two alone gives gas = 1, all three must agree."""
    tbs = _optional_int(raw, "train_batch_size")
    mb = _optional_int(raw, "train_micro_batch_size_per_gpu")
    gas = _optional_int(raw, "gradient_accumulation_steps")
    if tbs is not None and mb is not None and gas is not None:
        pass
    elif tbs is not None and mb is not None:
        gas = tbs // mb // dp
    elif tbs is not None and gas is not None:
        mb = tbs // dp // gas
    elif mb is not None and gas is not None:
        tbs = mb * gas * dp
    elif tbs is not None:
        gas, mb = 1, tbs // dp
    elif mb is not None:
        gas, tbs = 1, mb * dp
    else:
        raise DeepSpeedConfigError("either train_batch_size or train_micro_batch_size_per_gpu needs to be given")
    assert tbs is not None and mb is not None and gas is not None
    if mb < 1 or gas < 1 or tbs != mb * gas * dp:
        raise DeepSpeedConfigError(
            f"the batch sizes do not agree: train_batch_size must equal train_micro_batch_size_per_gpu x "
            f"gradient_accumulation_steps x data-parallel size ({dp}, the world size / num_stages): "
            f"{tbs} != {mb} x {gas} x {dp}")
    return tbs, mb, gas


def _precision(raw: dict[str, Any]) -> tuple[str, dict[str, Any] | None]:
    fp16 = _section(raw, "fp16")
    if "bf16" in raw and "bfloat16" in raw:
        raise DeepSpeedConfigError("give bf16 or its older name bfloat16, not both")
    bf_key = "bf16" if "bf16" in raw else "bfloat16"
    bf16 = _section(raw, bf_key)
    _known(fp16, FP16_KEYS, "fp16.")
    _known(bf16, ("enabled",), f"{bf_key}.")
    fp16_on = _boolean(fp16, "enabled", False, "fp16.")
    bf16_on = _boolean(bf16, "enabled", False, f"{bf_key}.")
    if fp16_on and bf16_on:
        raise DeepSpeedConfigError("bf16 and fp16 modes cannot be enabled at the same time")
    if bf16_on:
        return "bf16", None
    if not fp16_on:
        return "fp32", None
    if fp16.get("fp16_master_weights_and_grads", False) is not False:
        raise DeepSpeedConfigError("fp16.fp16_master_weights_and_grads is not supported: stagewise keeps fp32 "
                                   "weights and gradients and runs the forwards under autocast")
    _boolean(fp16, "auto_cast", False, "fp16.")  # stagewise always runs fp16 as autocast with fp32 weights
    _boolean(fp16, "consecutive_hysteresis", False, "fp16.")  # no effect with hysteresis 1
    hysteresis = fp16.get("hysteresis", 1)
    if hysteresis != 1:
        raise DeepSpeedConfigError(f"fp16.hysteresis = {hysteresis!r} is not supported: stagewise's loss scaler backs "
                                   "off at the first overflow (hysteresis 1); set it to 1 or leave it out")
    window = _integer(fp16, "loss_scale_window", 1000, low=1, where="fp16.")
    min_scale = fp16.get("min_loss_scale", 1)
    if not _number(min_scale) or min_scale <= 0:
        raise DeepSpeedConfigError(f"fp16.min_loss_scale must be a number > 0, got {min_scale!r}")
    static = fp16.get("loss_scale", 0)
    if not _number(static) or static < 0:
        raise DeepSpeedConfigError(f"fp16.loss_scale must be 0 (dynamic) or a positive static scale, got {static!r}")
    if static > 0:  # a static scale: never grows (an overflow still skips the step and backs off)
        options = {"init_scale": float(static), "growth_interval": 2**62, "min_scale": min(float(min_scale), static)}
    else:
        power = _integer(fp16, "initial_scale_power", 16, low=0, where="fp16.")
        init = 2.0**power
        if init < min_scale:
            raise DeepSpeedConfigError(f"fp16.initial_scale_power {power} gives a scale of {init:g}, below "
                                       f"min_loss_scale {min_scale}")
        options = {"init_scale": init, "growth_interval": window, "min_scale": float(min_scale)}
    return "fp16", options


def _pipeline(raw: dict[str, Any], cfg: DeepSpeedConfig, num_stages: int) -> None:
    pipe = _section(raw, "pipeline")
    _known(pipe, PIPELINE_KEYS, "pipeline.")
    cfg.pipeline = pipe
    if pipe.get("stages", "auto") not in ("auto", num_stages):
        raise DeepSpeedConfigError(f"pipeline.stages = {pipe['stages']!r}: the number of stages is "
                                   f"PipelineModule(num_stages=...) ({num_stages}); leave it out or give 'auto'")
    if pipe.get("partition", "best") != "best":
        raise DeepSpeedConfigError(f"pipeline.partition = {pipe['partition']!r}: partition the model with "
                                   "PipelineModule(partition_method=...); leave this key out or give 'best'")
    for key in ("pipe_partitioned", "grad_partitioned", "use_reentrant"):
        _boolean(pipe, key, True, "pipeline.")  # without tensor parallelism these change no result
    if pipe.get("seed_layers", False) is not False:
        raise DeepSpeedConfigError("pipeline.seed_layers: seed the layers with PipelineModule(seed_layers=True, "
                                   "base_seed=...) (DeepSpeed reads it from there too); leave this key out")
    interval = pipe.get("activation_checkpoint_interval", 0)
    if interval != 0:
        raise DeepSpeedConfigError("pipeline.activation_checkpoint_interval: give it to "
                                   "PipelineModule(activation_checkpoint_interval=...) (DeepSpeed reads it from there "
                                   "too); leave this key out")
    schedule = pipe.get("schedule", "1f1b")
    if not isinstance(schedule, (str, os.PathLike)):
        raise DeepSpeedConfigError(f"pipeline.schedule must be a schedule's name (e.g. '1f1b', 'interleaved', 'zb-h1') "
                                   f"or the path of a schedule file, got {schedule!r}")
    if schedule == "auto":
        raise DeepSpeedConfigError("pipeline.schedule 'auto' (the planner) is not available here: PipelineModule "
                                   "partitions the layers; name a schedule, such as '1f1b' or 'interleaved'")
    cfg.schedule = os.fspath(schedule)
    virtual_stages = pipe.get("virtual_stages")
    if virtual_stages is not None and (isinstance(virtual_stages, bool) or not isinstance(virtual_stages,
                                                                                          int) or virtual_stages < 1):
        raise DeepSpeedConfigError(f"pipeline.virtual_stages must be an integer >= 1 (virtual stages per device), got "
                                   f"{virtual_stages!r}")
    cfg.virtual_stages = virtual_stages
    timeout = pipe.get("timeout", 30.0)
    if not _number(timeout) or timeout <= 0:
        raise DeepSpeedConfigError(f"pipeline.timeout must be a positive number of seconds, got {timeout!r}")
    cfg.timeout = float(timeout)


def _zero(raw: dict[str, Any]) -> int:
    zero = _section(raw, "zero_optimization")
    _known(zero, ("stage", *NO_EFFECT["zero_optimization"]), "zero_optimization.")
    stage = zero.get("stage", 0)
    if stage in (0, 1) and not isinstance(stage, bool):
        return int(stage)
    if stage in (2, 3):
        raise DeepSpeedConfigError(f"zero_optimization.stage {stage} is not supported with pipeline parallelism "
                                   "(DeepSpeed refuses it too); use stage 0 or 1")
    raise DeepSpeedConfigError(f"zero_optimization.stage must be 0, 1, 2 or 3, got {stage!r}")


# ---- small checks ----

def _known(section: dict[str, Any], allowed: tuple[str, ...], where: str) -> None:
    unknown = [k for k in section if k not in allowed]
    if unknown:
        what = "keys" if not where else f"{where[:-1]} keys"
        raise DeepSpeedConfigError(f"config key(s) {', '.join(repr(where + k) for k in unknown)} not supported by "
                                   f"stagewise.deepspeed; the supported {what} are {', '.join(allowed)}")


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key, {})
    if not isinstance(value, dict):
        raise DeepSpeedConfigError(f"{key} must be a JSON object, got {value!r}")
    return value


def _typed_section(raw: dict[str, Any], key: str) -> dict[str, Any] | None:
    if key not in raw:
        return None
    section = _section(raw, key)
    _known(section, ("type", "params"), f"{key}.")
    if not isinstance(section.get("type"), str):
        raise DeepSpeedConfigError(f"{key}.type must name the {key}, e.g. \"Adam\"" if key == "optimizer" else
                                   f"{key}.type must name the {key}, e.g. \"WarmupLR\"")
    params = section.get("params", {})
    if not isinstance(params, dict):
        raise DeepSpeedConfigError(f"{key}.params must be a JSON object, got {params!r}")
    return {"type": section["type"], "params": dict(params)}


def _number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)


def _optional_int(raw: dict[str, Any], key: str) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DeepSpeedConfigError(f"{key} must be an integer >= 1, got {value!r}")
    return value


def _integer(raw: dict[str, Any], key: str, default: int, low: int, where: str = "") -> int:
    value = raw.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise DeepSpeedConfigError(f"{where}{key} must be an integer >= {low}, got {value!r}")
    return value


def _boolean(raw: dict[str, Any], key: str, default: bool, where: str = "") -> bool:
    value = raw.get(key, default)
    if not isinstance(value, bool):
        raise DeepSpeedConfigError(f"{where}{key} must be true or false, got {value!r}")
    return value
