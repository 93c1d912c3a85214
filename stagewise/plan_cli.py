"""`stagewise plan` and `stagewise check`: the planner's table, and the one-call parity check, from the command line.

Both take a built-in GPT-2 (`--model`, `--batch`, `--seq-len`, `--vocab-size`) or your own model:
`--layers module:function` (returns the list of layers), `--loss module:function` (the loss itself) and
`--sample module:function` (called with the batch size, returns `(inputs, labels)`); modules are
imported from the current directory or PYTHONPATH.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any

from stagewise.cli_options import MODELS, nonnegative_float, positive_float


def load_object(spec: str) -> Any:
    """`module:attribute` imported (the current directory is on the path)."""
    if ":" not in spec:
        raise ValueError(f"expected module:function, got {spec!r}")
    module, _, name = spec.partition(":")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        obj = importlib.import_module(module)
    except ImportError as err:
        raise ValueError(f"cannot import {module!r} (from {spec!r}): {err}") from None
    for part in name.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"{module!r} has no attribute {name!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def build_model(args: argparse.Namespace) -> tuple[list[Any], Any, tuple[Any, Any], str]:
    """(layers, loss_fn, batch, description) from the options."""
    import torch

    if args.layers:
        if not args.loss or not args.sample:
            raise ValueError("--layers needs --loss module:function and --sample module:function (batch size -> "
                             "(inputs, labels))")
        layers = list(load_object(args.layers)())
        return layers, load_object(args.loss), tuple(load_object(args.sample)(args.batch)), args.layers
    from stagewise.models import config, gpt2_layers, lm_loss
    from stagewise.models.hf import is_hf_model, sample_model

    if is_hf_model(args.model):  # hf:FAMILY or a Hugging Face folder
        return (*sample_model(args.model, args.batch, args.seq_len, args.vocab_size, args.seed), args.model)
    base = config(args.model)
    cfg = config(args.model, vocab_size=args.vocab_size or base.vocab_size,
                 n_positions=max(base.n_positions, args.seq_len))
    torch.manual_seed(args.seed)
    layers = gpt2_layers(cfg)
    g = torch.Generator().manual_seed(args.seed + 1)
    ids = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g)
    labels = torch.randint(0, cfg.vocab_size, (args.batch, args.seq_len), generator=g)
    return layers, lm_loss, (ids, labels), args.model


def _model_args(p: argparse.ArgumentParser, batch: int, seq_len: int) -> None:
    p.add_argument("--model", default="gpt2-tiny", choices=MODELS, metavar="MODEL",
                   help="one of: %(choices)s (PATH: a local Hugging Face folder) (default: %(default)s)")
    p.add_argument("--layers", help="module:function returning your list of layers (instead of --model)")
    p.add_argument("--loss", help="module:function, the loss (output, labels) -> scalar or (sum, count), with --layers")
    p.add_argument("--sample", help="module:function, batch size -> (inputs, labels), with --layers")
    p.add_argument("--batch", "--batch-size", dest="batch", type=int, default=batch, help="samples per batch")
    p.add_argument("--seq-len", dest="seq_len", type=int, default=seq_len, help="tokens per sample (GPT)")
    p.add_argument("--vocab-size", dest="vocab_size", type=int, default=None, help="GPT vocabulary")
    p.add_argument("--seed", type=int, default=0)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers separated by commas, got {text!r}") from None


def _plan(args: argparse.Namespace) -> int:
    import torch

    from stagewise.measure.plan_model import plan_model
    from stagewise.partition.plan_search import MAX_MICROBATCHES

    layers, loss_fn, batch, what = build_model(args)
    threads = args.threads or max(1, (os.cpu_count() or 1) // (args.stages * args.dp))
    torch.set_num_threads(threads)
    latency, bandwidth, reduce_bandwidth = _links(args, layers)
    plan, profiles = plan_model(
        layers, loss_fn, batch, args.stages, data_parallel=args.dp,
        schedule=args.schedules or "auto", microbatches=args.microbatches or "auto", memory_limit=args.memory_limit,
        threads=threads, runs=args.runs, repeats=args.repeats, recompute=args.recompute,
        cores=args.cores if args.cores is not None else "auto", top=args.top,
        max_microbatches=args.max_microbatches or MAX_MICROBATCHES, precision=args.precision,
        latency=latency, bandwidth=bandwidth, reduce_bandwidth=reduce_bandwidth, shard=args.shard)
    data = {"model": what, **plan.to_dict(), "threads": threads}
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(data, indent=2))
    if args.json:
        print(json.dumps(data))
    else:
        print(f"{what}: {len(layers)} layers, {args.stages} devices, batch {args.batch}, {threads} thread(s) per rank")
        print(plan.format())
    return 0


def _links(args: argparse.Namespace, layers: list[Any]) -> tuple[float | None, float | None, float | None]:
    """(latency, bandwidth, reduce_bandwidth) for the planner: as given, else timed between gloo processes started
    on this machine (messages with --measure-links: the command profiles on the CPU, where messages are not
    charged by default; the data-parallel reduction with --dp), else None (free). The command line may start
    processes; `Pipeline` never does."""
    from stagewise.measure.links import local_links
    from stagewise.measure.plan_model import MESSAGE_BYTES, stage_gradient_bytes

    latency, bandwidth, reduce_bandwidth = args.latency, args.bandwidth, args.reduce_bandwidth
    messages = bool(args.measure_links) and args.stages > 1 and (latency is None or bandwidth is None)
    if messages or (args.dp > 1 and reduce_bandwidth is None):
        links = local_links(args.stages if messages else 1, args.dp if reduce_bandwidth is None else 1,
                            MESSAGE_BYTES, stage_gradient_bytes(layers, args.stages))
        latency = links.latency if latency is None else latency
        bandwidth = links.bandwidth if bandwidth is None else bandwidth
        reduce_bandwidth = links.reduce_bandwidth if reduce_bandwidth is None else reduce_bandwidth
    return latency, bandwidth, reduce_bandwidth


def _check(args: argparse.Namespace) -> int:
    import torch

    from stagewise.parity import check

    layers, loss_fn, batch, what = build_model(args)
    dtype = {"float64": torch.float64, "float32": torch.float32}[args.dtype]
    report = check(layers, loss_fn, batch, schedule=args.schedule, stages=args.stages,
                   microbatches=args.microbatches, partition=args.partition, virtual_stages=args.virtual_stages,
                   dtype=dtype,
                   tolerance=args.tolerance)
    if args.json:
        print(json.dumps({"model": what, **report.to_dict()}))
    else:
        print(f"{what}: {len(layers)} layers")
        print(report.format())
    return 0 if report.ok else 1


def add_parsers(sub: Any) -> None:
    """Register `plan` and `check` on the CLI's subparsers."""
    from stagewise.schedules.registry import names

    pl = sub.add_parser("plan", help="choose schedule, micro-batches, virtual_stages and balance together under a "
                                     "memory "
                                     "limit (profiles the model, simulates every candidate)")
    _model_args(pl, batch=16, seq_len=128)
    pl.add_argument("--stages", type=int, default=4, help="pipeline devices P")
    pl.add_argument("--dp", type=int, default=1, help="data-parallel replicas D (P x D ranks)")
    pl.add_argument("--shard", choices=("none", "optimizer", "gradients", "full"), default="none",
                    help="what the D replicas split (as `train --shard`): the memory model counts the shards, the "
                         "all-gathered weights and the whole gradients until their reduce-scatter")
    pl.add_argument("--memory-limit", dest="memory_limit", default=None,
                    help="bytes per device, with a unit if you like: 2GiB, 512MiB, 1.5GB")
    pl.add_argument("--schedules", nargs="+", default=None,
                    help=f"schedules to consider (default: every synchronous one of {names(False)})")
    pl.add_argument("--microbatches", type=_ints, default=None,
                    help="m to consider, e.g. 4,8,16 (default: divisors of the per-replica batch from P up to "
                         "--max-microbatches)")
    pl.add_argument("--max-microbatches", dest="max_microbatches", type=int, default=None)
    pl.add_argument("--recompute", dest="recompute", default="auto",
                    choices=["auto", "never", "except_last", "always"],
                    help="recompute modes to consider: auto (every one: they only win under a memory limit; "
                         "default) or one held fixed")
    pl.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                    help="profile the forwards under this autocast, as `train --precision` runs them")
    pl.add_argument("--latency", type=nonnegative_float, default=None,
                    help="seconds per message between devices (default 0, or measured with --measure-links)")
    pl.add_argument("--bandwidth", type=positive_float, default=None,
                    help="bytes/s of a message between devices (default unlimited, or measured with --measure-links)")
    pl.add_argument("--measure-links", dest="measure_links", action="store_true", default=None,
                    help="time messages between 2 gloo processes here and charge them as link delays (on CPU "
                         "ranks they cost the cores' time instead, so this is off by default)")
    pl.add_argument("--reduce-bandwidth", dest="reduce_bandwidth", type=positive_float, default=None,
                    help="with --dp: the gradient all-reduce's speed in bytes/s (ring units); default: measured "
                         "with D gloo processes on this machine")
    pl.add_argument("--runs", type=int, default=3, help="profile runs per micro-batch size (the noise estimate)")
    pl.add_argument("--repeats", type=int, default=3, help="timed repetitions per layer and run (the fastest counts)")
    pl.add_argument("--threads", type=int, default=None, help="intra-op threads per rank (default cores / ranks)")
    pl.add_argument("--cores", type=int, default=None,
                    help="cores the ranks share (default: this machine's on CPU; 0: unlimited, e.g. one GPU each)")
    pl.add_argument("--top", type=int, default=5, help="candidates shown")
    pl.add_argument("--out", default=None, help="also write the plan as JSON to this file")
    pl.add_argument("--json", action="store_true", help="print one JSON object")
    pl.set_defaults(func=_plan)

    ch = sub.add_parser("check", help="run a pipeline and one process on the same batch (float64) and print the "
                                      "worst relative difference of the loss and every gradient")
    _model_args(ch, batch=8, seq_len=32)
    ch.add_argument("--schedule", default="1f1b", help=f"one of {names(False)}")
    ch.add_argument("--stages", type=int, default=2, help="pipeline devices (threads of this process)")
    ch.add_argument("--microbatches", type=int, default=4)
    ch.add_argument("--partition", default="uniform", help="uniform, parameters, type:REGEX, or counts like 2,1,1,2")
    ch.add_argument("--virtual-stages", type=int, default=None)
    ch.add_argument("--dtype", choices=("float64", "float32"), default="float64")
    ch.add_argument("--tolerance", type=float, default=None, help="default 1e-10 (float64), 1e-4 (float32)")
    ch.add_argument("--json", action="store_true", help="print one JSON object")
    ch.set_defaults(func=_check)
