"""stagewise against torch.distributed.pipelining: the same model, weights, batch, partition and threads.

For each pipeline size P (one process per device, one intra-op thread each, gloo, started with
`spawn`) the SAME spawned processes build, per configuration (schedule, m):

* a stagewise `Pipeline` with an explicit balance (stagewise's "uniform" cut, which is what both
  libraries get), and
* a torch.distributed.pipelining pipeline with that balance: one manual `PipelineStage` per stage
  over the same layers (fresh copies with the same initial weights), on the same stage-to-device
  placement, under the matching schedule class: gpipe -> ScheduleGPipe, 1f1b -> Schedule1F1B,
  interleaved -> ScheduleInterleaved1F1B (2 stages per rank, looped), zbv -> ScheduleZBVZeroBubble
  (2 stages per rank in a V). Losses are micro-batch means and torch scales the gradients by 1/m
  (`scale_grads=True`), which is stagewise's weighting for equal micro-batches.

Both train with Adam on one fixed batch of 16 x 128 random token ids (fixed seed) of a GPT
(embedding, 8 GPT-2 blocks of d256 with 4 heads, head with an 8k vocabulary; the head is NOT tied
to the embedding by default, since torch.distributed.pipelining has no cross-stage ties; `--tie`
ties it for stagewise only and skips torch).

Checks and measurements:

* Every process runs under the malloc settings a stagewise `Pipeline` sets on CPU (process-wide, see
  `stagewise.runtime.host_memory`): torch's pipeline and the single process too, so they compare fairly.
* The first step of every pipeline runs from the initial weights: its loss is printed for both
  libraries and the single-process model and must agree within 1e-5 (relative, float32).
* Timing alternates the libraries (A B A B, the order swapped every round) over `--repeats` rounds;
  each timed block is `--block-warmup` untimed steps, then `--steps` consecutive training steps
  followed by a barrier, timed on rank 0, so a step is the block time / steps with every rank done.
  The untimed steps measure the steady state a training run lives in: the first step after
  switching pipelines re-touches memory the other pipeline used and was up to 1.7x slower, for
  either library, which no training run pays. Tokens/s is median [min-max] over
  rounds; the stagewise/torch ratio is taken within each round, and best/best is the ratio of the
  fastest rounds (robust to a slow round on a shared machine). The single-process baseline (rank 0,
  1 thread, nn.Sequential + Adam, the other ranks idle in a barrier) runs `--repeats` steps before the
  rounds (run inside them, the block right after it was often much slower, whichever library it was).
* Efficiency (stagewise): the last traced step against the simulator's ideal from that step's
  measured per-stage F, B (I, W) means and the mean optimizer STEP; measured against simulated
  bubble per device; measured peak saved-activation bytes per device (from the forwards'
  `saved_bytes`) against the prediction `peak_inflight` x saved bytes per micro-batch, and against
  the simulated timeline swept with each (stage, micro-batch)'s measured bytes.
* With `--planner`, the planner's choice (`Pipeline(schedule="auto", microbatches="auto", partition="auto")`:
  schedule, m, chunks and balance chosen together from one profile, built once per P and kept) runs in the
  rotation of every configuration, so that it alternates with each of torch's; it is compared with torch's
  best configuration on the even split (ratios within that configuration's rounds, median [min-max]). With
  `--single-threads 2` a single process with 2 intra-op threads (rank 0; the other ranks wait) runs in
  every rotation too, the baseline for "2 ranks x 1 thread against 1 process x 2 threads". `--no-even`
  skips stagewise on the even split (the parity rows).
* Unless `--no-auto`, stagewise also runs each schedule with `partition="auto"` (it measures the
  layers on `sample=`); the best of those per (P, m) is compared with torch's best schedule on the
  even split and with torch's same schedule on the even split (ratios within each round, then the
  median). P ranks of one thread on C cores can at most reach min(P, C) x the single process: that
  bound is printed next to them.

Output: the tables, JSON lines (`--out`, one line per round and per summary) and a PNG chart of
tokens/s per configuration (`--png`).

Run (about 8 minutes with the defaults on two cores; P=4 runs 4 processes on 2 cores, so it is
slower and noisier and runs fewer configurations by default):

    PYTHONPATH=. python benchmarks/bench_vs_torch.py [--stages 2 4] [--schedules gpipe 1f1b interleaved zbv]
        [--microbatches 4 8] [--p4-microbatches 8] [--steps 2 --repeats 3 --warmup 2 --block-warmup 1]
        [--no-auto]
    stagewise bench [same options]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# torch and stagewise are imported inside the functions so that `stagewise --help` stays fast.

TORCH_SCHEDULES = {"gpipe": "ScheduleGPipe", "1f1b": "Schedule1F1B", "interleaved": "ScheduleInterleaved1F1B",
                   "zbv": "ScheduleZBVZeroBubble"}
LOSS_RTOL = 1e-5


@dataclass(frozen=True)
class Settings:
    """Everything the worker processes need (picklable)."""

    configs: tuple[tuple[str, int], ...]  # (schedule, m) for this P
    auto: bool
    torch_side: bool
    planner: bool
    even: bool
    single_threads: int
    steps: int
    repeats: int
    warmup: int
    block_warmup: int
    batch: int
    seq_len: int
    n_layer: int
    n_embd: int
    n_head: int
    vocab: int
    lr: float
    seed: int
    tie: bool
    timeout: float


def parallel_ranks(P: int) -> int:
    """How many of P one-thread ranks can compute at once on this machine: the bound is that many times
    the single process."""
    return min(P, os.cpu_count() or 1)


def torch_supports(schedule: str, P: int, m: int) -> str | None:
    """Why torch.distributed.pipelining cannot run this configuration, or None."""
    if schedule not in TORCH_SCHEDULES:
        return "no such schedule in torch.distributed.pipelining"
    if schedule == "1f1b" and m < P:
        return "Schedule1F1B needs m >= P"
    if schedule == "interleaved" and m % max(1, m // P):
        return "ScheduleInterleaved1F1B needs m % max(1, m // P) == 0"
    return None


class SingleThreads:
    """The single-process baseline with `threads` intra-op threads on rank 0 (the other ranks do nothing), as a
    pipeline-like object for the rotation."""

    def __init__(self, s: Any, rank: int, threads: int):
        from _common import SingleProcess

        self.model = SingleProcess(s) if rank == 0 else None
        self.threads = threads

    def train_step(self, batch: Any) -> float | None:
        if self.model is None:
            return None
        import torch

        before = torch.get_num_threads()
        torch.set_num_threads(self.threads)
        try:
            return self.model.step(batch)
        finally:
            torch.set_num_threads(before)


class TorchPipe:
    """torch.distributed.pipelining over this rank's stages: manual PipelineStages, one schedule, Adam."""

    def __init__(self, layers: list, balance: list[int], placement: tuple[int, ...], schedule: str, m: int,
                 rank: int, group: Any, lr: float, loss_fn: Any):
        import torch
        from torch import nn
        from torch.distributed import pipelining as tp
        from torch.distributed.pipelining.schedules import PipelineScheduleMulti

        S = len(balance)
        starts = [sum(balance[:s]) for s in range(S)]
        self.stage_ids = [s for s in range(S) if placement[s] == rank]
        self.modules = [nn.Sequential(*layers[starts[s]:starts[s] + balance[s]]) for s in self.stage_ids]
        stages = [tp.PipelineStage(mod, s, S, torch.device("cpu"), group=group)
                  for mod, s in zip(self.modules, self.stage_ids)]
        cls = getattr(tp, TORCH_SCHEDULES[schedule])
        multi = issubclass(cls, PipelineScheduleMulti)
        self.schedule = cls(stages if multi else stages[0], n_microbatches=m, loss_fn=loss_fn, scale_grads=True)
        self.first, self.last = 0 in self.stage_ids, S - 1 in self.stage_ids
        self.optimizer = torch.optim.Adam([p for mod in self.modules for p in mod.parameters()], lr=lr)

    def train_step(self, batch: Any) -> float | None:
        """One step; the batch loss (mean of the micro-batch means) on the rank with the last stage."""
        self.optimizer.zero_grad(set_to_none=True)
        losses: list | None = [] if self.last else None
        args = (batch[0],) if self.first else ()
        self.schedule.step(*args, target=batch[1] if self.last else None, losses=losses)
        self.optimizer.step()
        return float(sum(x.item() for x in losses) / len(losses)) if losses else None


