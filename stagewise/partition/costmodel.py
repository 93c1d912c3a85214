"""What one configuration costs: step time and device memory of a balance under a schedule (activation
checkpointing included), from layer profiles measured at one micro-batch size. No torch.

The planner (`stagewise.partition.plan`) asks this model about every candidate it keeps. It extends
`Planner` (time) and `Footprint` (memory) with what choosing the schedule and m together needs:

- **Profiles per micro-batch size.** A layer's time is not linear in its micro-batch (per-call overheads
  dominate small ones, caches large ones), so `ProfileSet` holds profiles measured at every micro-batch
  size the search tries, and interpolates between measured sizes otherwise.
- **Recompute** comes in the schedule: `with_recompute(schedule, mode)` puts a RECOMPUTE action before
  the backward of every forward that keeps only its stage's input (`stagewise.schedules.recompute`). The
  simulator times a RECOMPUTE as the stage's forward; the memory sweep counts what the runtime holds: a
  forward that recomputes holds its stage's input X, its RECOMPUTE adds the stage's activations A (held
  until the last backward piece, so a split backward's W reuses them), the last piece frees both.
- **The loss** saves tensors too (a cross-entropy over a large vocabulary keeps its log-probabilities, often
  the largest activation of the model); the runtime computes it inside the last stage's forward and counts
  it there, and so does this model (`SizeProfile.loss_bytes`, or inside the last layer's `saved_bytes`).
- **Shared cores.** With `cores`, ranks that share C cores (CPU ranks of one machine) cannot compute more
  than C at once: the step is at least all ranks' work / C, and each action is stretched by the number of
  ranks busy beside it / C (processor sharing, found by re-simulating with the stretch the previous
  timeline implies, a few times; per stage and action kind, averaged).
- **The optimizer step** costs `step_per_param` seconds per parameter held, after the device's last action.
- **Data parallelism.** With D replicas the schedule carries a REDUCE action per stage (`with_reductions`),
  simulated as 2 (D - 1) / D x the stage's gradient bytes / `reduce_bandwidth` (measured on the run's world,
  `stagewise.partition.link_speed`); the replicas also share the cores. The simulator runs a REDUCE on its
  device's timeline, so a device with several stages computes nothing while one of its stages reduces:
  pessimistic where the runtime's asynchronous all-reduce really overlaps (NCCL), about right on CPU ranks,
  where gloo's reduction competes for the same cores (measured: nothing hidden, docs/data-parallel-and-precision.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from stagewise.partition.costs import LayerProfile, ParamCounter
from stagewise.partition.solver import ExactSums, check_balance, ranges
from stagewise.schedules import RECOMPUTE, B, Costs, F, I, Schedule, Simulation, W, simulate
from stagewise.schedules.execution import compile_schedule
from stagewise.schedules.programs import OP_CODE


@dataclass(frozen=True)
class SizeProfile:
    """Layer profiles measured at one micro-batch size (`samples` per micro-batch).

    `layers[l].saved_bytes` are what layer l saves for its backward as one stage (the last layer with the
    loss, as the runtime runs it, or apart in `loss_bytes`); `input_bytes` the model input of one micro-batch
    (what the first stage keeps when it recomputes); `noise` the relative spread of the layers' forward +
    backward times between repeated profile runs (see `stagewise.partition.measure`).
    """

    samples: int
    layers: tuple[LayerProfile, ...]
    input_bytes: int = 0
    loss_bytes: int = 0
    noise: float = 0.0
    weight_grad: tuple[float, ...] | None = None  # W seconds per layer as the runtime splits the backward

    def to_dict(self) -> dict:
        return {"samples": self.samples, "layers": [x.to_dict() for x in self.layers],
                "input_bytes": self.input_bytes, "loss_bytes": self.loss_bytes, "noise": self.noise,
                "weight_grad": list(self.weight_grad) if self.weight_grad is not None else None}

    @classmethod
    def from_dict(cls, data: dict) -> SizeProfile:
        layers = tuple(LayerProfile(**{**x, "shared": {int(k): v for k, v in x.get("shared", {}).items()}})
                       for x in data["layers"])
        w = data.get("weight_grad")
        return cls(int(data["samples"]), layers, int(data.get("input_bytes", 0)), int(data.get("loss_bytes", 0)),
                   float(data.get("noise", 0.0)), tuple(w) if w is not None else None)


@dataclass(frozen=True)
class ProfileSet:
    """Profiles of one model at several micro-batch sizes, and the optimizer's cost per parameter."""

    sizes: dict[int, SizeProfile]
    step_per_param: float = 0.0  # optimizer step seconds per parameter
    runs: int = 1  # profile runs per size (the noise estimate needs 2 or more)
    repeats: int = 1  # timed repetitions per layer and run (the fastest counts)
    seconds: float = 0.0  # wall time of the measurement
    meta: dict = field(default_factory=dict)
    # each profile run on its own (its fastest repetitions), per size: what decides ties (see `plan.search`)
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


