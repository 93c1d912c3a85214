"""Balances: how many consecutive layers each stage gets. Pure functions, no torch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from stagewise.partition.methods import resolve
from stagewise.partition.solver import uniform

__all__ = ["resolve_balance", "uniform"]


def resolve_balance(partition: str | Sequence[int], num_layers: int, num_stages: int, **info: Any) -> list[int]:
    """Turn `partition` ("uniform", a method name or an explicit list of layer counts) into a balance list.

    `info` carries what a method needs (names=, params=, times=, layers=, schedule=, ...);
    see `stagewise.partition.methods.resolve`.
    """
    return resolve(partition, num_layers, num_stages, **info)
