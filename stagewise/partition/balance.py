"""Balances: how many consecutive layers each stage gets. Pure functions, no torch."""

from __future__ import annotations

from collections.abc import Sequence


def uniform(num_layers: int, num_stages: int) -> list[int]:
    """Equal layer counts; the first `num_layers % num_stages` stages get one more."""
    if num_stages > num_layers:
        raise ValueError(f"cannot cut {num_layers} layers into {num_stages} stages: every stage needs a layer; "
                         f"use at most {num_layers} stages (devices x chunks) or a model with more layers")
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def resolve_balance(partition: str | Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """Turn `partition` ("uniform" or an explicit list of layer counts) into a balance list."""
    if isinstance(partition, str):
        if partition == "uniform":
            return uniform(num_layers, num_stages)
        raise ValueError(f"unknown partition method {partition!r}; use 'uniform' or a list of layer counts")
    balance = [int(x) for x in partition]
    if len(balance) != num_stages:
        raise ValueError(f"balance {balance} has {len(balance)} entries for {num_stages} stages "
                         "(devices x chunks); give one layer count per stage")
    if any(b < 1 for b in balance):
        raise ValueError(f"balance {balance} leaves stage {next(i for i, b in enumerate(balance) if b < 1)} "
                         "without layers; every stage needs at least one")
    if sum(balance) != num_layers:
        raise ValueError(f"balance {balance} covers {sum(balance)} layers but the model has {num_layers}")
    return balance
