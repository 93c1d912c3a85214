"""The main job: train GPT-2 on the pipeline, end to end (`stagewise train`).

Every rank runs `train(config)`: it prepares the data (a held-out split set aside first; rank 0
trains the tokenizer on the rest and caches it, the others then load it), builds the model as a
list of layers, keeps its own stages through `Pipeline` (AdamW with decay groups and a learning-rate
schedule, `stagewise.optim`), and trains, validating every `eval_every` steps and at the end. Rank 0
prints the partition table, a progress bar and `step N loss X` lines, and writes config.toml,
metrics.jsonl (and TensorBoard / W&B logs, `stagewise.train_logs`), timeline.png, trace.json and
checkpoints/step-NNNNNNNN/ (every `save_every` steps and at the end) to the run folder.

Resuming: `resume` (or a restart by torchrun under `--max-restarts`, seen as
TORCHELASTIC_RESTART_COUNT > 0) loads the run's newest checkpoint (weights, optimizer, RNG)
and the data position, scheduler state and recent losses saved with it, and trains on to the
run's total `steps`; the losses and learning rates are those of an uninterrupted run.
metrics.jsonl goes on in the same folder (lines past the checkpoint are dropped, then run
again); events.jsonl records every resume and what it lost.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch is imported when a job runs, so `stagewise --help` stays fast
    import torch


@dataclass
class TrainConfig:
    """Options of `stagewise train`; sizes in tokens, learning rate per Adam step."""

    stages: int = 4
    dp: int = 1  # data-parallel replicas of the pipeline: stages x dp processes
    shard: str = "none"  # what the dp replicas split: "optimizer" (ZeRO-1), "gradients" (ZeRO-2), "full" (ZeRO-3)
    max_grad_norm: float | None = None  # clip by the global gradient norm (the norm is logged either way)
    precision: str = "fp32"  # fp32, bf16 or fp16 (dynamic loss scaling)
    recompute: str = "never"  # never, except_last, always, a number of layers per group, or auto
    on_nonfinite: str = "raise"  # a NaN/inf loss or gradient: stop naming where it appeared, or "skip" the step
    schedule: str = "auto"  # "auto": the planner chooses (with m and the partition when those are "auto" too)
    microbatches: int | str = "auto"
    steps: int = 300
    model: str = "gpt2-tiny"
    data: str | None = None  # a text file or folder; default: the built-in corpus
    dataset: str | None = None  # "squad": SQuAD's context field through Hugging Face datasets
    pretrained: str | None = None  # a Hugging Face GPT-2 name or local folder, instead of --model
    seq_len: int = 128
    batch_size: int = 16
    lr: float = 1e-3  # the peak learning rate
    weight_decay: float = 0.0  # AdamW's, on matrices only (not on biases and norm weights), as GPT-2 training does
    lr_schedule: str = "constant"  # after the warm-up: constant, cosine or linear decay to min_lr at the last step
    warmup_steps: int = 0  # steps of linear warm-up from lr / warmup_steps to lr
    min_lr: float | None = None  # where cosine and linear decay end (None: lr / 10)
    eval_every: int = 0  # steps between validation losses on the held-out split (0: at the end only)
    val_fraction: float = 0.01  # of the corpus held out for validation, never trained on (0: no validation)
    val_batches: int = 8  # held-out batches each validation runs (at most; the same ones every time)
    tensorboard: bool = False  # TensorBoard event files in RUN/tensorboard
    wandb: str | None = None  # a Weights & Biases project to log to (needs the wandb client)
    compile: bool = False  # torch.compile every stage's module
    partition: str | list[int] = "auto"
    plan: bool = False  # the planner chooses schedule, microbatches, partition and activation checkpointing
    memory_limit: str | None = None  # bytes per device (text such as 2GiB), for the planner
    virtual_stages: int | None = None
    vocab_size: int = 8192
    out: str = "runs/gpt2"
    seed: int = 0
    log_every: int = 10
    trace_step: int = 5  # the step whose measured timeline is drawn and saved
    timeout: float = 120.0
    threads: int | None = None
    save_every: int = 0  # steps between checkpoints (0: only the final one)
    keep: int = 3  # checkpoints kept in RUN/checkpoints
    resume: str | None = None  # a run folder (or one of its checkpoints) to continue
    fallback: bool = False  # resume from the newest intact checkpoint when the newest is damaged
    max_restarts: int = 0  # torchrun restarts of the whole group after a rank dies


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
    """(tokenizer, batches, held-out batches or None): `val_fraction` of the corpus is held out before anything
    (the tokenizer included) is trained on it. Rank 0 builds the caches first so the other ranks only read them."""
    from stagewise.data import LengthSortedBatches, cache_root, gpt2_tokenizer, pad_id, split_texts, token_windows
    from stagewise.models.hf import data_pad_id, data_tokenizer

    def build():
        texts, held_out = split_texts(_texts(cfg), cfg.val_fraction)  # the same split whatever the seed
        if cfg.pretrained:
            tok = gpt2_tokenizer()
            if tok is None:
                raise RuntimeError("--pretrained needs GPT-2's own tokenizer, which is not in the local Hugging Face "
                                   "cache; download it once where there is network, or train from scratch without "
                                   "--pretrained (a tokenizer is then trained on the corpus)")
        else:  # our BPE, or a Hugging Face folder's own tokenizer.json
            tok = data_tokenizer(cfg.model, texts, cfg.vocab_size)
        windows = token_windows(texts, tok, cfg.seq_len, cache_dir=cache_root() / "tokens")
        pad = pad_id(tok) if cfg.pretrained else data_pad_id(tok, cfg.model)
        held = token_windows(held_out, tok, cfg.seq_len, cache_dir=cache_root() / "tokens") if held_out else []
        val = LengthSortedBatches(held, cfg.batch_size, pad, seed=cfg.seed, drop_last=True) if held else None
        return tok, LengthSortedBatches(windows, cfg.batch_size, pad, seed=cfg.seed, drop_last=True), val

    import torch.distributed as dist

    if world > 1 and rank != 0:
        dist.barrier()
        return build()
    out = build()
    if world > 1:
        dist.barrier()
    return out


def build_layers(cfg: TrainConfig, vocab_size: int, tokenizer: Any = None) -> list[torch.nn.Module]:
    import torch

    from stagewise.models import config, gpt2_layers, load_pretrained
    from stagewise.models.hf import is_hf_model, train_layers

    if cfg.pretrained:
        return load_pretrained(cfg.pretrained)
    if is_hf_model(cfg.model):  # hf:FAMILY (a small config) or a Hugging Face folder
        return train_layers(cfg.model, tokenizer, cfg.seq_len, cfg.seed)
    torch.manual_seed(cfg.seed)
    base = config(cfg.model)
    return gpt2_layers(config(cfg.model, vocab_size=vocab_size, n_positions=max(base.n_positions, cfg.seq_len)))


@dataclass
class _Run:
    """What one rank's run holds once it is set up: the pipeline, its data and where it writes."""

    cfg: TrainConfig
    rank: int
    out: Path
    say: Any
    pipe: Any
    batches: Any
    val: list
    plan: Any
    lr_scheds: list
    model_info: dict[str, Any]
    tokenizer: Any
    start: int  # the step the run continues after (0: a fresh run)
    resumed: dict[str, Any]  # the checkpoint's `extra`
    t0: float = 0.0


