"""docs/benchmarks.md, generated from the benchmarks' own JSON lines in docs/results/ (no figure is typed by hand).

    python benchmarks/pages.py            # (re)write docs/benchmarks.md from docs/results/*.jsonl
    python benchmarks/pages.py --check    # exit 1 when docs/benchmarks.md is not what it would write

To refresh a section, run its benchmark with `--out docs/results/NAME.jsonl` (the command is printed under each
table; delete the old file first, or the newest line of each row wins), then `make bench-pages`. The machine,
the settings and the date printed with each table are read from the lines themselves (`_common.bench_meta`).
A results file that is missing gives a section that says so. tests/test_docs.py runs `--check`.

No torch here: it reads JSON and writes Markdown.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results"
PAGE = ROOT / "docs" / "benchmarks.md"

Row = dict[str, Any]
med = statistics.median


# ---- reading


def read(name: str, key: Callable[[Row], Any], kind: str | None = "summary") -> list[Row]:
    """The lines of docs/results/NAME (of `kind`, when the lines have one), in file order; of several lines with
    the same `key` the last one wins (a file appended to by a second run shows the newer numbers)."""
    path = RESULTS / name
    if not path.is_file():
        return []
    rows: dict[Any, Row] = {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        if kind is not None and row.get("kind", kind) != kind:
            continue
        rows.pop(key(row), None)
        rows[key(row)] = row
    return list(rows.values())


# ---- formatting


def spread(values: Sequence[float], spec: str = ".3f") -> str:
    """Median [min-max]; the median alone for one value."""
    if len(values) == 1:
        return f"{values[0]:{spec}}"
    return f"{med(values):{spec}} [{min(values):{spec}}-{max(values):{spec}}]"


def table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return lines + [""]


def balance(values: Sequence[int]) -> str:
    return "[" + ",".join(map(str, values)) + "]"


def provenance(rows: Sequence[Row], file: str, command: str) -> list[str]:
    """Where the table's numbers come from: the file, the command, the date(s), the machine, the settings."""
    times = sorted({r["time"] for r in rows})
    when = times[0].replace("T", " ")[:16] + (f" to {times[-1].replace('T', ' ')[:16]}" if len(times) > 1 else "")
    machines = []
    for r in rows:
        m = r.get("machine")
        if m is None:
            text = f"host {r.get('host', '?')} (machine not recorded)"
        else:
            text = (f"{m['cores']} CPU cores ({m['cpu']}), " + (f"GPU {m['gpu']}" if m.get("gpu") else "no GPU")
                    + f", Python {m['python']}")
        text += f", torch {r['torch']}" if "torch" in r else ""
        if text not in machines:
            machines.append(text)
    loads = sorted({r["machine"]["load_1min"] for r in rows if "load_1min" in r.get("machine", {})})
    load = (f"; 1-minute load average when the lines were written (the benchmark's own processes included): "
            f"{loads[0]:g}" + (f" to {loads[-1]:g}" if len(loads) > 1 else "") if loads else "")
    settings = []
    for r in rows:
        text = ", ".join(f"{k}={_value(v)}" for k, v in r.get("settings", {}).items())
        if text not in settings:
            settings.append(text)
    return [f"*Measured {when} on {'; '.join(machines)}{load}. From `docs/results/{file}`, written by `{command}`; "
            f"settings: {' / '.join(settings)}.*", ""]


def _value(v: Any) -> str:
    if isinstance(v, list | tuple):
        return ",".join(_value(x) for x in v) if not any(isinstance(x, list | tuple) for x in v) else \
            " ".join(_value(x).replace(",", "-") for x in v)
    return f"{v:g}" if isinstance(v, float) else str(v)


def missing(file: str, command: str) -> list[str]:
    return [f"*No results yet: `docs/results/{file}` is missing (run `{command}`).*", ""]


# ---- the sections


