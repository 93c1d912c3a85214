"""The `stagewise` command line: simulate, run, train, partition, plan, check, export, bench."""

from __future__ import annotations

import argparse
import json
import os
import sys

from stagewise.cli_options import (
    GPT2_MODELS,
    MODELS,
    PARTITION_HELP,
    ListModels,
    auto_or,
    check_train,
    existing_path,
    fraction,
    memory_spec,
    nonnegative_float,
    nonnegative_int,
    partition_spec,
    port,
    positive_float,
    positive_int,
    recompute_spec,
    schedule_spec,
    writable_folder,
)
from stagewise.schedules import SCHEDULES, Costs, ScheduleError, build, load, save, simulate, validate
from stagewise.schedules.registry import names


def _simulate(args: argparse.Namespace) -> int:
    if args.list:
        width = max(map(len, SCHEDULES))
        for name, info in SCHEDULES.items():
            print(f"{name:<{width}}  {info.summary}")
        return 0
    if args.file:  # the file decides devices, stages and micro-batches
        schedule = load(args.file)
    else:
        options = {}
        if SCHEDULES.get(args.schedule) and SCHEDULES[args.schedule].asynchronous:
            options["batches"] = args.batches
        schedule = build(args.schedule, args.stages, args.microbatches, args.virtual_stages, **options)
        validate(schedule)
    if args.save:
        save(schedule, args.save)
    costs = Costs(f=args.cost_f, b=args.cost_b, i=args.cost_i, w=args.cost_w, step=args.cost_step,
                  latency=args.comm_latency, bytes=args.comm_bytes, bandwidth=args.comm_bandwidth,
                  overlap=args.overlap)
    sim = simulate(schedule, costs)
    if args.png:
        from stagewise.viz import render_png

        _parent(args.png)
        render_png(sim.timeline, args.png)
    if args.trace:
        from stagewise.viz import write_chrome_trace

        _parent(args.trace)
        write_chrome_trace(sim.timeline, args.trace)
    if args.json:
        print(json.dumps(sim.to_dict()))
        return 0
    from stagewise.viz import render_text

    print(render_text(sim.timeline, width=args.width))
    print()
    print(f"schedule {schedule.name}: {schedule.num_devices} devices, {schedule.num_stages} stages, "
          f"{schedule.microbatches} micro-batches")
    print(f"makespan {sim.makespan:g}   bubble {sim.bubble_fraction:.1%} "
          f"(per device: {', '.join(f'{b:.0%}' for b in sim.bubble_per_device)})")
    print(f"peak in-flight micro-batches per device: {', '.join(f'{x:g}' for x in sim.peak_inflight)}")
    print(f"peak weight versions per device: {', '.join(map(str, sim.peak_weight_versions))}")
    for label, path in (("timeline", args.png), ("trace", args.trace), ("schedule", args.save)):
        if path:
            print(f"{label} written to {path}")
    return 0


def _parent(path: str) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)


def _run(args: argparse.Namespace) -> int:
    """`stagewise run -n P script.py ...`: torchrun on this machine, one process per pipeline device."""
    from stagewise.runtime import status

    if args.nnodes > 1:  # several machines (or launcher invocations): a static rendezvous at the master's address
        argv = ["--nnodes", str(args.nnodes), "--node_rank", str(args.node_rank), "--master_addr", args.master_addr,
                "--master_port", str(args.master_port), "--nproc_per_node", str(args.nproc)]
    else:
        argv = ["--standalone", "--nproc_per_node", str(args.nproc)]
    if args.threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    first = args.node_rank * args.nproc
    return status.launch(argv + [args.script, *args.script_args], range(first, first + args.nproc))


def _check_run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if not args.script:
        parser.error("give the script to run, e.g. `stagewise run -n 2 train.py`")
    if args.node_rank >= args.nnodes:
        parser.error(f"argument --node-rank: must be below --nnodes ({args.nnodes}), got {args.node_rank}")