@dataclass
class _Progressed:
    """What the training loop measured: per step (step, loss, tokens/s), the last 10 losses of every attempt, the
    first loss of the run, the last validation loss and the planner's prediction checked against the trace."""

    history: list[tuple[int, float, float]]
    recent: list[list[float]]
    first_loss: float | None
    val_loss: float | None = None
    prediction: dict[str, Any] | None = None


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Run the job on this rank; returns the summary (first/last loss, tokens/s) on every rank."""
    run = _set_up(cfg)
    if run.start >= cfg.steps:
        run.say(f"the run is already at step {run.start} of {cfg.steps}: nothing to train (give a larger --steps to "
                "go on)")
        return {"first_loss": run.resumed.get("first_loss"), "steps": cfg.steps, "resumed_from_step": run.start}
    _write_run_files(run)
    return _summarise(run, _train_steps(run))


def _set_up(cfg: TrainConfig) -> _Run:
    """Join the ranks, restore a restarted run's plan, prepare the data, build the pipeline and resume."""
    import torch

    from stagewise import optim
    from stagewise.models import count_parameters
    from stagewise.runtime import launch
    from stagewise.train_logs import Printer

    rank, world = launch.init_from_env(cfg.timeout)
    if world != cfg.stages * cfg.dp:
        n = cfg.stages * cfg.dp
        raise SystemExit(f"stagewise train: --stages {cfg.stages} x --dp {cfg.dp} needs {n} processes but {world} "
                         f"were started; start {n} (torchrun --nproc_per_node={n}) or run `stagewise train` "
                         "directly and let it start them")
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // world))
    if cfg.plan:
        cfg.schedule = cfg.microbatches = cfg.partition = cfg.recompute = "auto"
    out, say = Path(cfg.out), Printer(rank == 0)
    attempt = attempt_number()
    planned = "auto" in (cfg.schedule, cfg.microbatches)
    if planned and attempt > 0 and (out / "config.json").is_file():  # a restart keeps what the first attempt planned
        saved = json.loads((out / "config.json").read_text())
        for key in ("schedule", "microbatches", "virtual_stages", "partition", "recompute"):
            setattr(cfg, key, saved[key])
        planned = "auto" in (cfg.schedule, cfg.microbatches)
    say(f"stagewise train: {cfg.model if not cfg.pretrained else cfg.pretrained} on {cfg.stages} stage(s)"
        f"{f' x {cfg.dp} data-parallel replicas' if cfg.dp > 1 else ''}, "
        f"schedule {cfg.schedule}, {cfg.microbatches} micro-batches, {cfg.steps} steps"
        + (" (auto: chosen by the planner)" if planned else "")
        + (f" (restart {attempt} of at most {cfg.max_restarts})" if attempt else ""))
    t0 = time.perf_counter()
    tok, batches, held_out = prepare_data(cfg, rank, world)
    val = _validation_batches(held_out, cfg.val_batches)
    say(f"data: {len(batches)} batches of {cfg.batch_size} x <= {cfg.seq_len} tokens, vocabulary "
        f"{tok.get_vocab_size()} ({time.perf_counter() - t0:.1f} s); "
        + (f"validation: {len(val)} held-out batches ({cfg.val_fraction:g} of the corpus held out)" if val else
           "no validation" + (f" (the held-out {cfg.val_fraction:g} of the corpus makes no full batch)"
                              if cfg.val_fraction else "")))
    layers = build_layers(cfg, tok.get_vocab_size(), tok)
    sample = next(iter(batches)) if planned or cfg.partition in ("time", "memory", "auto") else None
    params = count_parameters(layers)  # before the Pipeline (sharding swaps a stage's parameters for shards)
    pipe = _pipeline(cfg, layers, sample)
    min_lr = cfg.min_lr if cfg.min_lr is not None else cfg.lr / 10
    lr_scheds = optim.schedulers(pipe.optimizers.values(),
                                 optim.LRSchedule(cfg.lr_schedule, cfg.steps, cfg.warmup_steps, min_lr / cfg.lr))
    if pipe.plan is not None:  # config.json records what runs, so that a resumed run does not plan again
        say(pipe.plan.format())
        (cfg.schedule, cfg.microbatches, cfg.virtual_stages, cfg.partition,
         cfg.recompute) = pipe.plan.choice.settings()
        cfg.plan = False
    say(pipe.partition_table().format())
    say(f"parameters: {params / 1e6:.2f}M (embedding and head tied, counted once)")
    start, resumed = _resume(pipe, cfg, out / "checkpoints", attempt, rank, say)
    optim.load_scheduler_state(lr_scheds, resumed.get("lr_scheduler"), cfg.lr)
    return _Run(cfg, rank, out, say, pipe, batches, val, pipe.plan, lr_scheds,
                _export_info(cfg, layers, tok),  # in every checkpoint, for `stagewise export`
                tok, start, resumed, t0)


