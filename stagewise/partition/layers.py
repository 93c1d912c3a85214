"""What the planner knows about a layer (`LayerProfile`), and parameters counted with ties (`ParamCounter`).
No torch."""

from __future__ import annotations

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

    @classmethod
    def from_dict(cls, data: dict) -> LayerProfile:
        return cls(**{**data, "shared": {int(k): v for k, v in data.get("shared", {}).items()}})


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

    def tied(self) -> dict[int, tuple[int, list[int]]]:
        """Every parameter several layers use: key -> (elements, the layers using it, first user first)."""
        out: dict[int, tuple[int, list[int]]] = {}
        for layer, key, n, _ in self.uses:
            out.setdefault(key, (n, []))[1].append(layer)
        return out

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