def _block(fn: Any, n: int, warm: int) -> tuple[float, list[float], list[float]]:
    """`warm` untimed steps, then n consecutive steps and a barrier: (seconds per step, each timed step's
    own seconds on this rank, each untimed step's seconds)."""
    import torch.distributed as dist

    warm_times = []
    for _ in range(warm):
        t = time.perf_counter()
        fn()
        warm_times.append(time.perf_counter() - t)
    dist.barrier()
    t0 = time.perf_counter()
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    dist.barrier()
    return (time.perf_counter() - t0) / n, times, warm_times


def worker(rank: int, world: int, s: Settings) -> dict[str, Any] | None:
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
        info["planner"] = {"schedule": c.schedule, "microbatches": c.microbatches, "chunks": c.chunks,
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


# ---- summaries and output ----

def summarise(records: list[dict[str, Any]], tokens: int) -> list[dict[str, Any]]:
    """One summary per (configuration, library); ratios are taken within a round, then summarised."""
    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = {}
    for rec in records:
        by.setdefault((rec["config"], rec["library"]), {})[rec["round"]] = rec
    single = by[("single", "single")]
    out = []
    for (name, lib), rounds in by.items():
        rows = [rounds[r] for r in sorted(rounds)]
        x: dict[str, Any] = {"config": name, "library": lib, "step_s": [r["step_s"] for r in rows],
                             "tokens_per_s": [tokens / r["step_s"] for r in rows],
                             "vs_single": [single[r["round"]]["step_s"] / r["step_s"] for r in rows]}
        for key in ("schedule", "microbatches", "partition", "balance"):
            if key in rows[0]:
                x[key] = rows[0][key]
        other = by.get((name, "torch"))
        if lib == "stagewise" and other is not None:
            x["vs_torch"] = [other[r["round"]]["step_s"] / r["step_s"] for r in rows]
        if "ideal_s" in rows[0]:
            P = len(rows[0]["busy_s"])
            x.update(
                ideal_s=[r["ideal_s"] for r in rows], traced_step_s=[r["traced_step_s"] for r in rows],
                measured_over_ideal=[r["traced_step_s"] / r["ideal_s"] for r in rows],
                bubble_measured=[[r["bubble_measured"][d] for r in rows] for d in range(P)],
                bubble_simulated=[[r["bubble_simulated"][d] for r in rows] for d in range(P)],
                wait_s=[[r["wait_s"][d] for r in rows] for d in range(P)],
                outside_trace_s=[r["outside_trace_s"] for r in rows],
                saved_peak_bytes=[statistics.median(r["saved_peak_bytes"][d] for r in rows) for d in range(P)],
                saved_predicted_bytes=[statistics.median(r["saved_predicted_bytes"][d] for r in rows)
                                       for d in range(P)],
                saved_predicted_swept_bytes=[statistics.median(r["saved_predicted_swept_bytes"][d] for r in rows)
                                             for d in range(P)],
                peak_inflight=rows[0]["peak_inflight"],
            )
        out.append(x)
    return out


def print_tables(P: int, result: dict[str, Any], summaries: list[dict[str, Any]], s: Settings) -> dict[str, Any]:
    """The three tables of one pipeline size; returns the goal numbers."""
    from _common import spread

    med = statistics.median
    tokens = s.batch * s.seq_len
    get = {(x["config"], x["library"]): x for x in summaries}
    single = get[("single", "single")]
    first = result["first_loss"]
    print(f"\n== P={P}: {P} ranks x 1 thread (gloo), {s.n_layer + 2}-layer GPT d{s.n_embd} h{s.n_head} vocab "
          f"{s.vocab}{' tied' if s.tie else ''}, batch {s.batch} x {s.seq_len} = {tokens} tokens; {s.repeats} rounds "
          f"x {s.steps} steps; median [min-max] over rounds")
    print(f"single process, 1 thread: {spread(single['tokens_per_s'], '.0f')} tokens/s, "
          f"first loss {first['single']['single']:.6f}")
    print(f"{'configuration':<16} {'balance':<18} {'stagewise tok/s':<19} {'torch tok/s':<19} "
          f"{'stagewise/torch':<20} {'best/best':<9} {'sw/1 proc':<9} {'first loss sw / torch':<22}")
    goals: dict[str, Any] = {"P": P, "parity": [], "efficiency": [], "auto": None}
    for name, inf in result["info"].items():
        if inf["partition"] != "even" or (name, "stagewise") not in get:
            continue
        sw, th = get[(name, "stagewise")], get.get((name, "torch"))
        bal = str(inf["balance"]).replace(" ", "")
        ratio = spread(sw["vs_torch"], ".3f") if th else "-"
        best = f"{max(sw['tokens_per_s']) / max(th['tokens_per_s']):.3f}" if th else "-"
        loss = first[name]
        lt = f"{loss['torch']:.6f}" if "torch" in loss else inf["torch"][:12]
        print(f"{name:<16} {bal:<18} {spread(sw['tokens_per_s'], '.0f'):<19} "
              f"{spread(th['tokens_per_s'], '.0f') if th else '-':<19} {ratio:<20} {best:<9} "
              f"{med(sw['vs_single']):<9.2f} {loss['stagewise']:.6f} / {lt}")
        if th:
            goals["parity"].append((name, med(sw["vs_torch"]), max(sw["tokens_per_s"]) / max(th["tokens_per_s"])))
    print("\nstagewise efficiency: the last traced step vs the simulator's ideal from its measured per-stage F/B "
          "(I/W) and STEP costs; bubble = 1 - busy / step, per device.\nSaved activations per device (MB): measured "
          "peak; pred = simulated peak in-flight x the device's saved bytes per micro-batch; pred swept = the "
          "simulated timeline\nswept with each (stage, micro-batch)'s measured bytes (they differ when a device's "
          "chunks save different amounts)")
    dev = "/".join(f"d{d}" for d in range(P))
    print(f"{'configuration':<21} {'ideal s':<7} {'step s':<7} {'measured/ideal':<20} {'bubble meas ' + dev:<19} "
          f"{'bubble sim ' + dev:<18} {'in-flight':<16} {'saved MB meas':<20} {'pred':<20} {'pred swept':<20}")
    for name in result["info"]:
        if (name, "stagewise") not in get or name.startswith("planner@"):
            continue
        x = get[(name, "stagewise")]
        meas = "/".join(f"{med(v):.2f}" for v in x["bubble_measured"])
        sim = "/".join(f"{med(v):.2f}" for v in x["bubble_simulated"])
        infl = "/".join(f"{v:g}" for v in x["peak_inflight"])
        saved, pred, swept = ("/".join(f"{v / 2**20:.1f}" for v in x[k]) for k in
                              ("saved_peak_bytes", "saved_predicted_bytes", "saved_predicted_swept_bytes"))
        print(f"{name:<21} {med(x['ideal_s']):<7.3f} {med(x['traced_step_s']):<7.3f} "
              f"{spread(x['measured_over_ideal'], '.3f'):<20} {meas:<19} {sim:<18} {infl:<16} {saved:<20} {pred:<20} "
              f"{swept:<20}")
        goals["efficiency"].append((name, med(x["measured_over_ideal"])))
    autos = [n for n, inf in result["info"].items() if inf["partition"] == "auto"]
    if autos:
        bound = parallel_ranks(P) * med(single["tokens_per_s"])
        print(f"\nstagewise partition=auto (best schedule per m) vs torch on the even split (best schedule per m, and "
              f"the same schedule); ratios within each round, median [min-max]. Bound: {parallel_ranks(P)} of "
              f"{os.cpu_count()} cores x the single process = {bound:.0f} tokens/s")
        print(f"{'m':<3} {'best stagewise auto':<24} {'balance':<20} {'tok/s':<19} {'best torch even':<17} "
              f"{'tok/s':<19} {'ratio':<21} {'vs torch same schedule':<22}")
        best_ratios = []
        for m in sorted({result["info"][n]["microbatches"] for n in autos}):
            mine = [n for n in autos if result["info"][n]["microbatches"] == m]
            theirs = [n for n, inf in result["info"].items() if inf["partition"] == "even"
                      and inf["microbatches"] == m and (n, "torch") in get]
            if not theirs:
                continue
            a = max(mine, key=lambda n: med(get[(n, "stagewise")]["tokens_per_s"]))
            t = max(theirs, key=lambda n: med(get[(n, "torch")]["tokens_per_s"]))
            xa, xt = get[(a, "stagewise")], get[(t, "torch")]
            ratios = [ts / sa for ts, sa in zip(xt["step_s"], xa["step_s"])]
            ratio = med(ratios)
            same = get.get((a.removesuffix(" auto"), "torch"))
            same_ratios = [ts / sa for ts, sa in zip(same["step_s"], xa["step_s"])] if same else []
            print(f"{m:<3} {a:<24} {str(result['info'][a]['balance']).replace(' ', ''):<20} "
                  f"{spread(xa['tokens_per_s'], '.0f'):<19} {t:<17} {spread(xt['tokens_per_s'], '.0f'):<19} "
                  f"{spread(ratios, '.3f'):<21} {spread(same_ratios, '.3f') if same else '-':<22}")
            best_ratios.append((m, a, t, ratio, med(same_ratios) if same else None,
                                med(xa["tokens_per_s"]) / bound))
        goals["auto"] = best_ratios
    return goals


def print_planner(P: int, result: dict[str, Any], summaries: list[dict[str, Any]],
                  s: Settings) -> dict[str, Any] | None:
    """The planner's choice against torch's configurations on the even split (and the n-thread process), ratios
    within the rounds of each configuration (the planner ran in every configuration's rotation)."""
    from _common import spread

    if "planner" not in result["info"]:
        return None
    med = statistics.median
    get = {(x["config"], x["library"]): x for x in summaries}
    inf = result["info"]["planner"]
    choice = (f"{inf['schedule']}{' v=' + str(inf['chunks']) if inf['chunks'] > 1 else ''} m={inf['microbatches']} "
              f"[{','.join(map(str, inf['balance']))}]" + (f" recompute={inf['recompute']}"
                                                             if inf["recompute"] != "never" else ""))
    plan = result["plans"]["planner"]
    print(f"\nthe planner's choice: {choice} (plan and profile built in {inf['build_s']:.1f} s; predicted "
          f"{plan['choice']['step_s']:.3f} s per step, noise {plan['stats'].get('noise_measured', 0):.1%}) against "
          f"torch.distributed.pipelining on the even split, alternating in every configuration's rounds")
    print(f"{'torch configuration':<18} {'torch tok/s':<19} {'planner tok/s':<19} {'planner/torch':<21}"
          f"{f'{s.single_threads}-thread process tok/s':<28} {'planner/it':<20}")
    names = [n for n, i in result["info"].items() if i.get("partition") == "even" and (n, "torch") in get]
    single_ratios: list[float] = []
    for n in names:
        th, pl = get[(n, "torch")], get[(f"planner@{n}", "stagewise")]
        ratios = [t / p for t, p in zip(th["step_s"], pl["step_s"])]
        one = get.get((f"single{s.single_threads}@{n}", "single-threads"))
        if one:
            single_ratios += [t / p for t, p in zip(one["step_s"], pl["step_s"])]
        print(f"{n:<18} {spread(th['tokens_per_s'], '.0f'):<19} {spread(pl['tokens_per_s'], '.0f'):<19} "
              f"{spread(ratios, '.3f'):<21}{spread(one['tokens_per_s'], '.0f') if one else '-':<28} "
              f"{spread([t / p for t, p in zip(one['step_s'], pl['step_s'])], '.3f') if one else '-':<20}")
    if not names:
        return None
    best = max(names, key=lambda n: med(get[(n, "torch")]["tokens_per_s"]))
    mine = get[(f"planner@{best}", "stagewise")]["step_s"]
    ratio = med([t / p for t, p in zip(get[(best, "torch")]["step_s"], mine)])
    pooled = [x for n in names for x in get[(f"planner@{n}", "stagewise")]["tokens_per_s"]]
    print(f"planner over all rounds: {spread(pooled, '.0f')} tokens/s; torch's best configuration: {best}; planner/"
          f"torch's best within its rounds: {ratio:.3f}x" + (f"; planner / {s.single_threads}-thread process "
                                                              f"(pooled rounds): {spread(single_ratios, '.3f')}"
                                                              if single_ratios else ""))
    return {"choice": choice, "torch_best": best, "ratio": ratio, "threads": s.single_threads,
            "vs_single": med(single_ratios) if single_ratios else None}


def draw_chart(all_summaries: dict[int, list[dict[str, Any]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, sw, th, auto = [], [], [], []
    baselines = []  # (P, first bar, last bar, single-process tokens/s) per P
    for P, summaries in all_summaries.items():
        get = {(x["config"], x["library"]): x for x in summaries}
        first = len(labels)
        for x in summaries:
            if x["library"] != "stagewise" or x.get("partition") != "even":
                continue
            labels.append(f"P={P}\n{x['config']}")
            sw.append(x["tokens_per_s"])
            t = get.get((x["config"], "torch"))
            th.append(t["tokens_per_s"] if t else None)
            a = get.get((x["config"] + " auto", "stagewise"))
            auto.append(a["tokens_per_s"] if a else None)
        if len(labels) > first:
            baselines.append((P, first, len(labels) - 1,
                              statistics.median(get[("single", "single")]["tokens_per_s"])))
    fig, ax = plt.subplots(figsize=(max(8, 1.1 * len(labels)), 4.8))
    width = 0.27
    for k, (series, name, color) in enumerate(((sw, "stagewise (even split)", "tab:blue"),
                                               (th, "torch.distributed.pipelining (even split)", "tab:orange"),
                                               (auto, "stagewise partition=auto", "tab:green"))):
        xs = [i + (k - 1) * width for i, v in enumerate(series) if v]
        vals = [v for v in series if v]
        if not vals:
            continue
        mids = [statistics.median(v) for v in vals]
        err = [[m - min(v) for m, v in zip(mids, vals)], [max(v) - m for m, v in zip(mids, vals)]]
        ax.bar(xs, mids, width, yerr=err, capsize=2, label=name, color=color)
    for k, (P, lo, hi, value) in enumerate(baselines):
        ax.hlines(value, lo - 0.45, hi + 0.45, colors="gray", linestyles="dashed",
                  label="single process, 1 thread" if k == 0 else None)
        ax.hlines(parallel_ranks(P) * value, lo - 0.45, hi + 0.45, colors="black", linestyles="dotted",
                  label=f"bound: min(P, {os.cpu_count()} cores) x single process" if k == 0 else None)
    ax.set_xticks(range(len(labels)), labels, fontsize=7)
    ax.set_ylabel("tokens/s (median, min-max)")
    ax.set_title("stagewise vs torch.distributed.pipelining, CPU, 1 thread per rank")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.13), ncol=4)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--stages", nargs="+", type=int, default=[2, 4], help="pipeline sizes P (one rank each)")
    parser.add_argument("--schedules", nargs="+", default=list(TORCH_SCHEDULES))
    parser.add_argument("--microbatches", nargs="+", type=int, default=[4, 8], help="m for P < 4")
    parser.add_argument("--p4-microbatches", nargs="+", type=int, default=[8],
                        help="m for P >= 4 (4 processes on 2 cores are slow: fewer configurations)")
    parser.add_argument("--steps", type=int, default=2, help="steps per timed block")
    parser.add_argument("--repeats", type=int, default=3, help="rounds (alternating the libraries)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per pipeline, the loss check included")
    parser.add_argument("--block-warmup", type=int, default=1,
                        help="untimed steps before every timed block (the first step after switching pipelines is "
                             "slow for either library)")
    parser.add_argument("--no-auto", dest="auto", action="store_false", help="skip stagewise partition=auto")
    parser.add_argument("--planner", action="store_true",
                        help="also run the planner's choice (schedule, m, balance) in every configuration's rotation")
    parser.add_argument("--no-even", dest="even", action="store_false",
                        help="skip stagewise on the even split (the parity rows)")
    parser.add_argument("--single-threads", dest="single_threads", type=int, default=0,
                        help="also run one process with this many threads in every rotation (e.g. 2)")
    parser.add_argument("--tie", action="store_true", help="tie embedding and head (stagewise only; no torch)")
    from _common import add_model_args

    add_model_args(parser, vocab=8192)
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for each spawned run")
    parser.add_argument("--out", type=Path, default=Path("runs/bench/vs_torch.jsonl"))
    parser.add_argument("--png", type=Path, default=Path("runs/bench/vs_torch.png"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.warmup < 1:
        parser.error("--steps, --repeats and --warmup must be >= 1 (the first step checks the loss)")
    if args.block_warmup < 0:
        parser.error("--block-warmup must be >= 0")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from _common import bench_meta, write_jsonl

    from stagewise.runtime.launch import spawn

    start = time.perf_counter()
    all_summaries: dict[int, list[dict[str, Any]]] = {}
    all_goals = []
    failures = []
    for P in args.stages:
        ms = args.microbatches if P < 4 else args.p4_microbatches
        s = Settings(tuple((sc, m) for sc in args.schedules for m in ms), args.auto, not args.tie, args.planner,
                     args.even, args.single_threads, args.steps,
                     args.repeats, args.warmup, args.block_warmup, args.batch, args.seq_len, args.n_layer,
                     args.n_embd, args.n_head, args.vocab, args.lr, args.seed, args.tie, args.timeout)
        t0 = time.perf_counter()
        result = spawn(worker, P, args=(s,), timeout=args.timeout, threads=1)[0]
        summaries = summarise(result["records"], s.batch * s.seq_len)
        all_summaries[P] = summaries
        goals = print_tables(P, result, summaries, s)
        goals["planner"] = print_planner(P, result, summaries, s)
        all_goals.append(goals)
        ref = result["first_loss"]["single"]["single"]
        for name, losses in result["first_loss"].items():
            for lib, value in losses.items():
                if abs(value - ref) > LOSS_RTOL * abs(ref):
                    failures.append(f"P={P} {name} {lib}: first loss {value:.8f} vs single {ref:.8f}")
        elapsed = time.perf_counter() - t0
        print(f"P={P}: wall time {elapsed:.0f} s", flush=True)
        meta = bench_meta("vs_torch", asdict(s))
        write_jsonl(args.out, meta, result["records"], summaries, stages=P, wall_s=elapsed,
                    first_loss=result["first_loss"])
    print("\n== goals")
    for g in all_goals:
        P = g["P"]
        if g["parity"]:
            worst = min(g["parity"], key=lambda t: t[1])
            ok = sum(v >= 0.99 for _, v, _ in g["parity"])
            ok_best = sum(b >= 0.99 for _, _, b in g["parity"])
            print(f"P={P} parity (stagewise/torch >= 0.99, even split): {ok}/{len(g['parity'])} configurations by the "
                  f"median ratio ({ok_best} by best/best); lowest {worst[1]:.3f} ({worst[0]}); median of the medians "
                  f"{statistics.median(v for _, v, _ in g['parity']):.3f}")
        eff = [(n, v) for n, v in g["efficiency"] if not n.endswith("auto")]
        if eff:
            ok = sum(v <= 1.03 for _, v in eff)
            worst = max(eff, key=lambda t: t[1])
            print(f"P={P} efficiency (measured step within 3% of the simulated ideal): {ok}/{len(eff)}; "
                  f"highest measured/ideal {worst[1]:.3f} ({worst[0]})")
        if g.get("planner"):
            x = g["planner"]
            print(f"P={P} the planner's choice ({x['choice']}) vs torch's best on the even split ({x['torch_best']}): "
                  f"{x['ratio']:.3f}x (goal 1.15x at P=2: {'reached' if x['ratio'] >= 1.15 else 'not reached'})"
                  + (f"; vs one process x {x['threads']} threads: {x['vs_single']:.3f}x (goal 1.15x)"
                     if x.get("vs_single") else ""))
        if g["auto"]:
            target = 1.1 if P == 2 else 1.3
            for m, a, t, ratio, same, of_bound in g["auto"]:
                same_txt = f"; vs torch's {a.split()[0]} on the even split {same:.3f}x" if same is not None else ""
                print(f"P={P} m={m} auto (best: {a}) vs torch even (best: {t}): {ratio:.3f}x, goal {target}x "
                      f"{'reached' if ratio >= target else 'not reached'}{same_txt}; stagewise at {of_bound:.0%} of "
                      "the cores' bound")
    draw_chart(all_summaries, args.png)
    print(f"\ntotal wall time {time.perf_counter() - start:.0f} s; appended to {args.out}; chart {args.png}")
    if failures:
        print(f"FAILED: first-step losses differ by more than {LOSS_RTOL:g} (relative):\n" + "\n".join(failures),
              file=sys.stderr)
        return 1
    print(f"first-step losses agree within {LOSS_RTOL:g} (relative) for every pipeline and the single process")
    return 0


if __name__ == "__main__":
    sys.exit(main())