def _pipeline(cfg: TrainConfig, layers: list, sample: Any) -> Any:
    """The run's `Pipeline`: AdamW with decay groups, the token-mean loss, the options of the command line."""
    from stagewise import Pipeline, optim
    from stagewise.models import causal_lm_loss, lm_loss
    from stagewise.schedules import SCHEDULES

    # the mean over every label token of the batch, as the unsplit model's cross-entropy; asynchronous schedules
    # step during a batch, before its token count is known, so they take each micro-batch's own token mean
    info = SCHEDULES.get(cfg.schedule)
    loss_fn = lm_loss if info is not None and info.asynchronous else causal_lm_loss
    return Pipeline(layers, loss_fn, schedule=cfg.schedule, microbatches=cfg.microbatches, partition=cfg.partition,
                    virtual_stages=cfg.virtual_stages, timeout=cfg.timeout, sample=sample,
                    memory_limit=cfg.memory_limit, show_partition=False, data_parallel=cfg.dp,
                    max_grad_norm=cfg.max_grad_norm, track_grad_norm=True, precision=cfg.precision,
                    recompute=_recompute_mode(cfg.recompute),
                    on_nonfinite=cfg.on_nonfinite, optimizer=optim.adamw(cfg.lr, cfg.weight_decay),
                    compile=cfg.compile, shard=cfg.shard)


