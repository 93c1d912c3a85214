"""Where each stage lives: stage -> device maps for plain, interleaved and V-shaped pipelines."""

from __future__ import annotations

from stagewise.schedules.actions import ScheduleError


def check_args(name: str, devices: int, microbatches: int, virtual_stages: int) -> None:
    """Raise ScheduleError for arguments no schedule can satisfy."""
    for label, value in (("devices", devices), ("micro-batches", microbatches), ("virtual_stages", virtual_stages)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ScheduleError(f"{name}: {label} must be an integer >= 1, got {value!r}")


def plain(devices: int) -> tuple[int, ...]:
    """One stage per device: stage s on device s."""
    return tuple(range(devices))


def round_robin(devices: int, virtual_stages: int) -> tuple[int, ...]:
    """Megatron's interleaving: stage s on device s % devices."""
    return tuple(s % devices for s in range(devices * virtual_stages))


def v_shape(devices: int) -> tuple[int, ...]:
    """Two virtual_stages per device, down and back: stages 0..P-1 on devices 0..P-1, then P-1..0."""
    return tuple(range(devices)) + tuple(range(devices - 1, -1, -1))