def schedules() -> list[str]:
    file, command = "schedules.jsonl", "python benchmarks/bench_schedules.py --out docs/results/schedules.jsonl"
    rows = read(file, key=lambda r: r["schedule"])
    out = ["## Building, validating and simulating schedules", ""]
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    out += [f"`benchmarks/bench_schedules.py`: every registered schedule built, validated (the lowering to "
            f"communication and the deadlock check included) and simulated at P={s['devices']} devices, "
            f"m={s['microbatches']} micro-batches (v={s['virtual_stages']} virtual stages for the schedules that "
            "have several), with unit costs. The goal is under 1 s per schedule. \"simulate\" after validate reuses "
            "the unit-cost run that validate made (it is kept on the schedule); \"simulate alone\" is a fresh build "
            "simulated without validating.", ""]
    out += provenance(rows, file, command)
    out += table(["schedule", "v", "actions (lowered)", "build s", "validate s", "simulate s", "total s",
                  "simulate alone s", "bubble"],
                 [[r["schedule"], r["virtual_stages"], f"{r['actions']:,}", f"{r['build_s']:.2f}",
                   f"{r['validate_s']:.2f}", f"{r['simulate_s']:.2f}", f"{r['total_s']:.2f}",
                   f"{r['simulate_alone_s']:.2f}", f"{r['bubble_fraction']:.1%}"] for r in rows])
    slowest = max(rows, key=lambda r: r["total_s"])
    under = sum(r["total_s"] < 1 for r in rows)
    out += [f"{under} of {len(rows)} schedules under 1 s; the slowest, {slowest['schedule']}, took "
            f"{slowest['total_s']:.2f} s for {slowest['actions']:,} actions.", ""]
    return out


def model_text(s: Row, tie: bool) -> str:
    return (f"a {s['n_layer'] + 2}-layer GPT (embedding, {s['n_layer']} GPT-2 blocks of d{s['n_embd']} with "
            f"{s['n_head']} heads, head over a vocabulary of {s['vocab']:,}, {'tied' if tie else 'untied'}) on "
            f"one fixed batch of {s['batch']} x {s['seq_len']} random token ids, Adam")


def runtime() -> list[str]:
    file = "runtime.jsonl"
    rows = read(file, key=lambda r: r["config"])
    out = ["## The runtime against its simulated ideal", ""]
    command = "python benchmarks/bench_runtime.py --out docs/results/runtime.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    command = (f"python benchmarks/bench_runtime.py --steps {s['steps']} --repeats {s['repeats']} --warmup "
               f"{s['warmup']} --out docs/results/{file}")
    out += ["`benchmarks/bench_runtime.py`: tokens/s of " + ", ".join(s["schedules"]) + " with m = "
            + ", ".join(map(str, s["microbatches"])) + f" on {model_text(s, True)}, with 2 ranks of 1 intra-op "
            "thread, next to a single process (`nn.Sequential`, 1 and 2 threads) in the same rounds; and the step "
            "time the simulator predicts from the per-action costs measured in that step (measured / ideal: 1 "
            f"means the runtime adds nothing to its schedule). {s['repeats']} rounds of {s['steps']} timed step(s) "
            "per configuration, alternating; median [min-max] over the rounds.", ""]
    out += provenance(rows, file, command)
    body = []
    for r in rows:
        pipe = "ideal_s" in r
        fb = ("/".join(f"{f + b:.0f}" for f, b in zip(r["f_ms"], r["b_ms"])) if pipe else "-")
        body.append([r["config"], balance(r["balance"]) if pipe else "-", spread(r["tokens_per_s"], ".0f"),
                     spread(r["vs_single_1t"], ".2f"), spread(r["vs_single_2t"], ".2f"),
                     spread(r["measured_over_ideal"], ".2f") if pipe else "-", fb,
                     f"{1e3 * med(r['outside_trace_s']):.1f}" if pipe else "-"])
    out += table(["configuration", "balance", "tokens/s", "vs 1 process, 1 thread", "vs 1 process, 2 threads",
                  "measured / simulated ideal", "F + B ms per micro-batch, per stage", "ms per step outside the "
                  "traced actions"], body)
    pipes = [r for r in rows if "ideal_s" in r]
    if pipes:
        ratios = [med(r["measured_over_ideal"]) for r in pipes]
        out += [f"Measured / ideal ranges {min(ratios):.2f}-{max(ratios):.2f} over the pipelines: what separates "
                "the pipeline from twice the single process is the schedule's own bubble and the split's balance "
                "(the per-stage F + B column), which the ideal already contains.", ""]
    return out


