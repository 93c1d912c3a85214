"""The timed rounds of `bench_vs_torch.py`: `worker` runs in each spawned process (imported from here by module
name, so `spawn` can pickle it) and alternates the pipelines of every configuration; `_block` times one block."""

from __future__ import annotations

import time
from typing import Any

from vs_torch_pipes import TORCH_SCHEDULES, Settings, SingleThreads, TorchPipe, torch_supports

# torch and stagewise are imported inside the functions so that `stagewise --help` stays fast.


def _block(fn: Any, n: int, warm: int) -> tuple[float, list[float], list[float]]:
    """`warm` untimed steps, then n consecutive steps and a barrier: (seconds per step, each timed step's
    own seconds on this rank, each untimed step's seconds)."""
    import torch.distributed as dist
    from _common import timed

    warm_times = timed(fn, warm)
    dist.barrier()
    t0 = time.perf_counter()
    times = timed(fn, n)
    dist.barrier()
    return (time.perf_counter() - t0) / n, times, warm_times


def worker(rank: int, world: int, s: Settings) -> dict[str, Any] | None:
    """One pipeline size in this process: the single-process baseline, then per configuration its pipelines (first
    losses, warm-up, alternating timed rounds); rank 0 returns the records, first losses, info and plans."""
    import gc

    import torch
    import torch.distributed as dist
    from _common import SingleProcess, activation_peaks, analyse_with_sim, build_layers, lm_loss, make_batch, timed
    from torch import nn

    from stagewise.partition import resolve_balance
    from stagewise.pipeline import Pipeline
    from stagewise.schedules import build

    torch.set_num_threads(1)
    batch = make_batch(s)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    torch_group = dist.new_group(list(range(world)))  # torch's P2P on its own communicator

    def adam(params: list[nn.Parameter]) -> torch.optim.Optimizer:
        return torch.optim.Adam(params, lr=s.lr)

    # The single-process baseline first: timed between the rounds, the block right after it was often much
    # slower, whichever library it was.
    first: dict[str, dict[str, float]] = {}
    single_s: list[float] = []
    records: list[dict[str, Any]] = []
    if rank == 0:
        single = SingleProcess(s)
        first["single"] = {"single": single.step(batch)}
        single_s = timed(lambda: single.step(batch), s.repeats)
        records += [{"config": "single", "library": "single", "round": r, "step_s": t} for r, t in enumerate(single_s)]
        del single
    dist.barrier()

    info: dict[str, dict[str, Any]] = {}
    plans: dict[str, Any] = {}
    planned = single_n = None
    if s.planner:
        t0 = time.perf_counter()
        planned = Pipeline(build_layers(s), lm_loss, schedule="auto", microbatches="auto", partition="auto",
                           sample=batch, optimizer=adam, timeout=s.timeout, show_partition=False)
        c = planned.plan.choice
        info["planner"] = {"schedule": c.schedule, "microbatches": c.microbatches, "virtual_stages": c.virtual_stages,
                           "partition": "planner", "balance": list(c.balance), "recompute": c.recompute,
                           "build_s": time.perf_counter() - t0}
        plans = {"planner": planned.plan.to_dict()}
        first["planner"] = {"stagewise": float(planned.train_step(batch))}
    if s.single_threads > 1:
        single_n = SingleThreads(s, rank, s.single_threads)
    for sc, m in s.configs:
        # One configuration at a time, its pipelines alternating (stagewise even, torch even, stagewise auto),
        # then freed: a process holds what one training run holds, and the ratios compare neighbouring blocks.
        pipes: dict[tuple[str, str], Any] = {}  # (config name, library) -> object with train_step
        name = f"{sc} m={m}"
        num_stages = build(sc, world, m).num_stages
        balance = resolve_balance("uniform", s.n_layer + 2, num_stages)
        sw = None
        if s.even:
            sw = Pipeline(build_layers(s), lm_loss, schedule=sc, microbatches=m, partition=balance, optimizer=adam,
                          timeout=s.timeout, show_partition=False)
            pipes[(name, "stagewise")] = sw
            if s.compile:  # the same pipeline with compiled stages, in the same rotation
                pipes[(name + " compiled", "stagewise")] = Pipeline(
                    build_layers(s), lm_loss, schedule=sc, microbatches=m, partition=balance, optimizer=adam,
                    timeout=s.timeout, show_partition=False, compile=True)
                info[name + " compiled"] = {"schedule": sc, "microbatches": m, "partition": "even", "torch": "compiled",
                                            "balance": list(balance), "compiled": True}
        placement = build(sc, world, m).placement
        info[name] = {"schedule": sc, "microbatches": m, "partition": "even", "balance": list(balance)}
        why = torch_supports(sc, world, m) if s.torch_side else "--tie: torch has no cross-stage ties"
        if why is None:
            pipes[(name, "torch")] = TorchPipe(build_layers(s), balance, placement, sc, m, rank,
                                               torch_group, s.lr, lm_loss)
        info[name]["torch"] = why or TORCH_SCHEDULES[sc]
        if s.auto:
            t0 = time.perf_counter()
            pipes[(name + " auto", "stagewise")] = Pipeline(
                build_layers(s), lm_loss, schedule=sc, microbatches=m, partition="auto", sample=batch, optimizer=adam,
                timeout=s.timeout, show_partition=False)
            info[name + " auto"] = {"schedule": sc, "microbatches": m, "partition": "auto", "torch": None,
                                    "balance": list(pipes[(name + " auto", "stagewise")].balance),
                                    "build_s": time.perf_counter() - t0}
        # The first step runs from the initial weights: the losses must agree.
        for (key, lib), pipe in pipes.items():
            if lib == "stagewise":
                value = float(pipe.train_step(batch))
            else:
                got = pipe.train_step(batch)
                buf = torch.tensor([got if got is not None else 0.0], dtype=torch.float64)
                dist.broadcast(buf, src=placement[-1])
                value = float(buf[0])
            first.setdefault(key, {})[lib] = value
        if planned is not None:  # the planner's pipeline and the n-thread process alternate with these too
            pipes[(f"planner@{name}", "stagewise")] = planned
            info[f"planner@{name}"] = info["planner"]
        if single_n is not None:
            pipes[(f"single{s.single_threads}@{name}", "single-threads")] = single_n
        for pipe in pipes.values():
            for _ in range(max(0, s.warmup - 1)):
                pipe.train_step(batch)
        order = list(pipes)
        for r in range(s.repeats):
            for key, lib in (order if r % 2 == 0 else order[::-1]):
                pipe = pipes[(key, lib)]
                step_s, times, warm = _block(lambda p=pipe: p.train_step(batch), s.steps, s.block_warmup)
                rec: dict[str, Any] = {"config": key, "library": lib, "round": r, "step_s": step_s,
                                       "step_times_s": times, "untimed_step_times_s": warm, **info.get(key, {})}
                if lib == "stagewise":
                    trace = pipe.last_trace()  # a collective: every rank calls it
                    if rank == 0:
                        a, sim = analyse_with_sim(trace, pipe.schedule, times[-1], with_step=True)
                        rec.update(a)
                        rec.update(activation_peaks(trace, pipe.schedule, sim))
                if rank == 0:
                    records.append(rec)
        for pipe in pipes.values():
            if isinstance(pipe, Pipeline) and pipe is not planned:
                pipe.close()
        del pipes, sw, pipe
        gc.collect()
        dist.barrier()
    if planned is not None:
        planned.close()
    if rank != 0:
        return None
    return {"records": records, "first_loss": first, "info": info, "plans": plans}
