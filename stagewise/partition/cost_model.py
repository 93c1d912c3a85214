"""The one cost model: step time and device memory of a balance under a schedule (activation checkpointing, data
parallelism, the optimizer step and tied parameters included), from layer profiles of one micro-batch size. No
torch.

Everything that asks what a balance costs asks this model: the planner (`plan_search`) about every candidate it
keeps, `auto` (`auto_balance.Planner`) about the balances of one schedule, the partition table. It models:

- **Compute**: the schedule simulated (`stagewise.schedules.simulate`) with every stage's F, B, I, W summed over
  its layers; W as the runtime runs it where measured apart (I + W can exceed B), else B - I. A message between
  stages on different devices costs latency + bytes / bandwidth (the link model).
- **Recompute** comes in the schedule: `with_recompute(schedule, mode)` puts a RECOMPUTE action before the
  backward of every forward that keeps only its stage's input (`stagewise.schedules.recompute`). The
  simulator times a RECOMPUTE as the stage's forward; the memory sweep counts what the runtime holds: a
  forward that recomputes holds its stage's input X, its RECOMPUTE adds the stage's activations A (held
  until the last backward piece, so a split backward's W reuses them), the last piece frees both.
- **The loss** saves tensors too (a cross-entropy over a large vocabulary keeps its log-probabilities, often the
  largest activation of the model); the runtime computes it inside the last stage's forward and counts it
  there, and so does this model (`SizeProfile.loss_bytes`, or inside the last layer's `saved_bytes`).
- **The optimizer step** is every device's STEP action on the simulated timeline, as on the measured one:
  `step_per_param` seconds x the parameters the device holds (a tied copy included), so the device holding a
  large LM head steps longest. `step_per_param` is measured, not derived from bytes: an AdamW step on one flat
  float32 tensor of the model's size, per parameter (`stagewise.measure.planner_profiles`).
- **Tied parameters** (GPT-2's embedding and LM head on different devices): at the step, the devices holding a
  copy all-reduce its gradient before their optimizer steps (the runtime's `SyncTiedGrads`). The all-reduce
  starts once every holder has finished its other work and costs, by the link model, 2 (k - 1) x latency +
  2 (k - 1) / k x gradient bytes / bandwidth for k holders (`allreduce_seconds`). It lies inside the holders'
  STEP events (`tie_wait_s`, `tie_sync_s` in their extras), as it lies inside the measured STEP.
- **Shared cores.** With `cores`, ranks that share C cores (CPU ranks of one machine) cannot compute more than C
  at once: the step is at least all ranks' work (optimizer steps included) / C, and each action is stretched by
  the number of ranks busy beside it / C (processor sharing, found by re-simulating with the stretch the
  previous timeline implies, a few times; per stage and action kind, averaged).
- **Data parallelism.** With D replicas the schedule carries a REDUCE action per stage (`with_reductions`),
  simulated as 2 (D - 1) / D x the stage's gradient bytes / `reduce_bandwidth` (measured on the run's world,
  `stagewise.measure.links`); the replicas also share the cores. The simulator runs a REDUCE on its device's
  timeline, so a device with several stages computes nothing while one of its stages reduces: pessimistic
  where the runtime's asynchronous all-reduce really overlaps (NCCL), about right on CPU ranks, where gloo's
  reduction competes for the same cores (measured: nothing hidden, docs/data-parallel-and-precision.md).
- **Memory**: parameters, gradients and optimizer state (`bytes_per_param`, a tied parameter once per device
  holding it), plus the saved activations swept over each device's action list (`memory.holding_events`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from stagewise.partition.layers import ParamCounter
from stagewise.partition.memory import holding_events
from stagewise.partition.profiles import SizeProfile
from stagewise.partition.solver import ExactSums, check_balance, ranges
from stagewise.schedules import RECOMPUTE, B, Costs, F, I, Schedule, Simulation, W, simulate
from stagewise.schedules.execution import compile_schedule
from stagewise.schedules.programs import OP_CODE

SHARING_ROUNDS = 3  # re-simulations under processor sharing (shared cores)
SLACK = 1.0 - 1e-9  # lowers a bound so that float rounding never lifts it above the simulated step

TieSync = tuple[tuple[int, ...], float]  # (devices holding a copy of a tied parameter, seconds of its all-reduce)


def ring_factor(replicas: int) -> float:
    """The share of a buffer each rank sends (and receives) in a ring all-reduce of `replicas` ranks."""
    return 2.0 * (replicas - 1) / replicas if replicas > 1 else 0.0


def allreduce_seconds(nbytes: float, ranks: int, latency: float, bandwidth: float) -> float:
    """Seconds of a ring all-reduce of `nbytes` over `ranks` ranks by the link model: 2 (ranks - 1) messages of
    nbytes / ranks each, every one at latency + bytes / bandwidth (0 for one rank)."""
    if ranks < 2:
        return 0.0
    return 2 * (ranks - 1) * latency + ring_factor(ranks) * nbytes / bandwidth


def least_layer_work(profile: SizeProfile, split: bool = True) -> np.ndarray:
    """Seconds per layer no simulation runs one micro-batch's forward and backward in less: F + B, or with `split`
    (the backward run as I then W, W measured apart) F + the lesser of B and I + W."""
    w = profile.weight_grad
    return np.array([x.forward + (min(x.backward, (x.input_grad or 0.0) + wl) if split and w is not None
                                  else x.backward)
                     for x, wl in zip(profile.layers, w or [0.0] * len(profile.layers))], dtype=np.float64)


def time_floor(per_device: np.ndarray, ranks: int, replicas: int, cores: int | None) -> np.ndarray:
    """The least step, shape (n,), of work `per_device` (seconds, shape (n, devices), one replica's devices): the
    busiest device's work, and with `cores` shared by `ranks` ranks (every replica's), all their work / cores."""
    bound = per_device.max(axis=1)
    if cores:
        bound = np.maximum(bound, per_device.sum(axis=1) * replicas / min(cores, ranks))
    return bound


def configuration_bound(profile: SizeProfile, microbatches: int, recompute: str, devices: int, *, replicas: int = 1,
                        cores: int | None = None, step_per_param: float = 0.0) -> float:
    """A step no balance of one configuration (schedule, m, recompute mode) goes below, known before its schedule
    is built: m micro-batches' least work of every layer (a forward more each with "always" recompute) and the
    optimizer step of every parameter, spread evenly over the devices (`time_floor`, shared cores included)."""
    work = least_layer_work(profile)
    if recompute == "always":
        work = work + np.array([x.forward for x in profile.layers])
    total = microbatches * float(work.sum()) + step_per_param * sum(x.params for x in profile.layers)
    return float(time_floor(np.full((1, devices), total / devices), devices * replicas, replicas, cores)[0])


@dataclass(frozen=True)
class Estimate:
    """What a balance is predicted to cost: seconds per step and bytes per device."""

    balance: list[int]
    step_s: float  # the whole step: the simulated schedule with its optimizer steps, at least the shared cores' floor
    makespan_s: float  # the simulated timeline alone (compute, reductions, tie syncs and optimizer steps)
    bubble: float  # idle share of all devices over the step
    bubble_per_device: list[float]
    busy_s: list[float]  # per device: compute and the STEP (tie sync and optimizer), as a measured trace counts it
    memory: list[float]  # peak bytes per device: parameters and optimizer state, then saved activations
    saved_peak: list[float]  # peak saved-activation bytes per device, as the runtime counts them
    optimizer_s: list[float]  # the optimizer step per device
    tie_sync_s: float  # the tied parameters' gradient all-reduces, summed


class CostModel:
    """Step time and memory of balances under `schedule`, from one `SizeProfile` (see the module docstring).

    `bytes_per_param`: weights + gradients + optimizer state per parameter (fp32 Adam: 16). `latency` (s),
    `bandwidth` (bytes/s): the link between devices, for messages between stages and tied-parameter
    all-reduces. `step_per_param`: optimizer seconds per parameter. `cores`: how many ranks can compute at once
    (None: all); `replicas`: data-parallel copies of the pipeline sharing those cores; their gradient
    reductions (the schedule's REDUCE actions) move `grad_bytes_per_param` per parameter at `reduce_bandwidth`
    bytes/s in ring units. A tied parameter's gradient is `grad_bytes_per_param` per element too.
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
        sc, L = schedule, len(self.layers)
        self.num_layers = L
        self.forward = ExactSums([x.forward for x in self.layers])
        self.backward = ExactSums([x.backward for x in self.layers])
        measured = sc.split_backward and all(x.input_grad is not None for x in self.layers)
        self.input_grad = ExactSums([x.input_grad or 0.0 for x in self.layers]) if measured else None
        # W as the runtime runs it (measured apart: I + W can exceed B); else B - I
        w = profile.weight_grad
        self.weight_grad = ExactSums(list(w)) if measured and w is not None else None
        self.params = ParamCounter([x.params for x in self.layers], [x.shared for x in self.layers])
        self._tied = self.params.tied()
        self._param_prefix = _prefix([float(x.params) for x in self.layers])
        self._act_prefix = np.concatenate([[0], np.cumsum([int(x.saved_bytes) for x in self.layers])]).astype(np.int64)
        self._inputs = np.array([profile.input_bytes] + [x.output_bytes for x in self.layers[:-1]], dtype=np.int64)
        # for the bounds: a layer's least work, so that no simulation is below them
        self._time_prefix = _prefix(least_layer_work(profile, split=self.weight_grad is not None))
        self._fwd_prefix = _prefix([x.forward for x in self.layers])
        self._placement = np.asarray(sc.placement, dtype=np.int64)
        self._holding = holding_events(sc)
        p = sc.programs
        self.recomputes = np.bincount(p.stage[p.op == OP_CODE[RECOMPUTE]], minlength=sc.num_stages)  # per stage
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
        """What `simulate` needs for `balance`: stage times, messages, reductions, optimizer steps, tie syncs."""
        t = self.stage_times(balance)
        sent = [float(self.layers[hi - 1].output_bytes) for _, hi in ranges(balance)[:-1]]
        step = self.optimizer_times(np.array([list(balance)], dtype=np.int64))[0].tolist()
        return Costs(f=t["f"], b=t["b"], i=t["i"], w=t["w"], step=step, tie_sync=self.tie_syncs(balance),
                     latency=self.latency, bytes=sent or 0.0, bandwidth=self.bandwidth,
                     reduce=self.reduce_times(balance))

    def reduce_times(self, balance: Sequence[int]) -> list[float]:
        """Seconds of each stage's gradient reduction over the replicas (0 with one replica)."""
        factor = ring_factor(self.replicas)
        if factor == 0 or self.reduce_bandwidth == math.inf:
            return [0.0] * len(balance)
        return [float(self._param_prefix[hi] - self._param_prefix[lo]) * self.grad_bytes_per_param * factor
                / self.reduce_bandwidth for lo, hi in ranges(balance)]

    def tie_syncs(self, balance: Sequence[int]) -> tuple[TieSync, ...]:
        """The tied parameters' gradient all-reduces at the step, one per parameter whose users sit on several
        devices: (those devices, seconds by the link model). None for an asynchronous schedule (the runtime refuses
        ties there)."""
        if self.schedule.asynchronous:
            return ()
        stage_of = np.repeat(np.arange(len(balance)), balance)
        out = []
        for _, (n, users) in sorted(self._tied.items()):
            devices = tuple(sorted({int(self._placement[stage_of[u]]) for u in users}))
            if len(devices) > 1:
                seconds = allreduce_seconds(n * self.grad_bytes_per_param, len(devices), self.latency, self.bandwidth)
                out.append((devices, seconds))
        return tuple(out)

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
        """`costs` with every (stage, compute kind) stretched by the mean of busy ranks / cores (at least 1) over
        its actions in `sim` (a rank in its STEP counts as busy: the optimizer computes)."""
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
        return replace(costs, f=[x * k for x, k in zip(base, out[F])], b=[x * k for x, k in zip(table[B], out[B])],
                       i=[x * k for x, k in zip(table[I], out[I])], w=[x * k for x, k in zip(table[W], out[W])],
                       recompute=[x * k for x, k in zip(base, out[RECOMPUTE])])

    def _work(self, balances: np.ndarray) -> np.ndarray:
        """Least compute seconds per stage and step, shape (n, stages): m forwards and backwards, the recomputes."""
        hi = np.cumsum(balances, axis=1)
        lo = hi - balances
        fwd = self._fwd_prefix[hi] - self._fwd_prefix[lo]
        return (self._time_prefix[hi] - self._time_prefix[lo]) * self.schedule.microbatches + fwd * self.recomputes

    def device_work(self, balances: np.ndarray) -> np.ndarray:
        """Least seconds each device works per step, shape (n, devices): its stages' compute, its optimizer step."""
        work = self._work(balances)
        per_device = np.stack([work[:, self._placement == d].sum(axis=1) for d in range(self.schedule.num_devices)],
                              axis=1)
        return per_device + self.optimizer_times(balances)

    def floors(self, balances: np.ndarray) -> np.ndarray:
        """The shared cores' bound on the step, shape (n,): every rank's work / cores (0 without `cores`)."""
        if not self.cores:
            return np.zeros(balances.shape[0])
        ranks = self.schedule.num_devices * self.replicas
        return self.device_work(balances).sum(axis=1) * self.replicas / min(self.cores, ranks)

    def busiest(self, balances: np.ndarray) -> np.ndarray:
        """The busiest device's least work per step, shape (n,): no simulation of a balance is shorter."""
        return self.device_work(balances).max(axis=1) * SLACK

    def lower_bounds(self, balances: np.ndarray) -> np.ndarray:
        """A bound no balance's predicted step goes below, shape (n,): `time_floor` of the devices' work."""
        ranks = self.schedule.num_devices * self.replicas
        return time_floor(self.device_work(balances), ranks, self.replicas, self.cores) * SLACK

    def device_params(self, balances: np.ndarray) -> np.ndarray:
        """Parameters held per device, shape (n, devices), for balances of shape (n, stages)."""
        hi = np.cumsum(balances, axis=1)
        lo = hi - balances
        per_stage = self._param_prefix[hi] - self._param_prefix[lo]
        P = self.schedule.num_devices
        out = np.zeros((balances.shape[0], P))
        placement = self._placement
        for d in range(P):
            out[:, d] = per_stage[:, placement == d].sum(axis=1)
        if self._tied:
            # a tied parameter is held once by every device with a user of it but without its first user
            stage_of = (hi[:, :, None] <= np.arange(self.num_layers)[None, None, :]).sum(axis=1)  # (n, L)
            dev_of = placement[stage_of]
            for n, users in self._tied.values():
                for d in range(P):
                    holds = (dev_of[:, users] == d).any(axis=1)
                    out[:, d] += n * (holds & (dev_of[:, users[0]] != d))
        return out

    def optimizer_times(self, balances: np.ndarray) -> np.ndarray:
        """Seconds of the optimizer step per device, shape (n, devices)."""
        return self.device_params(balances) * self.step_per_param

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
        for d, ev in enumerate(self._holding):
            if len(ev):
                st = ev[:, 0]
                level = np.cumsum(act[:, st] * ev[:, 1] + x[:, st] * ev[:, 2], axis=1)
                out[:, d] = np.maximum(0.0, level.max(axis=1))
        return out

    def memory(self, balances: np.ndarray) -> np.ndarray:
        """Peak bytes per device, shape (n, devices): parameter state plus saved activations."""
        return self.device_params(balances) * self.bytes_per_param + self.activation_peaks(balances)

    # ---- one balance ----

    def estimate(self, balance: Sequence[int]) -> Estimate:
        """Everything predicted for one balance (see `Estimate`)."""
        balance = check_balance(balance, self.num_layers, self.schedule.num_stages)
        arr = np.array([balance], dtype=np.int64)
        sim = self.simulation(balance)
        step = max(sim.makespan, float(self.floors(arr)[0]))
        # busy is compute and the STEP: a device's gradient reductions (REDUCE actions) are communication
        reduce = np.bincount(self._placement, weights=self.reduce_times(balance),
                             minlength=self.schedule.num_devices)
        busy = [(1.0 - b) * sim.makespan - r for b, r in zip(sim.bubble_per_device, reduce.tolist())]
        per_device = [1.0 - x / step if step > 0 else 0.0 for x in busy]
        peaks = self.activation_peaks(arr)[0]
        memory = self.device_params(arr)[0] * self.bytes_per_param + peaks
        return Estimate(balance, step, sim.makespan, float(np.mean(per_device)), per_device, busy, memory.tolist(),
                        peaks.tolist(), self.optimizer_times(arr)[0].tolist(),
                        sum(s for _, s in self.tie_syncs(balance)))


def _prefix(values: Sequence[float]) -> np.ndarray:
    return np.concatenate([[0.0], np.cumsum(np.asarray(values, dtype=np.float64))])