def partition() -> list[str]:
    file = "partition.jsonl"
    rows = read(file, key=lambda r: (r["stages"], r["method"]))
    out = ["## Partitioning methods", ""]
    command = "python benchmarks/bench_partition.py --out docs/results/partition.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    stages = sorted({r["stages"] for r in rows})
    command = (f"python benchmarks/bench_partition.py --stages {' '.join(map(str, stages))} --steps {s['steps']} "
               f"--repeats {s['repeats']} --warmup {s['warmup']} --out docs/results/{file}")
    out += ["`benchmarks/bench_partition.py`: the step time of the balance each partition method chooses, on "
            f"{model_text(s, True)}: a large vocabulary, so the embedding holds most parameters and the head "
            f"costs several blocks' time, and the methods disagree. Schedule {s['schedule']}, m={s['microbatches']}, "
            "one rank of one thread per stage; the methods alternate over the rounds. \"Predicted\" is the "
            "partitioner's own model (`Planner.predict` over the layer profile the time/auto pipelines measured: "
            "compute and the tied-parameter wait; no communication, no optimizer). With more ranks than cores the "
            "ranks share them: read those rows for the ranking, not the absolute value.", ""]
    out += provenance(rows, file, command)
    for P in stages:
        part = [r for r in rows if r["stages"] == P]
        out += [f"**{P} stages** ({P} ranks x 1 thread)", ""]
        out += table(["method", "balance", "step s", "speed-up vs uniform", "predicted step s", "predicted speed-up",
                      "F + B ms per micro-batch per stage, measured", "predicted"],
                     [[r["method"], balance(r["balance"]), spread(r["step_s"]),
                       spread(r["speedup_vs_uniform"], ".2f") if "speedup_vs_uniform" in r else "-",
                       f"{r['predicted_s']:.3f}" if "predicted_s" in r else "-",
                       f"{r['predicted_speedup']:.2f}" if "predicted_speedup" in r else "-",
                       "/".join(f"{v:.0f}" for v in r["stage_compute_ms"]),
                       "/".join(f"{v:.0f}" for v in r["predicted_stage_ms"]) if "predicted_stage_ms" in r else "-"]
                      for r in part])
    return out


def asynchronous() -> list[str]:
    file = "async.jsonl"
    rows = read(file, key=lambda r: r["schedule"])
    out = ["## Asynchronous schedules", ""]
    command = "python benchmarks/bench_async.py --out docs/results/async.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    command = (f"python benchmarks/bench_async.py --steps {s['steps']} --microbatches {s['microbatches']} "
               f"--repeats {s['repeats']} --out docs/results/{file}")
    last = min(5, s["steps"])
    out += ["`benchmarks/bench_async.py`: the asynchronous schedules (no flush between steps) against the "
            "flushing ones on the same batches: gpt2-tiny (untied) on batches of 16 x 128 tokens of the built-in "
            f"corpus, m={s['microbatches']}, {s['steps']} steps, Adam {s['lr']:g}, 2 ranks x 1 thread; "
            f"{s['repeats']} round(s), the schedules alternating; tokens/s median [min-max]. The losses are the "
            "first round's.", ""]
    out += provenance(rows, file, command)
    base = next((med(r["tokens_per_s"]) for r in rows if r["schedule"] == "1f1b"), None)
    out += table(["schedule", "tokens/s", "vs 1f1b", "loss, step 1", f"loss, mean of the last {last} steps"],
                 [[r["schedule"], spread(r["tokens_per_s"], ".0f"),
                   f"{med(r['tokens_per_s']) / base:.2f}x" if base else "-", f"{r['losses'][0]:.3f}",
                   f"{statistics.fmean(r['losses'][-last:]):.3f}"] for r in rows])
    return out


def candidate(c: Row) -> str:
    v = c.get("virtual_stages", c.get("chunks", 1))
    text = f"{c['schedule']}{f' v={v}' if v > 1 else ''} m={c['microbatches']} {balance(c['balance'])}"
    return text + (f" recompute={c['recompute']}" if c.get("recompute", "never") != "never" else "")


