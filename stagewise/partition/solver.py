"""Exact solvers for cutting a chain of layers into contiguous stages. Pure Python, no torch.

A partition is a *balance*: the number of consecutive layers each stage gets, in stage order.
Two solvers:

- `min_max_balance(costs, S)`: additive stage costs (a stage costs the sum of its layers).
  The floats are turned into integers without rounding (every float is an integer times a
  power of two), so sums and comparisons are exact and the optimum is exact, not "within eps".
- `min_max_partition(cost, L, S)` / `min_sum_partition(...)`: any stage cost `cost(stage, lo, hi)`
  (per-stage overheads, memory that depends on the stage's position, infeasible stages as
  `math.inf`), by dynamic programming in O(S * L^2) calls of `cost`.

Ties: among all optimal balances every solver returns the lexicographically largest one, i.e.
the first stage takes as many layers as it can, then the second, and so on. On 0/1 weights
this is the greedy cut DeepSpeed's `partition_balanced` makes, which is why it was chosen.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Callable, Sequence

StageCost = Callable[[int, int, int], float]  # (stage, lo, hi) -> cost of layers [lo, hi) as that stage


class PartitionError(ValueError):
    """A partition request that no balance can satisfy."""


def uniform(num_layers: int, num_stages: int) -> list[int]:
    """Equal layer counts; the first `num_layers % num_stages` stages get one more."""
    check_request(num_layers, num_stages)
    base, extra = divmod(num_layers, num_stages)
    return [base + (1 if s < extra else 0) for s in range(num_stages)]


def check_request(num_layers: int, num_stages: int, allow_empty: bool = False) -> None:
    """Raise PartitionError unless `num_layers` layers can be cut into `num_stages` stages."""
    if not isinstance(num_stages, int) or isinstance(num_stages, bool) or num_stages < 1:
        raise PartitionError(f"the number of stages must be an integer >= 1, got {num_stages!r}")
    if num_layers < 0:
        raise PartitionError(f"the number of layers must be >= 0, got {num_layers}")
    if not allow_empty and num_stages > num_layers:
        raise PartitionError(f"cannot cut {num_layers} layers into {num_stages} stages: every stage needs a layer; "
                             f"use at most {num_layers} stages (devices x virtual stages) or a model with more layers")


def check_balance(balance: Sequence[int], num_layers: int, num_stages: int) -> list[int]:
    """Return `balance` as a list of ints after checking it has one count >= 1 per stage summing to `num_layers`."""
    out = [int(x) for x in balance]
    if len(out) != num_stages:
        raise PartitionError(f"balance {out} has {len(out)} entries for {num_stages} stages "
                             "(devices x virtual stages); give one layer count per stage")
    if any(b < 1 for b in out):
        raise PartitionError(f"balance {out} leaves stage {next(i for i, b in enumerate(out) if b < 1)} "
                             "without layers; every stage needs at least one")
    if sum(out) != num_layers:
        raise PartitionError(f"balance {out} covers {sum(out)} layers but the model has {num_layers}")
    return out


def ranges(balance: Sequence[int]) -> list[tuple[int, int]]:
    """The half-open layer range [lo, hi) of every stage."""
    out, lo = [], 0
    for n in balance:
        out.append((lo, lo + n))
        lo += n
    return out


def exact_integers(costs: Sequence[float]) -> list[int]:
    """The costs scaled by one common power of two to integers, exactly (so sums never round).

    Raises PartitionError for a negative, NaN or infinite cost: the greedy check and the
    monotonicity of stage costs that the exact solver relies on need finite costs >= 0.
    """
    ratios = []
    for i, c in enumerate(costs):
        c = float(c)
        if not math.isfinite(c) or c < 0:
            raise PartitionError(f"cost of layer {i} is {c!r}; layer costs must be finite and >= 0")
        ratios.append(c.as_integer_ratio())
    den = max((d for _, d in ratios), default=1)  # all denominators are powers of two
    return [n * (den // d) for n, d in ratios]


class ExactSums:
    """Sums of consecutive costs, exact and rounded once: `sums(lo, hi)` is the float nearest sum(costs[lo:hi])."""

    def __init__(self, costs: Sequence[float]):
        w = exact_integers(costs)
        self.scale = max((float(c).as_integer_ratio()[1] for c in costs), default=1)
        self.prefix = [0]
        for x in w:
            self.prefix.append(self.prefix[-1] + x)

    def __call__(self, lo: int, hi: int) -> float:
        return (self.prefix[hi] - self.prefix[lo]) / self.scale  # int / int is correctly rounded

    def __len__(self) -> int:
        return len(self.prefix) - 1


def min_max_balance(costs: Sequence[float], num_stages: int, *, allow_empty: bool = False) -> list[int]:
    """The balance minimising the largest stage sum of `costs` (one cost >= 0 per layer), exactly.

    Binary search over the integer bottleneck, each step a greedy feasibility check of O(S log L),
    plus O(L log L) to build the answer.
    Ties go to the lexicographically largest balance (see the module docstring).
    """
    check_request(len(costs), num_stages, allow_empty)
    w = exact_integers(costs)
    prefix = [0]
    for x in w:
        prefix.append(prefix[-1] + x)
    lo, hi = max(max(w, default=0), -(-prefix[-1] // num_stages)), prefix[-1]
    while lo < hi:  # feasibility is monotone in the bound, and the optimum is an integer
        mid = (lo + hi) // 2
        if _greedy_stages(prefix, mid, num_stages) <= num_stages:
            hi = mid
        else:
            lo = mid + 1
    return _largest_within(prefix, lo, num_stages, allow_empty)


def _greedy_stages(prefix: list[int], bound: int, limit: int) -> int:
    """Fewest stages with sums <= bound (greedy is optimal for costs >= 0); stops counting past `limit`."""
    n, i, count = len(prefix) - 1, 0, 0
    while i < n and count <= limit:
        j = bisect_right(prefix, prefix[i] + bound) - 1
        if j == i:
            return limit + 1  # a single layer exceeds the bound
        i, count = j, count + 1
    return count


def _largest_within(prefix: list[int], bound: int, num_stages: int, allow_empty: bool) -> list[int]:
    """The lexicographically largest balance whose stage sums are all <= bound."""
    n = len(prefix) - 1
    reach = [bisect_right(prefix, prefix[i] + bound) - 1 for i in range(n + 1)]
    need = [0] * (n + 1)  # need[i]: fewest stages for layers [i, n)
    for i in range(n - 1, -1, -1):
        need[i] = 1 + need[reach[i]] if reach[i] > i else n + 1
    balance, i = [], 0
    for s in range(num_stages):
        left = num_stages - s - 1
        j = n if left == 0 else min(reach[i], n if allow_empty else n - left)
        if need[j] > left or j < i or (not allow_empty and j == i):
            raise AssertionError(f"bound {bound} infeasible at stage {s}")  # the search proved it feasible
        balance.append(j - i)
        i = j
    return balance


def _solve(cost: StageCost, num_layers: int, num_stages: int, allow_empty: bool,
           combine: Callable[[float, float], float], what: str) -> list[int]:
    """Suffix DP: best[s][i] = optimum for layers [i, L) as stages s..S-1; then the lexicographically largest cut."""
    check_request(num_layers, num_stages, allow_empty)
    L, S, gap = num_layers, num_stages, 0 if allow_empty else 1
    inf = math.inf

    def span(s: int, i: int) -> range:
        """Ends j of stage s starting at layer i that leave every later stage a layer (when they need one)."""
        return range(i + gap, L - gap * (S - 1 - s) + 1) if s < S - 1 else range(L, L + 1)

    best: list[dict[int, float]] = [{} for _ in range(S + 1)]
    best[S][L] = 0.0
    for s in range(S - 1, -1, -1):
        starts = [0] if s == 0 else range(gap * s, L - gap * (S - s) + 1)
        for i in starts:
            value = inf
            for j in span(s, i):
                rest = best[s + 1].get(j, inf)
                if rest == inf:
                    continue
                c = float(cost(s, i, j))
                if math.isnan(c):
                    raise PartitionError(f"stage cost of stage {s}, layers [{i}, {j}) is NaN")
                value = min(value, combine(c, rest))
            best[s][i] = value
    optimum = best[0][0]
    if optimum == inf:
        raise PartitionError(f"no partition of {L} layers into {S} stages has a finite {what}")
    balance, i, target = [], 0, optimum
    for s in range(S):
        for j in reversed(span(s, i)):  # largest end first: the lexicographically largest optimum
            rest = best[s + 1].get(j, inf)
            if rest == inf:
                continue
            c = float(cost(s, i, j))
            if combine is max and max(c, rest) <= optimum:
                break
            if combine is not max and c + rest == target:
                target = rest
                break
        else:
            raise AssertionError("DP reconstruction found no optimal stage")
        balance.append(j - i)
        i = j
    return balance


def _add(a: float, b: float) -> float:
    return a + b


def min_max_partition(cost: StageCost, num_layers: int, num_stages: int, *, allow_empty: bool = False) -> list[int]:
    """The balance minimising max over stages of `cost(stage, lo, hi)`; `math.inf` marks a forbidden stage.

    Exact by dynamic programming, O(S * L^2) cost calls; costs are only compared, never added,
    so float results are exact too. Ties go to the lexicographically largest balance.
    """
    return _solve(cost, num_layers, num_stages, allow_empty, max, "maximum stage cost")


def min_sum_partition(cost: StageCost, num_layers: int, num_stages: int, *, allow_empty: bool = False) -> list[int]:
    """The balance minimising the sum over stages of `cost(stage, lo, hi)`; `math.inf` marks a forbidden stage.

    Dynamic programming, O(S * L^2) cost calls, sums accumulated from the last stage backwards.
    Ties go to the lexicographically largest balance.
    """
    return _solve(cost, num_layers, num_stages, allow_empty, _add, "total cost")
