"""A Pipeline's options checked before anything runs (no world, no layer built), resolved into what its parts take."""

from __future__ import annotations

from typing import Any

from stagewise.runtime.guards import check_options
from stagewise.runtime.precision import LossScaler
from stagewise.runtime.sharding import check_shard


def resolve_options(schedule: Any, timeout: Any, on_nonfinite: Any, max_grad_norm: Any, data_parallel: Any,
                    vertical_sync: bool, loss_scale: dict[str, Any] | None, precision: str, shard: Any,
                    local_devices: int | None, compile: bool | str, planner: dict[str, Any] | None = None
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any] | None]:
    """Refuse an unknown schedule and options that would only fail later, obscurely, or train wrongly ("auto":
    the planner picks a registered schedule); return (the schedule generator's options, fp16's loss-scaler
    options, the planner's options: with sharding, the shard mode its memory model prices)."""
    check_options(None if schedule == "auto" else schedule, timeout, on_nonfinite, max_grad_norm, data_parallel)
    check_shard(shard, data_parallel, local_devices, precision, compile)
    planner = {**(planner or {}), "shard": shard} if shard != "none" else planner
    return ({"vertical_sync": True} if vertical_sync else {}), LossScaler.options(loss_scale, precision), planner