def planner() -> list[str]:
    file = "planner.jsonl"
    rows = read(file, key=lambda r: (r["model"], r["P"]), kind=None)
    out = ["## The planner", ""]
    command = "python benchmarks/bench_planner.py --out docs/results/planner.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    command = "`; `".join(  # one run per model, with the pipeline sizes it was measured at
        f"python benchmarks/bench_planner.py --models {model} --stages "
        f"{' '.join(str(r['P']) for r in rows if r['model'] == model)} --top {x['top']} --steps {x['steps']} "
        f"--repeats {x['repeats']} --block-warmup {x['block_warmup']} --runs {x['runs']} --out docs/results/{file}"
        for model, x in {r["model"]: r["settings"] for r in rows}.items())
    out += ["`benchmarks/bench_planner.py`: how good is the planner's choice? For each model and pipeline size P "
            "(one rank of one thread per device) the planner profiles the model and searches "
            "(`Pipeline(schedule=\"auto\", microbatches=\"auto\", partition=\"auto\")`); then its top "
            f"{s['top']} candidates are built as explicit pipelines in the same processes and timed in alternation "
            f"({s['repeats']} rounds of {s['steps']} step(s), the order reversed every round). Predicted rank 1 "
            "is the fastest predicted; the choice can be another among the ties (they go to fewer actions). The "
            "aim: the choice within 3% of the measured best.", ""]
    out += provenance(rows, file, command)
    body = []
    for r in rows:
        order = sorted(range(len(r["predicted"])), key=lambda k: r["predicted"][k])
        mrank = {k: i + 1 for i, k in enumerate(sorted(range(len(r["measured"])), key=lambda k: r["measured"][k]))}
        ratio = [m / p for m, p in zip(r["measured"], r["predicted"])]
        body.append([f"{r['model']}, P={r['P']}", candidate(r["labels"][r["chosen"]]), mrank[r["chosen"]],
                     ", ".join(str(mrank[k]) for k in order), f"{min(ratio):.2f}-{max(ratio):.2f}",
                     f"{r['gap']:+.1%}", f"{r['build_s']:.1f}"])
    out += table(["model, P", "chosen", "measured rank of the choice", "measured ranks in predicted order",
                  "measured / predicted step", "choice vs the measured best", "plan built in s (profile included)"],
                 body)
    within = sum(r["gap"] <= 0.03 for r in rows)
    out += [f"The choice was within 3% of the measured best in {within} of {len(rows)} cases.", ""]
    return out