def _train(args: argparse.Namespace) -> int:
    """`stagewise train`: start one process per stage (unless already under torchrun) and train GPT-2."""
    from stagewise.train import train

    cfg = _train_config(args)
    n = cfg.stages * cfg.dp
    if "RANK" not in os.environ and (n > 1 or cfg.max_restarts):
        from stagewise.runtime import status

        os.environ.setdefault("OMP_NUM_THREADS", str(cfg.threads or max(1, (os.cpu_count() or 1) // n)))
        restarts = ["--max-restarts", str(cfg.max_restarts)] if cfg.max_restarts else []
        return status.launch(["--standalone", "--nproc_per_node", str(n), *restarts, "-m", "stagewise.cli",
                              *sys.argv[1:]], range(n))
    train(cfg)
    return 0


def _check_train(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """The cross-option checks on what will run: the options given over --config's over the resumed run's config
    over defaults."""
    from dataclasses import asdict, fields

    from stagewise.cli_config import apply_config
    from stagewise.train import TrainConfig
    from stagewise.train_logs import missing

    apply_config(parser, args, [f.name for f in fields(TrainConfig)])  # --config FILE: what the command line left
    try:
        cfg = _train_config(args)
    except ValueError as err:
        parser.error(str(err))
    check_train(parser, argparse.Namespace(**asdict(cfg)))
    if cfg.min_lr is not None and cfg.min_lr > cfg.lr:
        parser.error(f"argument --min-lr: {cfg.min_lr:g} is above --lr {cfg.lr:g}; the decay ends below the peak")
    if cfg.eval_every and not cfg.val_fraction:
        parser.error("argument --eval-every: there is nothing to validate on with --val-fraction 0")
    for option, problem in (("--tensorboard", missing(cfg.tensorboard, None)), ("--wandb", missing(False, cfg.wandb))):
        if problem:
            parser.error(f"argument {option}: {problem}")


def _train_config(args: argparse.Namespace):
    """The options given, over the resumed run's config.json (with --resume), over the defaults."""
    from dataclasses import asdict, fields
    from pathlib import Path

    from stagewise.runtime.checkpoint.files import parse_step
    from stagewise.train import TrainConfig

    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if getattr(args, f.name, None) is not None}
    values = asdict(TrainConfig())
    if args.resume:
        run = Path(args.resume)
        if parse_step(run.name) is not None:  # a checkpoint of the run: RUN/checkpoints/step-N
            run = run.parent.parent
        saved = run / "config.json"
        if not saved.is_file():
            raise ValueError(f"--resume {args.resume}: {saved} not found; give the folder of a `stagewise train` run")
        known = {f.name for f in fields(TrainConfig)}
        old = json.loads(saved.read_text())
        values.update({k: v for k, v in old.items() if k in known})
        if "val_fraction" not in old:  # a run from before held-out splits: its tokenizer was trained on everything
            values["val_fraction"] = 0.0
        if given.get("val_fraction", values["val_fraction"]) != values["val_fraction"]:
            raise ValueError(f"argument --val-fraction: the run in {run} holds out {values['val_fraction']:g} of its "
                             "corpus (its tokenizer was trained without it); a resumed run keeps that split")
        given["out"] = str(run)
    values.update(given)
    return TrainConfig(**values)


def _partition(args: argparse.Namespace) -> int:
    """`stagewise partition`: cut a built-in GPT-2 into stages and print the partition table, without training."""
    import torch

    from stagewise.measure.layers import describe_layers, profile_layers
    from stagewise.models import config, gpt2_layers
    from stagewise.models.gpt2 import lm_loss
    from stagewise.partition import PartitionTable, resolve_balance

    cfg = config(args.model, **({"vocab_size": args.vocab_size} if args.vocab_size else {}))
    schedule = build(args.schedule, args.stages, args.microbatches, args.virtual_stages)
    method = args.method
    if isinstance(method, str) and method in ("time", "memory", "auto"):
        torch.manual_seed(0)
        layers = gpt2_layers(cfg)
        per_micro = max(1, args.batch_size // args.microbatches)
        ids = torch.randint(0, cfg.vocab_size, (per_micro, min(args.seq_len, cfg.n_positions)))
        profiles = profile_layers(layers, ids, loss_fn=lm_loss, labels=ids)  # the head measured with its loss
    else:  # names and parameter counts only: build on the meta device, no memory, no time
        profiles = describe_layers(gpt2_layers(cfg, device="meta"))
    limit = args.memory_limit * 2**30 if args.memory_limit else None
    balance = resolve_balance(method, len(profiles), schedule.num_stages, layers=profiles, schedule=schedule,
                              memory_limit=limit)
    if any(p.time > 0 for p in profiles):
        table = PartitionTable.from_profiles(balance, profiles, schedule)
    else:
        table = PartitionTable.build(balance, [p.name for p in profiles], params=[p.params for p in profiles],
                                     shared=[p.shared for p in profiles], placement=schedule.placement)
    if args.json:
        print(json.dumps({"model": args.model, "method": method, **table.to_dict()}, default=str))
    else:
        print(f"{args.model}: {len(profiles)} layers on {schedule.num_stages} stages ({schedule.name}), "
              f"method {method}")
        print(table.format())
    return 0


def _export(args: argparse.Namespace) -> int:
    """`stagewise export CHECKPOINT OUT`: the checkpoint's weights as a Hugging Face folder."""
    from pathlib import Path

    from stagewise.to_hf import export

    config = None
    if args.config:
        path = Path(args.config)
        config = json.loads((path / "config.json" if path.is_dir() else path).read_text())
    try:
        out = export(args.checkpoint, args.out, config=config)
    except RuntimeError as err:  # a damaged checkpoint, transformers missing
        print(f"stagewise export: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}: load it with transformers.AutoModelForCausalLM.from_pretrained({str(out)!r})")
    return 0


def _bench(args: argparse.Namespace) -> int:
    """`stagewise bench [options]`: stagewise against torch.distributed.pipelining (benchmarks/bench_vs_torch.py)."""
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = root / "benchmarks" / "bench_vs_torch.py"
    if not script.is_file():
        raise SystemExit(f"stagewise bench: {script} not found; the benchmarks ship with the source tree, "
                         "not with an installed package")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    return subprocess.call([sys.executable, str(script), *args.bench_args], env=env)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="stagewise", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    sim = sub.add_parser("simulate", help="build, validate and simulate a schedule; draw its timeline")
    sim.add_argument("--list", action="store_true", help="list the schedules and exit")
    sim.add_argument("--schedule", default="1f1b", help="schedule name (see --list)")
    sim.add_argument("--file", help="simulate the schedule in this CSV file instead (one row of actions per device, "
                     "as torch.distributed.pipelining writes them); it decides devices and micro-batches")
    sim.add_argument("--save", help="write the schedule to this CSV file (synchronous schedules)")
    sim.add_argument("--stages", type=int, default=4, help="pipeline devices P")
    sim.add_argument("--microbatches", type=int, default=8, help="micro-batches m per batch")
    sim.add_argument("--virtual-stages", type=int, default=None,
                     help="virtual stages per device (interleaved, looped-bfs, zbv, v-half, v-min, dualpipev)")
    sim.add_argument("--batches", type=int, default=3, help="batches run back to back (asynchronous schedules)")
    sim.add_argument("--cost-f", type=float, default=1.0, help="forward time per stage")
    sim.add_argument("--cost-b", type=float, default=None, help="full backward time (default I+W, or 2*F)")
    sim.add_argument("--cost-i", type=float, default=None, help="input-gradient time (default B/2)")
    sim.add_argument("--cost-w", type=float, default=None, help="weight-gradient time (default B-I)")
    sim.add_argument("--cost-step", type=float, default=0.0, help="optimizer step time")
    sim.add_argument("--comm-latency", type=float, default=0.0, help="per-message latency")
    sim.add_argument("--comm-bytes", type=float, default=0.0, help="bytes crossing each stage boundary")
    sim.add_argument("--comm-bandwidth", type=float, default=float("inf"), help="bytes per time unit")
    sim.add_argument("--overlap", action="store_true",
                     help="overlapped F+B pairs (dualpipev) take max(F, B) rather than F + B")
    sim.add_argument("--png", help="write the timeline as a PNG")
    sim.add_argument("--trace", help="write a Chrome/Perfetto trace JSON")
    sim.add_argument("--json", action="store_true", help="print one JSON object instead of the text timeline")
    sim.add_argument("--width", type=int, default=100, help="text timeline width in columns")
    sim.set_defaults(func=_simulate)

    defaults = argparse.ArgumentDefaultsHelpFormatter  # every option's help ends with its default
    run = sub.add_parser("run", help="launch a script on P local processes (a thin torchrun)", formatter_class=defaults)
    run.add_argument("-n", "--nproc", type=positive_int, default=2,
                     help="processes on this node (pipeline devices x data replicas)")
    run.add_argument("--nnodes", type=positive_int, default=1, help="machines (launcher invocations) in the job")
    run.add_argument("--node-rank", dest="node_rank", type=nonnegative_int, default=0,
                     help="this machine's index, 0..nnodes-1")
    run.add_argument("--master-addr", dest="master_addr", default="127.0.0.1", help="node 0's address")
    run.add_argument("--master-port", dest="master_port", type=port, default=29500, help="a free port on node 0")
    run.add_argument("--threads", type=positive_int, default=None,
                     help="intra-op threads per process (OMP_NUM_THREADS)")
    run.add_argument("script", nargs="?", type=existing_path, help="the Python script every rank runs")
    run.add_argument("script_args", nargs=argparse.REMAINDER, help="arguments for the script")
    run.set_defaults(func=_run, check=lambda a: _check_run(run, a))

    pa = sub.add_parser("partition", help="print how a built-in GPT-2 is cut into stages (no training)",
                        formatter_class=defaults)
    pa.add_argument("--model", default="gpt2", choices=GPT2_MODELS, metavar="MODEL", help="one of: %(choices)s")
    pa.add_argument("--stages", type=positive_int, default=4, help="pipeline devices")
    pa.add_argument("--method", type=partition_spec, default="type:GPT2Block", help=PARTITION_HELP)
    pa.add_argument("--schedule", type=schedule_spec, default="1f1b", metavar="NAME",
                    help=f"the schedule (memory and auto depend on it), one of: {names()}")
    pa.add_argument("--microbatches", type=positive_int, default=8, help="micro-batches per batch")
    pa.add_argument("--virtual-stages", type=positive_int, default=None, help="virtual stages per device")
    pa.add_argument("--batch-size", dest="batch_size", type=positive_int, default=16, help="for measured methods")
    pa.add_argument("--seq-len", dest="seq_len", type=positive_int, default=128, help="for measured methods")
    pa.add_argument("--vocab-size", dest="vocab_size", type=positive_int, default=None, help="the model's by default")
    pa.add_argument("--memory-limit", dest="memory_limit", type=positive_float, default=None, help="GiB per device")
    pa.add_argument("--json", action="store_true", help="print one JSON object")
    pa.set_defaults(func=_partition)

    from stagewise.plan_cli import add_parsers
    from stagewise.train import TrainConfig

    add_parsers(sub)  # plan, check
    d = TrainConfig()
    tr = sub.add_parser("train", help="train GPT-2 on the pipeline (starts its own processes)",
                        description="Every option is checked before anything starts.")

    def opt(*names: str, **kw) -> None:  # default None: with --resume, options given replace the run's config
        dest = kw.get("dest", names[0].lstrip("-").replace("-", "_"))
        if kw.get("action") != "store_true":
            kw["help"] = f"{kw.get('help', '')} (default: {getattr(d, dest)})".lstrip()
        else:  # --flag and --no-flag: either overrides --config
            kw["action"] = argparse.BooleanOptionalAction
        tr.add_argument(*names, default=None, **kw)

    tr.add_argument("--config", type=existing_path, default=None, metavar="FILE",
                    help="options from a TOML (or JSON) file, keys as the options (seq_len or seq-len); the command "
                         "line overrides it. A run writes RUN/config.toml: --config RUN/config.toml repeats it")
    opt("--stages", type=positive_int, help="pipeline devices (processes)")
    opt("--dp", type=positive_int, help="data-parallel replicas of the pipeline: stages x dp processes")
    opt("--shard", choices=["none", "optimizer", "gradients", "full"],
        help="what --dp replicas split between them: optimizer state (optimizer, ZeRO-1), and gradients (gradients, "
             "ZeRO-2), and weights (full, ZeRO-3, FSDP2)")
    opt("--precision", choices=["fp32", "bf16", "fp16"], help="compute precision of the stages")
    opt("--recompute", dest="recompute", type=auto_or(recompute_spec),
        help="never, except_last, always, N layers per checkpointed group, or auto (the planner's choice)")
    opt("--max-grad-norm", dest="max_grad_norm", type=positive_float,
        help="clip gradients by their global norm (every stage and replica); the norm is logged anyway")
    opt("--on-nonfinite", dest="on_nonfinite", choices=["raise", "skip"],
        help="a step with a NaN/inf loss or gradient: stop, naming where it appeared, or skip it")
    opt("--schedule", type=auto_or(schedule_spec), metavar="NAME",
        help=f"one of: {names()}; or a schedule file (.csv); or auto: the planner's choice")
    opt("--microbatches", type=auto_or(positive_int), help="micro-batches per batch, or auto: the planner's choice")
    opt("--plan", action="store_true", help="the planner chooses schedule, m, partition and activation "
        "checkpointing (overrides those options); its table is printed and saved as plan.json")
    opt("--memory-limit", dest="memory_limit", type=memory_spec,
        help="bytes per device for the planner and the memory/auto partitions, e.g. 2GiB")
    opt("--steps", type=positive_int, help="the run's total steps (a resumed run stops there too)")
    opt("--model", choices=MODELS, metavar="MODEL",
        help="one of: %(choices)s (a local Hugging Face folder); see --list-models")
    tr.add_argument("--list-models", action=ListModels)
    opt("--pretrained", help="Hugging Face GPT-2 weights (name or local folder)")
    opt("--data", type=existing_path, help="a text file or folder; none: the built-in corpus")
    opt("--dataset", choices=["squad"], help="SQuAD contexts via Hugging Face datasets")
    opt("--seq-len", dest="seq_len", type=positive_int, help="tokens per sample")
    opt("--batch-size", dest="batch_size", type=positive_int, help="samples per batch (at least dp x microbatches)")
    opt("--lr", type=positive_float, help="AdamW's peak learning rate")
    opt("--weight-decay", dest="weight_decay", type=nonnegative_float,
        help="AdamW's weight decay, on matrices (linear and embedding weights), not on biases and norms")
    opt("--lr-schedule", dest="lr_schedule", choices=["constant", "cosine", "linear"],
        help="after the warm-up: keep --lr, or decay it to --min-lr at the last step")
    opt("--warmup-steps", dest="warmup_steps", type=nonnegative_int,
        help="steps of linear warm-up to --lr (lr / N, 2 lr / N, ...)")
    opt("--min-lr", dest="min_lr", type=nonnegative_float, help="where cosine and linear decay end (None: lr / 10)")
    opt("--eval-every", dest="eval_every", type=nonnegative_int,
        help="steps between validation losses on the held-out split (0: at the end only)")
    opt("--val-fraction", dest="val_fraction", type=fraction,
        help="share of the corpus held out for validation, never trained on (0: no validation)")
    opt("--val-batches", dest="val_batches", type=positive_int, help="held-out batches each validation runs")
    opt("--tensorboard", action="store_true",
        help="write TensorBoard event files to RUN/tensorboard (needs the tensorboard package)")
    opt("--wandb", metavar="PROJECT", help="log to this Weights & Biases project (needs the wandb client)")
    opt("--compile", action="store_true", help="torch.compile every stage's module (inductor where a compiler is "
        "found, else aot_eager); parameter and checkpoint names are unchanged")
    opt("--partition", type=partition_spec, help=PARTITION_HELP)
    opt("--virtual-stages", type=positive_int,
        help="virtual stages per device (interleaved, looped-bfs, zbv, v-half, v-min, dualpipev)")
    opt("--vocab-size", dest="vocab_size", type=positive_int, help="tokenizer vocabulary (trained on the corpus)")
    opt("--out", type=writable_folder, help="run folder")
    opt("--seed", type=int, help="model and data order")
    opt("--log-every", dest="log_every", type=positive_int, help="steps per log line")
    opt("--trace-step", dest="trace_step", type=nonnegative_int, help="the step whose timeline is drawn (0: none)")
    opt("--timeout", type=positive_float, help="seconds any wait on another stage may take")
    opt("--threads", type=positive_int, help="intra-op threads per process")
    opt("--save-every", dest="save_every", type=nonnegative_int,
        help="checkpoint every K steps into RUN/checkpoints (0: at the end only)")
    opt("--keep", type=positive_int, help="checkpoints kept")
    opt("--resume", help="continue the run in this folder (or from one of its checkpoints) up to its --steps")
    opt("--fallback", action="store_true",
        help="with --resume: if the newest checkpoint is damaged, use the newest intact one (restarts always do)")
    opt("--max-restarts", dest="max_restarts", type=nonnegative_int,
        help="when a rank dies, restart every rank from the newest intact checkpoint up to R times (torchrun's)")
    tr.set_defaults(func=_train, check=lambda a: _check_train(tr, a))
    ex = sub.add_parser("export", help="write a checkpoint as a Hugging Face folder that "
                        "transformers.AutoModelForCausalLM.from_pretrained loads")
    ex.add_argument("checkpoint", type=existing_path,
                    help="a `stagewise train` run folder, a checkpoints folder or one step-N folder (the newest "
                         "intact checkpoint is taken)")
    ex.add_argument("out", type=writable_folder, help="the folder to write (config.json, model.safetensors, "
                    "tokenizer.json when the run has one)")
    ex.add_argument("--config", type=existing_path, default=None,
                    help="the model's config.json (or its Hugging Face folder), for a checkpoint that does not carry "
                         "one (those of `stagewise train` do)")
    ex.set_defaults(func=_export)
    # Every option goes to the benchmark script unparsed (`stagewise bench --help` shows its own help).
    be = sub.add_parser("bench", help="benchmark against torch.distributed.pipelining (see `stagewise bench --help`)",
                        prefix_chars="+", add_help=False)
    be.add_argument("bench_args", nargs=argparse.REMAINDER, help="options of benchmarks/bench_vs_torch.py")
    be.set_defaults(func=_bench)
    return parser


RENAMED = {  # old option -> (its name now, why)
    "--chunks": ("--virtual-stages", "stages per device; `chunks` now means micro-batches only, in GPipe"),
    "--activation-checkpointing": ("--recompute", "forwards that keep only their input and recompute "
                                                  "(checkpoints are saved training state)"),
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    for old, (new, why) in RENAMED.items():
        if any(a == old or a.startswith(old + "=") for a in (sys.argv[1:] if argv is None else argv)):
            parser.error(f"{old} was renamed {new}: {why}")
    args = parser.parse_args(argv)
    if getattr(args, "check", None) is not None:  # what depends on several options, before anything starts
        args.check(args)
    try:
        return args.func(args)
    except (ScheduleError, ValueError) as err:
        print(f"stagewise: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