def _write_run_files(run: _Run) -> None:
    """Rank 0 writes what repeats and exports the run: config.json/.toml, the tokenizer, the plan."""
    from stagewise.cli_config import to_toml

    if run.rank != 0:
        return
    out, cfg = run.out, run.cfg
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(cfg), indent=2))
    (out / "config.toml").write_text(to_toml(asdict(cfg), f"`stagewise train --config {out / 'config.toml'}` "
                                             "repeats this run (add --out to write elsewhere)"))
    run.tokenizer.save(str(out / "tokenizer.json"))  # `stagewise export` copies it beside the weights
    if run.plan is not None:
        _write_json(out / "plan.json", run.plan.to_dict())


def _train_steps(run: _Run) -> _Progressed:
    """Steps start+1 .. cfg.steps: train, log every `log_every`, validate, trace one step, save checkpoints."""
    from stagewise import optim
    from stagewise.train_logs import Progress, RunLogs

    cfg, pipe, out, rank, start = run.cfg, run.pipe, run.out, run.rank, run.start
    done = _Progressed([], [list(x) for x in run.resumed.get("recent_losses", [])],  # [step, loss], every attempt
                       run.resumed.get("first_loss"))
    logs = RunLogs(out, start, rank == 0, cfg.tensorboard, cfg.wandb, asdict(cfg))
    data = iter(_batches_from(run.batches, start))
    progress = Progress(rank == 0, cfg.steps, start)
    window_tokens, window_time = 0, 0.0
    saved = start if start else None
    looped = time.perf_counter()
    try:
        for step in range(start + 1, cfg.steps + 1):
            inputs, labels = next(data)
            begin = time.perf_counter()
            loss = pipe.train_step((inputs, labels)).item()
            took = time.perf_counter() - begin
            lr = optim.current_lr(run.lr_scheds)  # the rate this step used
            optim.step_schedulers(run.lr_scheds)
            done.first_loss = loss if done.first_loss is None else done.first_loss
            tokens = int((labels != -100).sum())
            window_tokens, window_time = window_tokens + tokens, window_time + took
            done.history.append((step, loss, tokens / took))
            done.recent = [*done.recent, [step, loss]][-10:]
            progress.update(step, loss, tokens / took)
            if cfg.trace_step and step == min(cfg.trace_step, cfg.steps):
                trace = _save_timelines(pipe, out, rank, cfg.dp)
                if trace is not None and run.plan is not None:
                    done.prediction = _check_prediction(run.plan, pipe, trace, took, cfg.dp, progress)
                if rank == 0 and (out / "timeline.png").exists():
                    logs.image(step, out / "timeline.png")
            evaluate = bool(run.val) and ((cfg.eval_every and step % cfg.eval_every == 0) or step == cfg.steps)
            if step % cfg.log_every == 0 or step == cfg.steps or evaluate:
                tps = window_tokens / window_time
                norm = pipe.last_step.get("grad_norm")
                measured = _measures(pipe)  # collective, before the validation replaces the last step's trace
                done.val_loss = val_loss = _validate(pipe, run.val) if evaluate else None
                eta = (cfg.steps - step) * (time.perf_counter() - looped) / (step - start)
                progress.print(f"step {step} loss {loss:.4f}"
                               + (f"  val {val_loss:.4f} (ppl {math.exp(min(val_loss, 700)):,.1f})"
                                  if val_loss is not None else "")
                               + (f"  lr {lr:.3g}" if lr is not None else "")
                               + (f"  grad norm {norm:.3g}" if norm is not None else "")
                               + f"  ({tps:,.0f} tokens/s, {cfg.steps - step} steps to go, eta {_duration(eta)})")
                if pipe.last_step.get("skipped"):
                    progress.print(f"step {step} skipped: {pipe.last_step['skipped']}")
                logs.write(step, {"loss": loss, "val_loss": val_loss,
                                  "val_perplexity": None if val_loss is None else math.exp(min(val_loss, 700)),
                                  "lr": lr, "grad_norm": norm, "loss_scale": pipe.last_step.get("loss_scale"),
                                  "tokens_per_s": tps, **measured, "elapsed_s": time.perf_counter() - run.t0})
                window_tokens, window_time = 0, 0.0
            if (cfg.save_every and step % cfg.save_every == 0) or step == cfg.steps:
                pipe.save_checkpoint(out / "checkpoints", step=step, keep=cfg.keep,
                                     extra={"data": _position(run.batches, step), "first_loss": done.first_loss,
                                            "model": run.model_info,
                                            "lr_scheduler": optim.scheduler_state(run.lr_scheds),
                                            "recent_losses": done.recent})
                saved = step
            if rank == 0:
                _write_json(out / "progress.json", {"step": step, "loss": loss, "attempt": attempt_number(),
                                                    "checkpoint": saved})
    finally:
        progress.close()
        logs.close()
    return done