def vs_torch() -> list[str]:
    file = "vs_torch.jsonl"
    rows = read(file, key=lambda r: (r["stages"], r["config"], r["library"]))
    rounds = read(file, key=lambda r: (r["stages"], r["config"], r["library"], r["round"]), kind="round")
    out = ["## Against torch.distributed.pipelining", ""]
    command = "python benchmarks/bench_vs_torch.py --out docs/results/vs_torch.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    stages = sorted({r["stages"] for r in rows})
    configs = list(dict.fromkeys(f"{sc} {m}" for P in stages for sc, m in
                                 next(r for r in rows if r["stages"] == P)["settings"]["configs"]))
    command = (f"python benchmarks/bench_vs_torch.py --stages {' '.join(map(str, stages))} --schedules "
               f"{' '.join(dict.fromkeys(c.split()[0] for c in configs))} --microbatches "
               f"{' '.join(dict.fromkeys(c.split()[1] for c in configs))} --steps {s['steps']} --repeats "
               f"{s['repeats']} --warmup {s['warmup']} --block-warmup {s['block_warmup']}"
               + ("" if s["auto"] else " --no-auto") + f" --out docs/results/{file}")
    out += ["`stagewise bench` (`benchmarks/bench_vs_torch.py`) builds, in the same spawned processes, a stagewise "
            "`Pipeline` and a `torch.distributed.pipelining` pipeline (manual `PipelineStage`s under the matching "
            "schedule class) over the same layers, weights, batch, balance (the even split) and threads, on "
            f"{model_text(s, s['tie'])}; one rank of one thread per device, gloo. The pipelines alternate (the "
            "order reversed every round), each timed block after one untimed step; the stagewise / torch ratio "
            f"is taken within a round, then the median. {s['repeats']} rounds of {s['steps']} step(s). Both "
            "libraries and the single process run under the same malloc settings, so the ratio compares the "
            "pipelines. Measured / ideal is stagewise's step against the simulator fed the per-action costs "
            "measured in that step.", ""]
    out += provenance(rows, file, command)
    for P in stages:
        get = {(r["config"], r["library"]): r for r in rows if r["stages"] == P}
        single = get.get(("single", "single"))
        names = [c for c, lib in get if lib == "stagewise" and get[(c, lib)].get("partition") == "even"]
        body = []
        for name in names:
            sw, th = get[(name, "stagewise")], get.get((name, "torch"))
            body.append([name, balance(sw["balance"]), spread(th["tokens_per_s"], ".0f") if th else "-",
                         spread(sw["tokens_per_s"], ".0f"), spread(sw["vs_torch"], ".2f") if th else "-",
                         f"{med(sw['measured_over_ideal']):.3f}" if "measured_over_ideal" in sw else "-"])
        out += [f"**P={P}** ({P} ranks x 1 thread)" + (f"; the single process (1 thread) ran at "
                                                         f"{spread(single['tokens_per_s'], '.0f')} tokens/s"
                                                         if single else ""), ""]
        out += table(["schedule, m", "balance", "torch tokens/s", "stagewise tokens/s", "stagewise / torch",
                      "measured / simulated ideal"], body)
        auto = [c for c, lib in get if lib == "stagewise" and get[(c, lib)].get("partition") not in (None, "even")]
        if auto:
            # the same schedule's torch pipeline on the even split, within each round (the lines of kind "round")
            step = {(r["config"], r["library"], r["round"]): r["step_s"] for r in rounds if r["stages"] == P}
            body = []
            for c in auto:
                x, even = get[(c, "stagewise")], c.removesuffix(" " + get[(c, "stagewise")]["partition"])
                ratios = [step[(even, "torch", k)] / step[(c, "stagewise", k)] for (name, lib, k) in step
                          if name == c and lib == "stagewise" and (even, "torch", k) in step]
                body.append([c, balance(x["balance"]), spread(x["tokens_per_s"], ".0f"),
                             spread(ratios, ".2f") if ratios else "-"])
            out += [f"With `partition=\"auto\"` (the layers measured on the batch) at P={P}:", ""]
            out += table(["configuration", "balance", "stagewise tokens/s", "vs torch's same schedule on the even "
                          "split"], body)
        first = next(r for r in rows if r["stages"] == P).get("first_loss", {})
        losses = [v for by_lib in first.values() for v in by_lib.values()]
        if losses:
            ref = first["single"]["single"]
            worst = max(abs(v - ref) / abs(ref) for v in losses)
            out += [f"First-step losses (from the same initial weights): {ref:.6f} for the single process; every "
                    f"pipeline of both libraries within {worst:.1e} (relative) of it.", ""]
    return out


