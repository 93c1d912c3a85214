"""Layer profiles at several micro-batch sizes (`ProfileSet`) and at one (`SizeProfile`): what the cost model is
fed, as measured by `stagewise.measure.planner_profiles` or written by hand. No torch.

A layer's time is not linear in its micro-batch (per-call overheads dominate small ones, caches large ones),
so a `ProfileSet` holds profiles measured at every micro-batch size the planner tries, and interpolates
between measured sizes otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from stagewise.partition.layers import LayerProfile


@dataclass(frozen=True)
class SizeProfile:
    """Layer profiles measured at one micro-batch size (`samples` per micro-batch).

    `layers[l].saved_bytes` are what layer l saves for its backward as one stage (the last layer with the
    loss, as the runtime runs it, or apart in `loss_bytes`); `input_bytes` the model input of one micro-batch
    (what the first stage keeps when it recomputes); `noise` the relative spread of the layers' forward +
    backward times between repeated profile runs (see `stagewise.measure.planner_profiles`).
    """

    samples: int
    layers: tuple[LayerProfile, ...]
    input_bytes: int = 0
    loss_bytes: int = 0
    noise: float = 0.0
    weight_grad: tuple[float, ...] | None = None  # W seconds per layer as the runtime splits the backward

    @classmethod
    def from_layers(cls, layers: Sequence[LayerProfile], samples: int = 1) -> SizeProfile:
        """One micro-batch's profile from `profile_layers` output (the loss's bytes inside the last layer's)."""
        return cls(samples, tuple(layers), layers[0].input_bytes if layers else 0)

    def to_dict(self) -> dict:
        return {"samples": self.samples, "layers": [x.to_dict() for x in self.layers],
                "input_bytes": self.input_bytes, "loss_bytes": self.loss_bytes, "noise": self.noise,
                "weight_grad": list(self.weight_grad) if self.weight_grad is not None else None}

    @classmethod
    def from_dict(cls, data: dict) -> SizeProfile:
        w = data.get("weight_grad")
        return cls(int(data["samples"]), tuple(LayerProfile.from_dict(x) for x in data["layers"]),
                   int(data.get("input_bytes", 0)), int(data.get("loss_bytes", 0)), float(data.get("noise", 0.0)),
                   tuple(w) if w is not None else None)


@dataclass(frozen=True)
class ProfileSet:
    """Profiles of one model at several micro-batch sizes, and the optimizer's measured cost per parameter."""

    sizes: dict[int, SizeProfile]
    step_per_param: float = 0.0  # optimizer step seconds per parameter (measured: an AdamW step on one flat tensor)
    runs: int = 1  # profile runs per size (the noise estimate needs 2 or more)
    repeats: int = 1  # timed repetitions per layer and run (the fastest counts)
    seconds: float = 0.0  # wall time of the measurement
    meta: dict = field(default_factory=dict)
    # each profile run on its own (its fastest repetitions), per size: what decides ties (see `plan_ties`)
    per_run: tuple[dict[int, SizeProfile], ...] = ()

    @property
    def num_layers(self) -> int:
        return len(next(iter(self.sizes.values())).layers)

    def at(self, samples: int) -> SizeProfile:
        """The profile at `samples` per micro-batch: measured, or interpolated linearly (per layer and field)
        between the nearest measured sizes around it (extrapolated from the nearest two outside them)."""
        if samples in self.sizes:
            return self.sizes[samples]
        known = sorted(self.sizes)
        if len(known) == 1:
            return _scaled(self.sizes[known[0]], samples)
        lo = max([k for k in known if k < samples], default=known[0])
        hi = min([k for k in known if k > samples], default=known[-1])
        if lo == hi:
            lo, hi = (known[0], known[1]) if samples < known[0] else (known[-2], known[-1])
        return _between(self.sizes[lo], self.sizes[hi], samples)

    def run(self, k: int) -> ProfileSet:
        """The profiles of run `k` alone."""
        return ProfileSet(self.per_run[k], self.step_per_param, 1, self.repeats, 0.0, self.meta)

    def to_dict(self) -> dict:
        return {"sizes": {str(k): v.to_dict() for k, v in sorted(self.sizes.items())},
                "step_per_param": self.step_per_param, "runs": self.runs, "repeats": self.repeats,
                "seconds": self.seconds, "meta": self.meta,
                "per_run": [{str(k): v.to_dict() for k, v in sorted(r.items())} for r in self.per_run]}

    @classmethod
    def from_dict(cls, data: dict) -> ProfileSet:
        per_run = tuple({int(k): SizeProfile.from_dict(v) for k, v in r.items()} for r in data.get("per_run", []))
        return cls({int(k): SizeProfile.from_dict(v) for k, v in data["sizes"].items()},
                   float(data.get("step_per_param", 0.0)), int(data.get("runs", 1)), int(data.get("repeats", 1)),
                   float(data.get("seconds", 0.0)), dict(data.get("meta", {})), per_run)


def _lerp(a: float, b: float, t: float) -> float:
    return max(0.0, a + (b - a) * t)


def _between(a: SizeProfile, b: SizeProfile, samples: int) -> SizeProfile:
    t = (samples - a.samples) / (b.samples - a.samples)
    layers = []
    for x, y in zip(a.layers, b.layers):
        ig = None if x.input_grad is None or y.input_grad is None else _lerp(x.input_grad, y.input_grad, t)
        layers.append(replace(x, forward=_lerp(x.forward, y.forward, t), backward=_lerp(x.backward, y.backward, t),
                              input_grad=ig, output_bytes=round(_lerp(x.output_bytes, y.output_bytes, t)),
                              saved_bytes=round(_lerp(x.saved_bytes, y.saved_bytes, t))))
    w = None if a.weight_grad is None or b.weight_grad is None else tuple(
        _lerp(x, y, t) for x, y in zip(a.weight_grad, b.weight_grad))
    return SizeProfile(samples, tuple(layers), round(_lerp(a.input_bytes, b.input_bytes, t)),
                       round(_lerp(a.loss_bytes, b.loss_bytes, t)), max(a.noise, b.noise), w)


def _scaled(a: SizeProfile, samples: int) -> SizeProfile:
    """One measured size only: everything proportional to the samples."""
    k = samples / a.samples
    layers = tuple(replace(x, forward=x.forward * k, backward=x.backward * k,
                           input_grad=None if x.input_grad is None else x.input_grad * k,
                           output_bytes=round(x.output_bytes * k), saved_bytes=round(x.saved_bytes * k))
                   for x in a.layers)
    w = None if a.weight_grad is None else tuple(x * k for x in a.weight_grad)
    return SizeProfile(samples, layers, round(a.input_bytes * k), round(a.loss_bytes * k), a.noise, w)