def attempt_number() -> int:
    """Which attempt of the run this is: 0, or torchrun's restart count under `--max-restarts`."""
    return int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))


def _summarise(run: _Run, done: _Progressed) -> dict[str, Any]:
    """The run's summary (on every rank; rank 0 prints it and writes summary.json)."""
    cfg, pipe, out, start = run.cfg, run.pipe, run.out, run.start
    history, val_loss, first_loss = done.history, done.val_loss, done.first_loss
    last = sum(loss for _, loss in done.recent) / len(done.recent) if done.recent else float("nan")  # every attempt
    steady = history[len(history) // 5:] or history
    summary = {"first_loss": first_loss, "last_loss_mean10": last,
               "last_loss": history[-1][1] if history else None,
               "tokens_per_s": sum(h[2] for h in steady) / len(steady) if steady else 0.0,
               "steps": cfg.steps, "stages": cfg.stages, "dp": cfg.dp, "schedule": pipe.schedule.name,
               "microbatches": pipe.microbatches, "balance": pipe.balance,
               "resumed_from_step": start, "steps_this_attempt": cfg.steps - start,
               "val_loss": val_loss, "val_perplexity": None if val_loss is None else math.exp(min(val_loss, 700)),
               "seconds": time.perf_counter() - run.t0}
    if done.prediction is not None:
        summary["prediction"] = done.prediction
    drawn = "timeline.png, trace.json, " if cfg.trace_step and start < min(cfg.trace_step, cfg.steps) else ""
    said_val = f"validation loss {val_loss:.3f} (perplexity {summary['val_perplexity']:,.1f}), " \
        if val_loss is not None else ""
    run.say(f"done: loss {first_loss:.3f} -> {last:.3f} (mean of the last 10 steps), {said_val}"
            f"{summary['tokens_per_s']:,.0f} "
            f"tokens/s, {summary['seconds']:.0f} s; wrote {out}/metrics.jsonl, {drawn}checkpoints/")
    if run.rank == 0:
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _export_info(cfg: TrainConfig, layers: Any, tok: Any) -> dict[str, Any]:
    """The transformers config a checkpoint of this run exports with (`stagewise.models.hf.export`)."""
    from stagewise.models import config
    from stagewise.models.hf import export_config, is_hf_model

    native = None
    if not cfg.pretrained and not is_hf_model(cfg.model):
        native = config(cfg.model, vocab_size=tok.get_vocab_size(),
                        n_positions=max(config(cfg.model).n_positions, cfg.seq_len))
    return export_config(layers, native, tok, cfg.pretrained)


def _recompute_mode(value: str) -> str | int:
    return int(value) if value.isdigit() else value


def _resume(pipe: Any, cfg: TrainConfig, root: Path, attempt: int, rank: int, say: Any) -> tuple[int, dict[str, Any]]:
    """(step to continue after, the checkpoint's `extra`: first loss, scheduler, recent losses): load the checkpoint
    to resume from, if any, and say so."""
    from stagewise.runtime.checkpoint import checkpoints_in

    restarted = attempt > 0
    if cfg.resume is None and not restarted:
        return 0, {}
    source = Path(cfg.resume) if cfg.resume and not restarted and (Path(cfg.resume) / "manifest.json").exists() \
        else root
    progress_file = Path(cfg.out) / "progress.json"
    reached = json.loads(progress_file.read_text()).get("step") if progress_file.exists() else None
    if not checkpoints_in(root) and source == root:
        if not restarted:
            raise SystemExit(f"stagewise train: --resume {cfg.resume}: no checkpoint in {root}")
        say(f"restart {attempt}: no checkpoint in {root} yet; starting again from step 0"
            + (f" (the previous attempt had reached step {reached})" if reached else ""))
        _event(Path(cfg.out), rank, {"event": "restart", "attempt": attempt, "from_step": 0, "reached": reached})
        return 0, {}
    manifest = pipe.load_checkpoint(source, fallback=cfg.fallback or restarted)
    step = int(manifest["step"])
    again = f"step {reached} is" if reached == step + 1 else f"steps {step + 1}-{reached} are"
    lost = f"; the previous attempt had reached step {reached}: {again} lost and run again" \
        if reached and reached > step else ""
    skipped = f" (skipped damaged: {', '.join(f for f, _ in manifest['skipped'])})" if manifest["skipped"] else ""
    say(f"{f'restart {attempt}: ' if restarted else ''}resuming from {manifest['path']} (step {step}){skipped}{lost}")
    _event(Path(cfg.out), rank, {"event": "restart" if restarted else "resume", "attempt": attempt, "from_step": step,
                                 "checkpoint": manifest["path"], "reached": reached,
                                 "skipped": [f for f, _ in manifest["skipped"]]})
    extra = manifest.get("extra") or {}
    if extra.get("data", {}).get("next_batch") != step:
        raise SystemExit(f"stagewise train: checkpoint {manifest['path']} has no data position of step {step}: it "
                         "was not written by `stagewise train`")
    return step, extra


def _event(out: Path, rank: int, record: dict[str, Any]) -> None:
    if rank == 0:
        with open(out / "events.jsonl", "a") as f:
            f.write(json.dumps({**record, "time": time.time()}) + "\n")


def _validation_batches(held_out: Any, count: int) -> list[tuple[Any, Any]]:
    """The first `count` batches of the held-out split's first epoch (the same every time, on every rank)."""
    from stagewise.data import collate

    if held_out is None:
        return []
    return [collate([held_out.sequences[i] for i in b], held_out.pad_id) for b in held_out.batch_indices(0)[:count]]


def _validate(pipe: Any, batches: list[tuple[Any, Any]]) -> float:
    """The loss over every label token of the held-out batches (`eval_step`: no gradients, dropout off)."""
    total, tokens = 0.0, 0
    for inputs, labels in batches:
        n = int((labels != -100).sum())
        total += pipe.eval_step((inputs, labels))["loss"].item() * n
        tokens += n
    return total / tokens if tokens else float("nan")


def _measures(pipe: Any) -> dict[str, Any]:
    """The last step's bubble (the mean share of its time the devices waited) and, per stage, the peak memory of the
    device holding it (CUDA: allocated; CPU: the process's peak resident set) and its peak saved activations, in MiB
    (a collective)."""
    import resource

    import torch

    dev = pipe.device
    peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    mine = {"peak": {s: peak / 2**20 for s in pipe.stage_indices},
            "act": {s: b / 2**20 for s, b in pipe.peak_activation_bytes().items()}}
    every = pipe.world.gather({pipe.rank: mine})
    per_stage: dict[str, dict[int, float]] = {"peak": {}, "act": {}}
    for part in every.values():  # data-parallel replicas of a stage: the largest
        for key, values in part.items():
            for s, v in values.items():
                per_stage[key][s] = max(v, per_stage[key].get(s, 0.0))
    bubbles = pipe.last_trace().bubble_per_device()
    return {"bubble": sum(bubbles) / len(bubbles) if bubbles else None,
            "peak_memory_mib": dict(sorted(per_stage["peak"].items())),
            "activation_mib": dict(sorted(per_stage["act"].items()))}


def _duration(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    h, rest = divmod(seconds, 3600)
    return f"{h}h{rest // 60:02d}m" if h else f"{rest // 60}m{rest % 60:02d}s"


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _position(batches: Any, consumed: int) -> dict[str, int]:
    """The data position after `consumed` batches: the next batch is batch `index` of epoch `epoch`."""
    epoch, index = divmod(consumed, len(batches))
    return {"next_batch": consumed, "epoch": epoch, "index": index, "batches_per_epoch": len(batches)}


def _batches_from(batches: Any, start: int):
    """Every batch from the `start`-th on, epoch after epoch (each epoch its own order), as `iter(batches)`
    would give them; the skipped ones are not built."""
    from stagewise.data import collate

    epoch, index = divmod(start, len(batches))
    while True:
        for b in batches.batch_indices(epoch)[index:]:
            yield collate([batches.sequences[i] for i in b], batches.pad_id)
        epoch, index = epoch + 1, 0


def _check_prediction(plan: Any, pipe: Any, trace: Any, step_s: float, dp: int, progress: Any) -> dict[str, Any]:
    """The plan's prediction against the traced step: busy time, bubble and saved-activation bytes per device."""
    from stagewise.measure.trace_costs import compare, format_comparison

    rows = [d * dp for d in range(pipe.schedule.num_devices)]  # replica 0's devices (rows are ranks when dp > 1)
    result = compare(plan.choice, trace, step_s, rows)
    progress.print(format_comparison(result))
    return result


def _save_timelines(pipe: Any, out: Path, rank: int, dp: int) -> Any:
    """The measured timeline of this step beside the simulation of the same schedule with its measured costs (per
    stage F, B, I, W, RECOMPUTE and per device the STEP: optimizer and tie sync); returns the measured timeline on
    rank 0 (None elsewhere)."""
    from stagewise.measure.trace_costs import step_costs
    from stagewise.schedules import simulate
    from stagewise.viz import render_png, write_chrome_trace

    measured = pipe.last_trace()  # collective
    if rank != 0:
        return None
    rows = [d * dp for d in range(pipe.schedule.num_devices)]  # replica 0's devices (rows are ranks when dp > 1)
    sim = simulate(pipe.schedule, step_costs(measured, pipe.schedule, rows).costs())
    sim.timeline.title = f"simulated with the measured per-stage costs: makespan {sim.makespan * 1e3:.1f} ms"
    sim.timeline.unit = "s"
    full = replace(measured, events=list(measured.events))
    shown = [e for e in measured.events if e.op in ("F", "B", "I", "W", "STEP", "OVERLAP_F_B")]
    measured.events = shown
    measured.title = f"measured: {pipe.schedule.describe()}, {measured.makespan * 1e3:.1f} ms"
    render_png([measured, sim.timeline], str(out / "timeline.png"))
    write_chrome_trace([measured, sim.timeline], str(out / "trace.json"))
    return full
