"""The main job: train GPT-2 on the pipeline, end to end (`stagewise train`).

Every rank runs `train(config)`: it prepares the data (rank 0 trains the tokenizer and
caches it, the others then load it), builds the model as a list of layers, keeps its own
stages through `Pipeline`, and trains. Rank 0 prints the partition table, a progress bar
and `step N loss X` lines, and writes metrics.jsonl, timeline.png, trace.json and the
final checkpoint to the run folder.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a job runs, so `stagewise --help` stays fast
    import torch


@dataclass
class TrainConfig:
    """Options of `stagewise train`; sizes in tokens, learning rate per Adam step."""

    stages: int = 4
    dp: int = 1  # data-parallel replicas of the pipeline: stages x dp processes
    max_grad_norm: float | None = None  # clip by the global gradient norm (the norm is logged either way)
    schedule: str = "auto"  # "auto": the planner chooses (with m and the partition when those are "auto" too)
    microbatches: int | str = "auto"
    steps: int = 300
    model: str = "gpt2-tiny"
    data: str | None = None  # a text file or folder; default: the built-in corpus
    dataset: str | None = None  # "squad": SQuAD's context field through Hugging Face datasets
    pretrained: str | None = None  # a Hugging Face GPT-2 name or local folder, instead of --model
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3
    partition: str = "auto"
    plan: bool = False  # schedule, microbatches and partition all "auto"
    memory_limit: str | None = None  # bytes per device (text such as 2GiB), for the planner
    chunks: int | None = None
    vocab_size: int = 8192
    out: str = "runs/gpt2"
    seed: int = 0
    log_every: int = 10
    trace_step: int = 5  # the step whose measured timeline is drawn and saved
    timeout: float = 120.0
    threads: int | None = None


def _texts(cfg: TrainConfig) -> list[str]:
    from stagewise.data import builtin_corpus, load_squad_contexts, read_text_files

    if cfg.dataset == "squad":
        return load_squad_contexts()
    if cfg.dataset is not None:
        raise ValueError(f"unknown --dataset {cfg.dataset!r}; the one built in is 'squad' (or use --data PATH)")
    if cfg.data is not None:
        return read_text_files(cfg.data)
    return builtin_corpus()


def prepare_data(cfg: TrainConfig, rank: int, world: int):
    """(tokenizer, batches): rank 0 builds the caches first so the other ranks only read them."""
    from stagewise.data import LengthSortedBatches, cache_root, gpt2_tokenizer, pad_id, token_chunks, train_bpe

    def build():
        texts = _texts(cfg)
        if cfg.pretrained:
            tok = gpt2_tokenizer()
            if tok is None:
                raise RuntimeError("--pretrained needs GPT-2's own tokenizer, which is not in the local Hugging Face "
                                   "cache; download it once where there is network, or train from scratch without "
                                   "--pretrained (a tokenizer is then trained on the corpus)")
        else:
            tok = train_bpe(texts, vocab_size=cfg.vocab_size)
        chunks = token_chunks(texts, tok, cfg.seq_len, cache_dir=cache_root() / "tokens")
        return tok, LengthSortedBatches(chunks, cfg.batch_size, pad_id(tok), seed=cfg.seed, drop_last=True)

    import torch.distributed as dist

    if world > 1 and rank != 0:
        dist.barrier()
        return build()
    out = build()
    if world > 1:
        dist.barrier()
    return out


def build_layers(cfg: TrainConfig, vocab_size: int) -> list[torch.nn.Module]:
    import torch

    from stagewise.models import config, gpt2_layers, load_pretrained

    if cfg.pretrained:
        return load_pretrained(cfg.pretrained)
    torch.manual_seed(cfg.seed)
    base = config(cfg.model)
    return gpt2_layers(config(cfg.model, vocab_size=vocab_size, n_positions=max(base.n_positions, cfg.seq_len)))


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job on this rank; returns the summary (first/last loss, tokens/s) on every rank."""
    import torch

    from stagewise import Pipeline
    from stagewise.models import count_parameters, lm_loss
    from stagewise.runtime import launch

    rank, world = launch.init_from_env(cfg.timeout)
    if world != cfg.stages * cfg.dp:
        n = cfg.stages * cfg.dp
        raise SystemExit(f"stagewise train: --stages {cfg.stages} x --dp {cfg.dp} needs {n} processes but {world} "
                         f"were started; start {n} (torchrun --nproc_per_node={n}) or run `stagewise train` "
                         "directly and let it start them")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    if cfg.plan:
        cfg.schedule, cfg.microbatches, cfg.partition = "auto", "auto", "auto"
    planned = "auto" in (cfg.schedule, cfg.microbatches)
    out = Path(cfg.out)
    say = _Printer(rank == 0)
    say(f"stagewise train: {cfg.model if not cfg.pretrained else cfg.pretrained} on {cfg.stages} stage(s)"
        f"{f' x {cfg.dp} data-parallel replicas' if cfg.dp > 1 else ''}, "
        f"schedule {cfg.schedule}, {cfg.microbatches} micro-batches, {cfg.steps} steps"
        f"{' (auto: chosen by the planner)' if planned else ''}")
    t0 = time.perf_counter()
    tok, batches = prepare_data(cfg, rank, world)
    say(f"data: {len(batches)} batches of {cfg.batch_size} x <= {cfg.seq_len} tokens, vocabulary "
        f"{tok.get_vocab_size()} ({time.perf_counter() - t0:.1f} s)")
    layers = build_layers(cfg, tok.get_vocab_size())
    sample = next(iter(batches)) if planned or cfg.partition in ("time", "memory", "auto") else None
    pipe = Pipeline(layers, lm_loss, schedule=cfg.schedule, microbatches=cfg.microbatches, partition=cfg.partition,
                    chunks=cfg.chunks, timeout=cfg.timeout, sample=sample, memory_limit=cfg.memory_limit,
                    show_partition=False, data_parallel=cfg.dp, max_grad_norm=cfg.max_grad_norm, track_grad_norm=True,
                    optimizer=lambda ps: torch.optim.AdamW(ps, lr=cfg.lr, weight_decay=0.0))
    if pipe.plan is not None:
        say(pipe.plan.format())
    say(pipe.partition_table().format())
    say(f"parameters: {count_parameters(layers) / 1e6:.2f}M (embedding and head tied, counted once)")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
        if pipe.plan is not None:
            (out / "plan.json").write_text(json.dumps(pipe.plan.to_dict(), indent=2))
    prediction: dict[str, Any] | None = None
    metrics = open(out / "metrics.jsonl", "w") if rank == 0 else None
    history: list[tuple[int, float, float]] = []
    data = iter(_forever(batches))
    progress = _Progress(rank == 0, cfg.steps)
    window_tokens, window_time = 0, 0.0
    try:
        for step in range(1, cfg.steps + 1):
            inputs, labels = next(data)
            start = time.perf_counter()
            loss = pipe.train_step((inputs, labels)).item()
            took = time.perf_counter() - start
            tokens = int((labels != -100).sum())
            window_tokens, window_time = window_tokens + tokens, window_time + took
            history.append((step, loss, tokens / took))
            progress.update(step, loss, tokens / took)
            if step == min(cfg.trace_step, cfg.steps):
                trace = _save_timelines(pipe, out, rank)
                if trace is not None and pipe.plan is not None:
                    prediction = _check_prediction(pipe, trace, took, cfg.dp, progress)
            if step % cfg.log_every == 0 or step == cfg.steps:
                tps = window_tokens / window_time
                norm = pipe.last_step.get("grad_norm", float("nan"))
                progress.print(f"step {step} loss {loss:.4f}  grad norm {norm:.3g}  ({tps:,.0f} tokens/s)")
                if "skipped" in pipe.last_step:
                    progress.print(f"step {step} skipped: {pipe.last_step['skipped']}")
                if metrics is not None:
                    metrics.write(json.dumps({"step": step, "loss": loss, "grad_norm": norm, "tokens_per_s": tps,
                                              "elapsed_s": time.perf_counter() - t0}) + "\n")
                    metrics.flush()
                window_tokens, window_time = 0, 0.0
    finally:
        progress.close()
        if metrics is not None:
            metrics.close()
    pipe.save_checkpoint(out / "checkpoint", extra={"step": cfg.steps, "config": asdict(cfg)})
    first, last = history[0][1], sum(h[1] for h in history[-10:]) / len(history[-10:])
    steady = history[len(history) // 5:] or history
    summary = {"first_loss": first, "last_loss_mean10": last, "tokens_per_s": sum(h[2] for h in steady) / len(steady),
               "steps": cfg.steps, "stages": cfg.stages, "dp": cfg.dp, "schedule": pipe.schedule.name,
               "microbatches": pipe.microbatches, "balance": pipe.balance, "seconds": time.perf_counter() - t0}
    if prediction is not None:
        summary["prediction"] = prediction
    say(f"done: loss {first:.3f} -> {last:.3f} (mean of the last 10 steps), {summary['tokens_per_s']:,.0f} tokens/s, "
        f"{summary['seconds']:.0f} s; wrote {out}/metrics.jsonl, timeline.png, trace.json, checkpoint/")
    if rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _forever(batches):
    epoch = 0
    while True:
        batches.set_epoch(epoch)
        yield from batches
        epoch += 1


def _check_prediction(pipe: Any, trace: Any, step_s: float, dp: int, progress: _Progress) -> dict[str, Any]:
    """The plan's prediction against the traced step: busy time, bubble and saved-activation bytes per device."""
    from stagewise.partition.plan import format_comparison

    rows = [d * dp for d in range(pipe.schedule.num_devices)]  # replica 0's devices (rows are ranks when dp > 1)
    result = pipe.plan.compare(trace, step_s, rows)
    progress.print(format_comparison(result))
    return result


def _save_timelines(pipe: Any, out: Path, rank: int) -> Any:
    """The measured timeline of this step beside the simulation of the same schedule with its measured costs;
    returns the measured timeline on rank 0 (None elsewhere)."""
    from stagewise.schedules import Costs, simulate
    from stagewise.viz import render_png, write_chrome_trace

    measured = pipe.last_trace()  # collective
    if rank != 0:
        return None
    compute = [e for e in measured.events if e.op in ("F", "B", "I", "W")]
    costs: dict[str, list[float]] = {}
    for op in ("F", "B", "I", "W"):
        per_stage = []
        for s in range(pipe.schedule.num_stages):
            d = [e.end - e.start for e in compute if e.op == op and e.stage == s]
            per_stage.append(sum(d) / len(d) if d else 0.0)
        costs[op] = per_stage
    if pipe.schedule.split_backward:
        sim = simulate(pipe.schedule, Costs(f=costs["F"], i=costs["I"], w=costs["W"]))
    else:
        sim = simulate(pipe.schedule, Costs(f=costs["F"], b=costs["B"]))
    sim.timeline.title = f"simulated with the measured per-stage costs: makespan {sim.makespan * 1e3:.1f} ms"
    sim.timeline.unit = "s"
    shown = [e for e in measured.events if e.op in ("F", "B", "I", "W", "STEP", "OVERLAP_F_B")]
    measured.events = shown
    measured.title = f"measured: {pipe.schedule.describe()}, {measured.makespan * 1e3:.1f} ms"
    render_png([measured, sim.timeline], str(out / "timeline.png"))
    write_chrome_trace([measured, sim.timeline], str(out / "trace.json"))
    return measured


class _Printer:
    def __init__(self, on: bool):
        self.on = on

    def __call__(self, text: str) -> None:
        if self.on:
            print(text, flush=True)


class _Progress:
    """A rich progress bar with loss and tokens/s on a terminal; plain lines elsewhere."""

    def __init__(self, on: bool, total: int):
        self.on = on
        self.bar = None
        if on and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, info="")
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.3f}  {tps:,.0f} tok/s")

    def print(self, text: str) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
