"""The runtime's overhead on one GPU: plain PyTorch against stagewise with 4 stages as threads on the same GPU.

On one GPU a pipeline cannot beat one module (its stages share the device); what it must keep small is
its own overhead, so that on several GPUs the pipeline wins. Runs GPT-2 (124M by default) in bf16 at
sequence 1024: one module with AdamW under autocast, then `Pipeline(local_devices=4, device="cuda:0")`
with 1f1b m=8 and with the planner's choice, each for `--steps` timed steps after `--warmup`. Prints and
writes (`--out`): tokens/s of each, the ratio to plain PyTorch (the goal is >= 0.90), the model FLOPs
utilisation (6 N tokens/s over the GPU's dense bf16 peak, `--peak-tflops`, 989 for an H200), the peak
memory (`torch.cuda.max_memory_allocated`) against the planner's prediction for the sum of the stages,
and the measured timeline (CUDA events) beside its simulation (`1f1b/timeline.png`, `planner/timeline.png`).

    PYTHONPATH=. python3 benchmarks/gpu_overhead.py --out $OUT
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise import Pipeline
from stagewise.models import causal_lm_loss, config, count_parameters, gpt2_layers
from stagewise.runtime.loss import mean_of


def _batch(vocab: int, batch: int, seq: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return ids[:, :-1].contiguous().to(device), ids[:, 1:].contiguous().to(device)


def _rate(step, batch_tokens: int, warmup: int, steps: int) -> dict[str, float]:
    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    best = sorted(times)[len(times) // 2]  # the median step
    return {"step_s": best, "tokens_per_s": batch_tokens / best, "peak_bytes": torch.cuda.max_memory_allocated()}


def plain(layers: list[nn.Module], batch, args) -> dict[str, float]:
    model = nn.Sequential(*layers)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = mean_of(causal_lm_loss(model(batch[0]), batch[1]))
        loss.backward()
        opt.step()

    return _rate(step, batch[0].numel(), args.warmup, args.steps)


def pipelined(layers: list[nn.Module], batch, args, **options) -> tuple[dict[str, Any], Pipeline]:
    pipe = Pipeline(layers, causal_lm_loss, local_devices=args.stages, device="cuda:0", precision="bf16",
                    optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-4), show_partition=False, timeout=600,
                    **options)
    out: dict[str, Any] = _rate(lambda: pipe.train_step(batch), batch[0].numel(), args.warmup, args.steps)
    out["schedule"], out["microbatches"], out["balance"] = pipe.schedule.name, pipe.microbatches, list(pipe.balance)
    if pipe.plan is not None:
        out["predicted_peak_bytes"] = sum(pipe.plan.choice.memory)
    return out, pipe


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt2", help="a built-in GPT-2 size: gpt2 (124M), gpt2-medium (355M)")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--stages", type=int, default=4)
    p.add_argument("--microbatches", type=int, default=8)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU (H200: 989)")
    p.add_argument("--out", default="runs/gpu")
    args = p.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    dev = torch.device("cuda", 0)
    cfg = config(args.model, n_positions=max(1024, args.seq_len))
    torch.manual_seed(0)
    layers = gpt2_layers(cfg, device=dev)
    n = count_parameters(layers)
    batch = _batch(cfg.vocab_size, args.batch, args.seq_len, dev)
    results: dict[str, Any] = {"model": args.model, "parameters": n, "batch": args.batch, "seq_len": args.seq_len,
                               "torch": torch.__version__, "gpu": torch.cuda.get_device_name(dev),
                               "date": time.strftime("%Y-%m-%d")}
    results["plain"] = plain(copy.deepcopy(layers), batch, args)
    torch.cuda.empty_cache()
    results["1f1b"], pipe = pipelined(copy.deepcopy(layers), batch, args, schedule="1f1b",
                                      microbatches=args.microbatches, partition="type:GPT2Block")
    _timeline(pipe, out / "1f1b")
    pipe.close()
    del pipe
    torch.cuda.empty_cache()
    results["planner"], pipe = pipelined(copy.deepcopy(layers), batch, args, schedule="auto", microbatches="auto",
                                         partition="auto", sample=batch)
    _timeline(pipe, out / "planner")
    pipe.close()
    base = results["plain"]["tokens_per_s"]
    for key in ("plain", "1f1b", "planner"):
        r = results[key]
        r["ratio_to_plain"] = r["tokens_per_s"] / base
        r["mfu"] = 6 * n * r["tokens_per_s"] / (args.peak_tflops * 1e12)
        line = (f"{key:8s} {r['tokens_per_s']:>12,.0f} tokens/s  x{r['ratio_to_plain']:.3f} of plain  "
                f"MFU {r['mfu']:.1%}  peak {r['peak_bytes'] / 2**30:.2f} GiB")
        if "predicted_peak_bytes" in r:
            line += f" (planner predicted {r['predicted_peak_bytes'] / 2**30:.2f} GiB)"
        print(line, flush=True)
    (out / "gpu_overhead.json").write_text(json.dumps(results, indent=2))


def _timeline(pipe: Pipeline, folder: Path) -> None:
    """The last step's measured timeline (CUDA events) beside its simulation: folder/timeline.png, trace.json."""
    from stagewise.train import _save_timelines

    folder.mkdir(parents=True, exist_ok=True)
    _save_timelines(pipe, folder, 0)


if __name__ == "__main__":
    main()
