"""Cutting a list of layers into stages."""

from stagewise.partition.balance import resolve_balance, uniform

__all__ = ["resolve_balance", "uniform"]