def ring_factor(replicas: int) -> float:
    """The share of a buffer each rank sends (and receives) in a ring all-reduce of `replicas` ranks."""
    return 2.0 * (replicas - 1) / replicas if replicas > 1 else 0.0


_TRACKED = (F, B, I, W, RECOMPUTE)  # the actions that change what a device holds
SHARING_ROUNDS = 3  # re-simulations under processor sharing (shared cores)


@dataclass(frozen=True)
class Estimate:
    """What a balance is predicted to cost: seconds per step and bytes per device."""

    balance: list[int]
    step_s: float  # the whole step: the schedule, at least the shared cores' floor, then the optimizer step
    makespan_s: float  # the schedule alone, simulated
    bubble: float  # idle share of all devices over the step
    bubble_per_device: list[float]
    busy_s: list[float]  # compute seconds per device in one step (optimizer step included)
    memory: list[float]  # peak bytes per device: parameters and optimizer state, then saved activations
    saved_peak: list[float]  # peak saved-activation bytes per device, as the runtime counts them


class CostModel:
    """Step time and memory of balances under `schedule`, from one `SizeProfile`.

    `bytes_per_param`: weights + gradients + optimizer state per parameter (fp32 Adam: 16); a tied
    parameter counts once per device holding it. `latency`, `bandwidth`: a message between stages on
    different devices costs latency + output bytes / bandwidth. `cores`: how many ranks can compute at
    once (None: all); `replicas`: data-parallel copies of the pipeline sharing those cores; their gradient
    reductions (the schedule's REDUCE actions) move `grad_bytes_per_param` per parameter at `reduce_bandwidth`
    bytes/s in ring units.
    """

    def __init__(self, schedule: Schedule, profile: SizeProfile, *, bytes_per_param: float = 16.0,
                 latency: float = 0.0, bandwidth: float = math.inf, step_per_param: float = 0.0,
                 cores: int | None = None, replicas: int = 1, reduce_bandwidth: float = math.inf,
                 grad_bytes_per_param: float = 4.0):
        self.schedule, self.profile = schedule, profile
        self.layers = list(profile.layers)
        self.bytes_per_param, self.step_per_param = float(bytes_per_param), float(step_per_param)
        self.latency, self.bandwidth = float(latency), float(bandwidth)
        self.cores, self.replicas = cores, replicas
        self.reduce_bandwidth, self.grad_bytes_per_param = float(reduce_bandwidth), float(grad_bytes_per_param)
        L, sc = len(self.layers), schedule
        self.forward = ExactSums([x.forward for x in self.layers])
        self.backward = ExactSums([x.backward for x in self.layers])
        measured = sc.split_backward and all(x.input_grad is not None for x in self.layers)
        self.input_grad = ExactSums([x.input_grad or 0.0 for x in self.layers]) if measured else None
        # W as the runtime runs it (measured apart: I + W can exceed B); else B - I
        w = profile.weight_grad
        self.weight_grad = ExactSums(list(w)) if measured and w is not None else None
        self.params = ParamCounter([x.params for x in self.layers], [x.shared for x in self.layers])
        self._param_prefix = np.concatenate([[0.0], np.cumsum([float(x.params) for x in self.layers])])
        self._act_prefix = np.concatenate([[0], np.cumsum([int(x.saved_bytes) for x in self.layers])]).astype(np.int64)
        self._inputs = np.array([profile.input_bytes] + [x.output_bytes for x in self.layers[:-1]], dtype=np.int64)
        # for the bounds: a layer's least backward (whole, or I + W where split), so no simulation is below them
        least = [x.backward if self.weight_grad is None else min(x.backward, (x.input_grad or 0.0) + wl)
                 for x, wl in zip(self.layers, w or [0.0] * L)]
        self._time_prefix = np.concatenate([[0.0], np.cumsum([x.forward + b for x, b in zip(self.layers, least)])])
        self._fwd_prefix = np.concatenate([[0.0], np.cumsum([x.forward for x in self.layers])])
        self._uses = list(self.params.uses)
        self.num_layers = L
        # per device: the stage of every action that changes what it holds, with (dA, dX): how the bytes held
        # change, in multiples of the stage's activations A and its input X
        self._programs = []
        recomputes = np.zeros(sc.num_stages)
        for d in range(sc.num_devices):
            acts = [a for a in sc.compute_actions(d) if a.op in _TRACKED]
            redone = {(a.stage, a.microbatch) for a in acts if a.op == RECOMPUTE}
            for a in acts:
                recomputes[a.stage] += a.op == RECOMPUTE
            co = [(0, 1) if a.op == F and (a.stage, a.microbatch) in redone else (1, 0) if a.op in (F, RECOMPUTE)
                  else (0, 0) if a.op == I else (-1, -1 if (a.stage, a.microbatch) in redone else 0) for a in acts]
            self._programs.append((np.array([a.stage for a in acts], dtype=np.int64),
                                   np.array(co, dtype=np.int64).reshape(-1, 2)))
        self.recomputes = recomputes  # RECOMPUTE actions per stage
        self._sims: dict[tuple[int, ...], Simulation] = {}

    # ---- time ----

    def stage_times(self, balance: Sequence[int]) -> dict[str, list[float] | None]:
        """Per stage and micro-batch: F, the whole backward B, and its I and W (None without a split)."""
        spans = ranges(balance)
        f = [self.forward(lo, hi) for lo, hi in spans]
        b = [self.backward(lo, hi) for lo, hi in spans]
        i = w = None
        if self.input_grad is not None:
            # The first stage's input needs no gradient: its I is empty and W runs the whole backward.
            i = [0.0 if lo == 0 else self.input_grad(lo, hi) for lo, hi in spans]
            if self.weight_grad is not None:
                w = [b[k] if lo == 0 else self.weight_grad(lo, hi) for k, (lo, hi) in enumerate(spans)]
            else:
                i = [min(x, y) for x, y in zip(i, b)]
                w = [y - x for x, y in zip(i, b)]
        return {"f": f, "b": b, "i": i, "w": w}

    def costs(self, balance: Sequence[int]) -> Costs:
        t = self.stage_times(balance)
        sent = [float(self.layers[hi - 1].output_bytes) for _, hi in ranges(balance)[:-1]]
        return Costs(f=t["f"], b=t["b"], i=t["i"], w=t["w"], latency=self.latency, bytes=sent or 0.0,
                     bandwidth=self.bandwidth, reduce=self.reduce_times(balance))

    def reduce_times(self, balance: Sequence[int]) -> list[float]:
        """Seconds of each stage's gradient reduction over the replicas (0 with one replica)."""
        factor = ring_factor(self.replicas)
        if factor == 0 or self.reduce_bandwidth == math.inf:
            return [0.0] * len(balance)
        return [float(self._param_prefix[hi] - self._param_prefix[lo]) * self.grad_bytes_per_param * factor
                / self.reduce_bandwidth for lo, hi in ranges(balance)]

    def simulation(self, balance: Sequence[int]) -> Simulation:
        """The simulated step; with fewer shared cores than ranks, under processor sharing (see the module)."""
        key = tuple(balance)
        if key not in self._sims:
            costs = self.costs(balance)
            sim = simulate(self.schedule, costs)
            ranks = self.schedule.num_devices * self.replicas
            if self.cores and self.cores < ranks:
                for _ in range(SHARING_ROUNDS):
                    sim = simulate(self.schedule, self._stretched(costs, sim))
            self._sims[key] = sim
        return self._sims[key]

    def _stretched(self, costs: Costs, sim: Simulation) -> Costs:
        """`costs` with every (stage, action kind) stretched by the mean of busy ranks / cores (at least 1) over
        its actions in `sim`."""
        sc = self.schedule
        c = compile_schedule(sc)
        op, stage, device = c.programs.op, c.programs.stage, c.device
        start, end = sim.start, sim.end
        busy = end > start
        mid = (start + end) / 2
        together = np.zeros(len(mid))
        for d in range(sc.num_devices):
            mine = busy & (device == d)
            s, e = np.sort(start[mine]), np.sort(end[mine])
            together += (np.searchsorted(s, mid, side="right") - np.searchsorted(e, mid, side="right")) > 0
        stretch = np.maximum(1.0, together * self.replicas / float(self.cores or 1))
        table = costs.table(sc.num_stages)
        out = {}
        for kind in (F, B, I, W, RECOMPUTE):
            mask = busy & (op == OP_CODE[kind])
            total = np.bincount(stage[mask], weights=stretch[mask], minlength=sc.num_stages)
            count = np.bincount(stage[mask], minlength=sc.num_stages)
            out[kind] = np.where(count > 0, total / np.maximum(count, 1), 1.0)
        base = table[F]
        return Costs(f=[x * k for x, k in zip(base, out[F])], b=[x * k for x, k in zip(table[B], out[B])],
                     i=[x * k for x, k in zip(table[I], out[I])], w=[x * k for x, k in zip(table[W], out[W])],
                     recompute=[x * k for x, k in zip(base, out[RECOMPUTE])], latency=costs.latency,
                     bytes=costs.bytes, bandwidth=costs.bandwidth, reduce=costs.reduce)

    def _work(self, balances: np.ndarray) -> np.ndarray:
        """Compute seconds per stage and step, shape (n, stages): m forwards and backwards, and the recomputes."""
        hi = np.cumsum(balances, axis=1)
        lo = hi - balances
        fwd = self._fwd_prefix[hi] - self._fwd_prefix[lo]
        return (self._time_prefix[hi] - self._time_prefix[lo]) * self.schedule.microbatches + fwd * self.recomputes

    def floors(self, balances: np.ndarray) -> np.ndarray:
        """The shared cores' bound on the schedule's time, shape (n,): every rank's work / cores (0 without
        `cores`)."""
        if not self.cores:
            return np.zeros(balances.shape[0])
        ranks = self.schedule.num_devices * self.replicas
        return self._work(balances).sum(axis=1) * self.replicas / min(self.cores, ranks)

    def device_params(self, balances: np.ndarray) -> np.ndarray:
        """Parameters held per device, shape (n, devices), for balances of shape (n, stages)."""
        hi = np.cumsum(balances, axis=1)
        lo = hi - balances
        per_stage = self._param_prefix[hi] - self._param_prefix[lo]
        P = self.schedule.num_devices
        out = np.zeros((balances.shape[0], P))
        placement = np.asarray(self.schedule.placement)
        for d in range(P):
            out[:, d] = per_stage[:, placement == d].sum(axis=1)
        if self._uses:
            # a tied parameter is held once by every device with a user of it but without its first user
            stage_of = (hi[:, :, None] <= np.arange(self.num_layers)[None, None, :]).sum(axis=1)  # (n, L)
            dev_of = placement[stage_of]
            keys: dict[int, tuple[int, int, list[int]]] = {}
            for layer, key, n, owner in self._uses:
                keys.setdefault(key, (n, owner, []))[2].append(layer)
            for n, owner, users in keys.values():
                for d in range(P):
                    holds = (dev_of[:, users] == d).any(axis=1)
                    out[:, d] += n * (holds & (dev_of[:, owner] != d))
        return out

    def optimizer_times(self, balances: np.ndarray) -> np.ndarray:
        """Seconds of the optimizer step per device, shape (n, devices)."""
        return self.device_params(balances) * self.step_per_param

    def busiest(self, balances: np.ndarray) -> np.ndarray:
        """The busiest device's compute per step, shape (n,): no simulation of a balance is shorter (slightly
        lowered, so that float rounding never lifts it above the simulated makespan)."""
        work = self._work(balances)
        placement = np.asarray(self.schedule.placement)
        per_device = np.stack([work[:, placement == d].sum(axis=1) for d in range(self.schedule.num_devices)], axis=1)
        return per_device.max(axis=1) * (1.0 - 1e-9)

    def lower_bounds(self, balances: np.ndarray) -> np.ndarray:
        """A bound no balance's predicted step goes below: the busiest device's work, the cores' floor, then
        the optimizer step."""
        bound = np.maximum(self.busiest(balances), self.floors(balances))
        return (bound + self.optimizer_times(balances).max(axis=1)) * (1.0 - 1e-9)

    # ---- memory ----

    def activation_peaks(self, balances: np.ndarray) -> np.ndarray:
        """Peak saved-activation bytes per device, shape (n, devices), swept over each device's program in order
        (the loss's on the last stage, held from its forward to its backward)."""
        hi = np.cumsum(balances, axis=1)
        lo = hi - balances
        act = (self._act_prefix[hi] - self._act_prefix[lo]).astype(np.float64)
        act[:, -1] += self.profile.loss_bytes
        x = self._inputs[lo].astype(np.float64)
        out = np.zeros((balances.shape[0], self.schedule.num_devices))
        for d, (st, co) in enumerate(self._programs):
            if len(st):
                level = np.cumsum(act[:, st] * co[:, 0] + x[:, st] * co[:, 1], axis=1)
                out[:, d] = np.maximum(0.0, level.max(axis=1))
        return out

    def memory(self, balances: np.ndarray) -> np.ndarray:
        """Peak bytes per device, shape (n, devices): parameter state plus saved activations."""
        return self.device_params(balances) * self.bytes_per_param + self.activation_peaks(balances)

    # ---- one balance ----

    def estimate(self, balance: Sequence[int]) -> Estimate:
        balance = check_balance(balance, self.num_layers, self.schedule.num_stages)
        arr = np.array([balance], dtype=np.int64)
        sim = self.simulation(balance)
        opt = self.optimizer_times(arr)[0]
        step = max(sim.makespan, float(self.floors(arr)[0])) + float(opt.max())
        # busy is compute: a device's gradient reductions (REDUCE actions) are communication
        reduce = np.bincount(np.asarray(self.schedule.placement), weights=self.reduce_times(balance),
                             minlength=self.schedule.num_devices)
        busy = [(1.0 - b) * sim.makespan + o - r for b, o, r in zip(sim.bubble_per_device, opt.tolist(), reduce)]
        per_device = [1.0 - x / step if step > 0 else 0.0 for x in busy]
        peaks = self.activation_peaks(arr)[0]
        memory = self.device_params(arr)[0] * self.bytes_per_param + peaks
        return Estimate(balance, step, sim.makespan, float(np.mean(per_device)), per_device, busy, memory.tolist(),
                        peaks.tolist())