def gpipe() -> list[str]:
    file = "gpipe.jsonl"
    rows = read(file, key=lambda r: r["config"])
    out = ["## GPipe against the plain module", ""]
    command = "python benchmarks/bench_gpipe.py --out docs/results/gpipe.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    command = (f"python benchmarks/bench_gpipe.py --partitions {' '.join(map(str, s['partitions']))} --chunks "
               f"{' '.join(map(str, s['chunks']))} --steps {s['steps']} --repeats {s['repeats']} --warmup "
               f"{s['warmup']} --out docs/results/{file}")
    out += ["`benchmarks/bench_gpipe.py`: the training step (forward, loss, backward; no optimizer step) of a "
            f"GPT of {s['n_layer'] + 2} layers (embedding, {s['n_layer']} GPT-2 blocks of d{s['n_embd']} with "
            f"{s['n_head']} heads, untied head over a vocabulary of {s['vocab']:,}) on one fixed batch of "
            f"{s['batch']} x {s['seq_len']} random token ids, in one process with one intra-op thread: the plain "
            "`nn.Sequential` on the calling thread, and `stagewise.GPipe` on CPU partitions (the layers split as "
            "evenly as their count allows) with checkpoint \"except_last\", GPipe's default. The configurations "
            f"alternate over {s['repeats']} rounds of {s['steps']} timed step(s) (after {s['warmup']} untimed "
            "ones); a round's value is its median step. GPipe / plain is taken within each round, then median "
            "[min-max] over the rounds. The partitions of one process share the machine's cores, so on CPU this "
            "shows what the pipeline costs, not what several GPUs gain from it.", ""]
    out += provenance(rows, file, command)
    out += table(["configuration", "partitions", "chunks", "balance", "step ms", "GPipe / plain (same round)"],
                 [[r["config"], r["partitions"], r["chunks"], balance(r["balance"]),
                   spread([1e3 * v for v in r["step_s"]], ".1f"),
                   spread(r["ratio_to_plain"], ".2f") if r["config"] != "plain" else "-"] for r in rows])
    pipes = [r for r in rows if r["config"] != "plain"]
    if pipes:
        by_chunks = {m: [med(r["ratio_to_plain"]) for r in pipes if r["chunks"] == m]
                     for m in sorted({r["chunks"] for r in pipes})}
        text = "; ".join(f"chunks={m}: {min(v):.2f}" + (f"-{max(v):.2f}" if len(v) > 1 else "")
                         for m, v in by_chunks.items())
        out += [f"GPipe / plain by chunk count ({text}). The chunks split this small batch into smaller pieces, "
                "and \"except_last\" recomputes the forward of every chunk but the last: on CPU the partitions "
                "have no cores of their own to win that back with.", ""]
    return out


def sharding() -> list[str]:
    file = "sharding.jsonl"
    rows = read(file, key=lambda r: r["mode"])
    out = ["## Pipeline x sharded data parallelism", ""]
    command = "python benchmarks/bench_sharding.py --out docs/results/sharding.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    ranks = s["pipeline"] * s["data"]
    command = (f"python benchmarks/bench_sharding.py --schedule {s['schedule']} --modes {' '.join(s['modes'])} "
               f"--microbatches {s['microbatches']} --steps {s['steps']} --warmup {s['warmup']} "
               f"--out docs/results/{file}")
    out += ["`benchmarks/bench_sharding.py`: P x D = "
            f"{s['pipeline']} x {s['data']} ({ranks} processes of one thread, gloo) under {s['schedule']}, "
            f"m={s['microbatches']}, on {model_text(s, s['tie'])} (lr {s['lr']:g}); each `shard` mode built in "
            f"turn in the same processes, the median of {s['steps']} step(s) after {s['warmup']} of warm-up (over "
            "every rank's steps). Both ratios are against `shard=\"none\"` of the same run. \"Held\" is what "
            "each rank holds between steps in parameters, gradients and optimizer state "
            "(`pipe.sharding.held_bytes()`, every storage counted once); the all-gathers are FSDP2's, from start "
            "to done (in brackets the part the rank waited for at its first forward), the reduce-scatters its "
            "gradient reductions, per rank in the last step.", ""]
    out += provenance(rows, file, command)

    def per_rank(r: Row, fn: Callable[[Row], str]) -> str:
        return " / ".join(fn(v) for _, v in sorted(r["ranks"].items(), key=lambda kv: int(kv[0])))

    def held(v: Row, part: str) -> str:
        return f"{v['held'][part] / 2**20:.1f}"

    body = []
    for r in rows:
        sharded = any(v["all_gather_s"] or v["reduce_scatter_s"] for v in r["ranks"].values())
        ratios = [v["held_ratio"] for v in r["ranks"].values()]
        first = r["ranks"][min(r["ranks"], key=int)]
        body.append([r["mode"], f"{1e3 * r['step_s']:.0f}", f"{r['step_ratio']:.2f}",
                     per_rank(r, lambda v: held(v, "total")),
                     f"{min(ratios):.2f}" + (f"-{max(ratios):.2f}" if f"{max(ratios):.2f}" != f"{min(ratios):.2f}"
                                             else ""),
                     " / ".join(held(first, part) for part in ("parameters", "gradients", "optimizer")),
                     per_rank(r, lambda v: f"{1e3 * v['all_gather_s']:.0f} ({1e3 * v['all_gather_wait_s']:.0f})")
                     if sharded else "-",
                     per_rank(r, lambda v: f"{1e3 * v['reduce_scatter_s']:.0f}") if sharded else "-"])
    out += table(["shard", "step ms", "step vs none", "held MiB, per rank", "held vs none",
                  "parameters / gradients / optimizer MiB, rank 0", "all-gather ms (waited), per rank",
                  "reduce-scatter ms, per rank"], body)
    cores = rows[0].get("machine", {}).get("cores")
    if cores is not None and cores < ranks:
        out += [f"{ranks} ranks share {cores} cores here, so a collective also waits for its peer to be scheduled: "
                "the held bytes and the step ratios are the figures to read, not the absolute times.", ""]
    return out


