"""What the balancing algorithms know about a layer, and parameter counts with ties. No torch."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

Shared = Sequence[Mapping[int, int]]  # per layer: {parameter key: element count} for parameters of several layers


@dataclass(frozen=True)
class LayerProfile:
    """Measured (or given) costs of one layer, per micro-batch.

    `params` counts every parameter once over the whole layer list: a parameter used by several
    layers (tied, like GPT-2's embedding and LM head) is counted at the first layer using it.
    `shared` lists, for every layer using such a parameter, `{key: element count}`; a stage
    that holds a later user but not the first one keeps its own copy (see `ParamCounter`).
    """

    index: int
    name: str  # class name
    forward: float = 0.0  # seconds
    backward: float = 0.0  # seconds, input and weight gradients together
    params: int = 0  # elements, tied parameters counted once (at their first layer)
    param_bytes: int = 0  # bytes of the parameters counted in `params`
    output_bytes: int = 0  # bytes of the output: what crosses a stage boundary after this layer
    saved_bytes: int = 0  # bytes autograd keeps for the backward (parameters excluded)
    shared: Mapping[int, int] = field(default_factory=dict)
    # seconds of the backward for the input gradient alone (the I of split schedules; W is the
    # rest); 0 when the layer's input needs no gradient, None when not measured
    input_grad: float | None = None
    input_bytes: int = 0  # bytes of the layer's input (what a stage starting here keeps when it recomputes)

    @property
    def time(self) -> float:
        """Forward plus backward, seconds."""
        return self.forward + self.backward

    def to_dict(self) -> dict:
        return {"index": self.index, "name": self.name, "forward": self.forward, "backward": self.backward,
                "params": self.params, "param_bytes": self.param_bytes, "output_bytes": self.output_bytes,
                "saved_bytes": self.saved_bytes, "shared": {str(k): v for k, v in self.shared.items()},
                "input_grad": self.input_grad, "input_bytes": self.input_bytes}


class ParamCounter:
    """Parameters held by a set of layers, a parameter shared by several of them counted once.

    `params[l]` counts each parameter at its first layer only; `shared[l]` maps a key to the
    element count of a parameter layer l uses together with other layers. Layers [lo, hi)
    then hold sum(params[lo:hi]) plus every shared parameter they use whose first user is
    outside the set (their own copy of it).
    """

    def __init__(self, params: Sequence[float], shared: Shared | None = None):
        self.prefix = [0.0]
        for p in params:
            self.prefix.append(self.prefix[-1] + float(p))
        first: dict[int, int] = {}
        self.uses: list[tuple[int, int, int, int]] = []  # (layer, key, elements, first user)
        for layer, keys in enumerate(shared or ()):
            for key, n in keys.items():
                self.uses.append((layer, key, int(n), first.setdefault(key, layer)))

    @property
    def total(self) -> float:
        """All parameters, ties counted once."""
        return self.prefix[-1]

    def held(self, spans: Iterable[tuple[int, int]]) -> float:
        """Parameters held by the layers of `spans` (half-open layer ranges, e.g. all stages of one device)."""
        spans = list(spans)

        def inside(i: int) -> bool:
            return any(lo <= i < hi for lo, hi in spans)

        total = sum(self.prefix[hi] - self.prefix[lo] for lo, hi in spans)
        copies = {key: n for layer, key, n, owner in self.uses if inside(layer) and not inside(owner)}
        return total + sum(copies.values())

    def range(self, lo: int, hi: int) -> float:
        """Parameters held by layers [lo, hi)."""
        if not self.uses:
            return self.prefix[hi] - self.prefix[lo]
        return self.held([(lo, hi)])


def format_bytes(n: float) -> str:
    """Bytes in binary units: `1.50 GiB`."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def format_count(n: float) -> str:
    """Counts in decimal units as DeepSpeed prints them: `60.647M`."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= size:
            return f"{n / size:.3f}{unit}"
    return f"{n:.0f}"


def format_seconds(t: float) -> str:
    """Seconds with a readable unit: `12.3 ms`."""
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("us", 1e-6)):
        if abs(t) >= size:
            return f"{t / size:.3g} {unit}"
    return f"{t * 1e9:.3g} ns"


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | float | int | None) -> float | None:
    """Bytes from a number or text such as `2GiB`, `512 MiB`, `1.5GB`, `3e9` (None stays None)."""
    if text is None or isinstance(text, (int, float)):
        return None if text is None else float(text)
    found = re.fullmatch(r"\s*([0-9.]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    unit = found.group(2).lower() if found else None
    if not found or unit not in _UNITS:
        raise ValueError(f"cannot read {text!r} as bytes; write a number with an optional unit such as 2GiB, "
                         "512MiB or 1.5GB")
    return float(found.group(1)) * _UNITS[unit]
