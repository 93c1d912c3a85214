"""The space of balances: every composition (as lists or one array), neighbouring balances, steepest descent. No
torch."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np


def neighbours(balance: list[int], reach: int) -> list[list[int]]:
    """Balances with 1..reach layers moved from one stage to another, every stage keeping a layer.

    Moving layers from stage i to stage j shifts every boundary in between: the stages between
    keep their sizes but slide, which is what changes memory across devices in a V or
    round-robin placement, where neighbouring stages live on different devices.
    """
    out = []
    S = len(balance)
    for i in range(S):
        for j in range(S):
            for step in range(1, reach + 1):
                if i != j and balance[i] > step:
                    b = list(balance)
                    b[i] -= step
                    b[j] += step
                    out.append(b)
    return out


def shorter(a: float, b: float) -> bool:
    """a is a real improvement on b, not float noise from summing the same costs in another order."""
    return a < b - 1e-9 * abs(b)


def descend(start: list[int], objective: Callable[[list[int]], Any], ok: Callable[[list[int]], bool],
             better: Callable[[Any, Any], bool] = operator.lt, reach: int = 1, rounds: int = 200) -> list[int]:
    """Steepest descent over `neighbours` while the objective improves (the first best move on ties)."""
    current, value = list(start), objective(start)
    for _ in range(rounds):
        step = None
        for b in neighbours(current, reach):
            if ok(b):
                v = objective(b)
                if better(v, value):
                    value, step = v, b
        if step is None:
            break
        current = step
    return current


def unique(balances: list[list[int]]) -> list[list[int]]:
    """`balances` without repeats, in order."""
    return [list(b) for b in dict.fromkeys(tuple(b) for b in balances)]


def compositions(num_layers: int, num_stages: int) -> Iterator[list[int]]:
    """Every balance with a layer per stage, lexicographically largest first."""
    if num_stages == 1:
        yield [num_layers]
        return
    for first in range(num_layers - num_stages + 1, 0, -1):
        for rest in compositions(num_layers - first, num_stages - 1):
            yield [first, *rest]


def compositions_array(num_layers: int, num_stages: int) -> np.ndarray:
    """Every balance of `num_layers` into `num_stages` non-empty stages, shape (count, stages)."""
    if num_stages == 1:
        return np.array([[num_layers]], dtype=np.int64)
    cuts = np.array(list(itertools.combinations(range(1, num_layers), num_stages - 1)), dtype=np.int64)
    cuts = cuts.reshape(-1, num_stages - 1)
    edges = np.concatenate([np.zeros((len(cuts), 1), np.int64), cuts, np.full((len(cuts), 1), num_layers)], axis=1)
    return np.diff(edges, axis=1)
