"""Helpers shared by the benchmarks (the scripts import this file from their own folder).

* The model and batch: a GPT (`gpt2_layers`) shaped by a settings object with `n_layer`, `n_embd`,
  `n_head`, `vocab`, `seq_len`, `batch`, `seed` (and optionally `tie`, default True), built with the
  same initial weights everywhere, and a fixed batch of random token ids.
* `SingleProcess`: the unpipelined baseline (nn.Sequential forward, backward, Adam step).
* `timed`, `spread`: timing and "median [min-max]".
* `analyse`: one measured step against the simulator's ideal from the measured per-action costs (read off the
  trace by `stagewise.measure.trace_costs`, the one place that does), and the measured bubbles against the
  simulated ones; `activation_peaks`: measured peak saved-activation bytes per device against the simulator's
  prediction.
* `bench_meta` (with `machine`), `write_jsonl`: the JSON lines records (docs/benchmarks.md is generated from
  them by `pages.py`).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.measure.trace_costs import held_peaks, saved_peaks, step_costs
from stagewise.models.gpt2 import GPT2Config, config, gpt2_layers, lm_loss
from stagewise.schedules import F, Schedule, Simulation, simulate
from stagewise.schedules.timeline import Timeline


@dataclass
class ModelSettings:
    """The benchmark GPT (embedding, 8 blocks of d256 with 4 heads, an untied head with an 8k vocabulary) on a
    batch of 16 x 128 token ids, and the Adam learning rate: the fields `build_layers` and `make_batch` read."""

    n_layer: int = 8
    n_embd: int = 256
    n_head: int = 4
    vocab: int = 8192
    seq_len: int = 128
    batch: int = 16
    seed: int = 0
    lr: float = 1e-4
    tie: bool = False


def model_config(s: Any) -> GPT2Config:
    return config("gpt2-mini", n_layer=s.n_layer, n_embd=s.n_embd, n_head=s.n_head, vocab_size=s.vocab,
                  n_positions=s.seq_len, tie_word_embeddings=getattr(s, "tie", True))


def build_layers(s: Any) -> list[nn.Module]:
    """The model, with the same initial weights in every process and configuration."""
    torch.manual_seed(s.seed)
    return gpt2_layers(model_config(s))


def make_batch(s: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """Random token ids and labels from a fixed seed (the same on every rank)."""
    gen = torch.Generator().manual_seed(s.seed + 1)
    inputs = torch.randint(0, s.vocab, (s.batch, s.seq_len), generator=gen)
    labels = torch.randint(0, s.vocab, (s.batch, s.seq_len), generator=gen)
    return inputs, labels


class SingleProcess:
    """The baseline: plain nn.Sequential forward, backward and Adam step in this process, under the same
    malloc settings a stagewise `Pipeline` sets on CPU (`keep_freed_host_memory`), so that they compare fairly."""

    def __init__(self, s: Any):
        from stagewise.runtime.host_memory import keep_freed_host_memory

        keep_freed_host_memory()
        self.model = nn.Sequential(*build_layers(s))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=s.lr)

    def step(self, batch: tuple[torch.Tensor, torch.Tensor]) -> float:
        self.optimizer.zero_grad(set_to_none=True)
        loss = lm_loss(self.model(batch[0]), batch[1])
        loss.backward()
        self.optimizer.step()
        return loss.item()


def timed(fn: Callable[[], Any], n: int) -> list[float]:
    """Seconds of each of `n` calls."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def spread(values: Sequence[float], spec: str = ".3f") -> str:
    """Median [min-max]."""
    return f"{statistics.median(values):{spec}} [{min(values):{spec}}-{max(values):{spec}}]"


def analyse(trace: Timeline, schedule: Schedule, step_wall: float, with_step: bool = False) -> dict[str, Any]:
    """`analyse_with_sim` without the simulation."""
    return analyse_with_sim(trace, schedule, step_wall, with_step)[0]