def guards() -> list[str]:
    file = "guards.jsonl"
    rows = read(file, key=lambda r: r["config"])
    out = ["## What the per-step guards cost", ""]
    command = "python benchmarks/bench_guards.py --out docs/results/guards.jsonl"
    if not rows:
        return out + missing(file, command)
    s = rows[0]["settings"]
    command = (f"python benchmarks/bench_guards.py --microbatches {' '.join(map(str, s['microbatches']))} --steps "
               f"{s['steps']} --repeats {s['repeats']} --warmup {s['warmup']} --out docs/results/{file}")
    out += ["`benchmarks/bench_guards.py`: the guards every step runs (the batch agreement check across processes, "
            "the non-finite records around each action and the non-finite check at the step, the status writes "
            f"`stagewise run` asks for) on {model_text(s, s.get('tie', True))}; 2 gloo ranks of one thread, 1f1b, "
            "status files on. Two measures. The time inside the guards: every guard entry point is wrapped by a "
            "timer, and its seconds per step on each rank (the waits at the two small collectives included) are "
            "set against rank 0's median step. And an A/B check: the same pipeline with the guards made no-ops, "
            f"rounds alternating on and off ({s['repeats']} rounds of {s['steps']} step(s) each, after "
            f"{s['warmup']} untimed), the median step of each; on a busy machine the steps spread more than the "
            "guards cost, so this one is only a sanity check of the first.", ""]
    out += provenance(rows, file, command)
    out += table(["configuration", "step s, guards on", "step s, guards off", "on / off",
                  "guards ms per step, per rank", "share of the step, per rank", "by part, rank 0 (ms per step)"],
                 [[r["config"], f"{r['step_on_s']:.3f}", f"{r['step_off_s']:.3f}",
                   f"{r['step_on_s'] / r['step_off_s']:.3f}",
                   " / ".join(f"{1e3 * g:.1f}" for g in r["guard_s_per_step"]),
                   " / ".join(f"{g:.2%}" for g in r["guard_fraction"]),
                   ", ".join(f"{k} {1e3 * v:.2f}" for k, v in sorted(r["parts_s"].items()))] for r in rows])
    return out


SECTIONS = [schedules, runtime, partition, asynchronous, planner, vs_torch, gpipe, sharding, guards]

HEAD = """# Benchmarks

<!-- Generated by benchmarks/pages.py from docs/results/*.jsonl: edit those or the script, not this page
     (tests/test_docs.py checks that it is what the script writes). -->

Every benchmark in `benchmarks/` prints its tables and appends JSON lines (`--out`). This page is generated from
the lines committed under `docs/results/` by `benchmarks/pages.py`: each table states the machine, the settings
and the date that its lines record, and the command that wrote them. Absolute numbers depend on the machine and
on what else ran on it (the load average is recorded with the lines); the ratios, taken within a round, are the
sturdier figures. To refresh a section, run its command (delete its results file first), then
`make bench-pages`.
"""


def render() -> str:
    lines = HEAD.splitlines() + [""]
    for section in SECTIONS:
        lines += section()
    while lines and lines[-1] == "":
        lines.pop()
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--check", action="store_true", help="exit 1 if the page differs from what it would write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not PAGE.is_file() or PAGE.read_text() != text:
            print(f"{PAGE.relative_to(ROOT)} is not what benchmarks/pages.py writes from docs/results/: run "
                  "`python benchmarks/pages.py` (or `make bench-pages`) and commit the page", file=sys.stderr)
            return 1
        print(f"{PAGE.relative_to(ROOT)} is up to date")
        return 0
    PAGE.write_text(text)
    print(f"wrote {PAGE.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