def analyse_with_sim(trace: Timeline, schedule: Schedule, step_wall: float,
                     with_step: bool = False) -> tuple[dict[str, Any], Simulation]:
    """Per-stage mean F/B (I/W) compute, the simulated ideal, and measured against simulated bubbles, of one step.

    The measured per-stage means of each compute action (they exclude time spent waiting for a
    peer; `stagewise.measure.trace_costs.step_costs`) are fed to `simulate`. With `with_step` every device's
    optimizer STEP counts too (its measured seconds as that device's step in the simulation, and as busy time in
    the measured bubble); without, the ideal is the F/B schedule alone. Returns the ideal makespan (`ideal_s`),
    the measured and simulated bubble per device, and per-device busy, wait-for-peer and STEP seconds; and the
    simulation.
    """
    measured = step_costs(trace, schedule)
    sim = simulate(schedule, measured.costs(step=with_step))
    busy = [x + y for x, y in zip(measured.compute, measured.step)] if with_step else list(measured.compute)
    out = {
        "f_s": measured.f, "b_s": measured.b, "ideal_s": sim.makespan, "traced_step_s": step_wall,
        "trace_span_s": trace.makespan, "outside_trace_s": step_wall - trace.makespan,
        "bubble_measured": [1.0 - x / step_wall for x in busy], "bubble_simulated": list(sim.bubble_per_device),
        "busy_s": busy, "wait_s": measured.wait, "step_action_s": measured.step,
    }
    if schedule.split_backward:
        out.update(i_s=measured.i, w_s=measured.w)
    return out, sim


def activation_peaks(trace: Timeline, schedule: Schedule, sim: Simulation) -> dict[str, list[float]]:
    """Saved-activation bytes per device: measured peak (from the forwards' `saved_bytes` in the trace)
    against the simulator's `peak_inflight` x the device's measured saved bytes per micro-batch (summed
    over its virtual_stages, as `peak_inflight` counts whole-stage units), and against the simulated timeline
    swept with each (stage, micro-batch)'s measured bytes (`predicted_swept`, exact for unequal virtual_stages)."""
    rows = list(range(schedule.num_devices))
    measured = saved_peaks(trace, rows)
    per_stage: dict[int, list[float]] = {}
    by_key: dict[tuple[int, int], float] = {}
    for e in trace.events:
        if e.op == F:
            per_stage.setdefault(e.stage, []).append(float(e.extra.get("saved_bytes", 0)))
            by_key[(e.stage, e.microbatch)] = float(e.extra.get("saved_bytes", 0))
    per_mb = [0.0] * schedule.num_devices
    for s, values in per_stage.items():
        per_mb[schedule.placement[s]] += statistics.fmean(values)
    predicted = [sim.peak_inflight[d] * per_mb[d] for d in range(schedule.num_devices)]
    swept = held_peaks(sim.timeline.events, rows, lambda e: by_key.get((e.stage, e.microbatch), 0.0))
    return {"saved_peak_bytes": measured, "saved_per_mb_bytes": per_mb, "peak_inflight": list(sim.peak_inflight),
            "saved_predicted_bytes": predicted, "saved_predicted_swept_bytes": swept}


def machine() -> dict[str, Any]:
    """What the numbers were measured on (docs/benchmarks.md states it): CPU model, cores, GPU, Python."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next((line.split(":", 1)[1].strip() for line in fh if line.startswith("model name")), cpu)
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "gpu": gpu, "python": platform.python_version(),
            "load_1min": round(os.getloadavg()[0], 2)}  # what else ran: on a shared machine the numbers move


def bench_meta(bench: str, settings: dict[str, Any]) -> dict[str, Any]:
    return {"bench": bench, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "torch": torch.__version__,
            "host": platform.node(), "machine": machine(), "settings": settings}


def write_jsonl(path: Path, meta: dict[str, Any], records: Iterable[dict[str, Any]],
                summaries: Iterable[dict[str, Any]], **extra: Any) -> int:
    """Append one line per round record and per summary; returns the number of lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("a") as fh:
        for kind, rows in (("round", records), ("summary", summaries)):
            for row in rows:
                fh.write(json.dumps({**meta, **extra, "kind": kind, **row}, default=str) + "\n")
                n += 1
    return n


__all__ = ["SingleProcess", "activation_peaks", "analyse", "analyse_with_sim", "bench_meta", "build_layers", "lm_loss",
           "make_batch", "model_config", "spread", "timed", "write_jsonl"]


def add_run_args(parser: Any, *, steps: int, warmup: int, vocab: int) -> None:
    """The timing and model options every benchmark shares (the model: a GPT of GPT-2 blocks)."""
    parser.add_argument("--steps", type=int, default=steps, help="timed steps per configuration and round")
    parser.add_argument("--repeats", type=int, default=3, help="rounds over all configurations")
    parser.add_argument("--warmup", type=int, default=warmup, help="untimed steps per configuration at the start")
    add_model_args(parser, vocab=vocab)


def add_model_args(parser: Any, *, vocab: int) -> None:
    """The benchmark model and batch: a GPT of GPT-2 blocks on random token ids."""
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--n-embd", type=int, default=256)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=vocab)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
