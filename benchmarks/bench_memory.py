"""Activation checkpointing and precision: kept activations per device, predicted vs measured, and step time.

The benchmark GPT (or gpt2-tiny with --model gpt2-tiny) on P=2 devices as threads of one process (1 intra-op
thread each), batch 16 x 128, for each schedule x m x activation checkpointing mode x precision: the peak
saved-activation bytes per device the runtime measured (autograd's saved tensors, counted once per storage;
inputs only for forwards that recompute), the memory model's prediction from a layer profile taken under the
same precision (`Footprint` with the schedule's RECOMPUTE actions), and the median step time of 3 steps
against the "never" run of the same schedule and precision.

    python benchmarks/bench_memory.py [--model bench|gpt2-tiny] [--schedules 1f1b zbv] [--microbatches 4 8]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from _common import ModelSettings, build_layers, make_batch  # noqa: E402


def tiny() -> ModelSettings:
    return ModelSettings(n_layer=4, n_embd=128, n_head=4, vocab=8192, seq_len=128)


def predicted(layers: list, s: ModelSettings, schedule: str, m: int, mode: str, precision: str, balance: list[int]):
    from stagewise.measure.layers import profile_layers
    from stagewise.models.gpt2 import lm_loss
    from stagewise.partition.memory import Footprint
    from stagewise.runtime.precision import Precision
    from stagewise.schedules import build, validate, with_recompute

    inputs, labels = make_batch(s)
    n = (s.batch + m - 1) // m
    p = Precision(precision)
    with p.autocast(torch.device("cpu")) if p.low else contextlib.nullcontext():
        prof = profile_layers(layers, inputs[:n], loss_fn=lm_loss, labels=labels[:n], repeats=1)
    sc = validate(with_recompute(validate(build(schedule, 2, m)), mode))
    fp = Footprint(sc, [x.params for x in prof], [x.saved_bytes for x in prof], bytes_per_param=0,
                   input_bytes=[x.input_bytes for x in prof])
    return fp.devices(balance)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="bench", choices=["bench", "gpt2-tiny"])
    ap.add_argument("--schedules", nargs="+", default=["1f1b", "zbv"])
    ap.add_argument("--microbatches", nargs="+", type=int, default=[4, 8])
    ap.add_argument("--modes", nargs="+", default=["never", "except_last", "always"])
    ap.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    ap.add_argument("--out", default="runs/bench/memory.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from stagewise import Pipeline
    from stagewise.models.gpt2 import lm_loss

    s = ModelSettings() if args.model == "bench" else tiny()
    rows = []
    print(f"{args.model}: P=2 (threads), batch {s.batch} x {s.seq_len}")
    print(f"{'schedule':10} {'m':>2} {'mode':12} {'prec':5} {'measured MB per device':24} {'predicted MB':18} "
          f"{'step s':>7} {'vs never':>8}")
    for schedule in args.schedules:
        for m in args.microbatches:
            for precision in args.precisions:
                base = None
                for mode in args.modes:
                    layers = build_layers(s)
                    pipe = Pipeline(layers, lm_loss, schedule=schedule, microbatches=m, local_devices=2,
                                    precision=precision, recompute=mode, show_partition=False,
                                    optimizer=lambda ps: torch.optim.Adam(ps, lr=s.lr))
                    batch = make_batch(s)
                    pipe.train_step(batch)
                    times = []
                    for _ in range(3):
                        t0 = time.perf_counter()
                        pipe.train_step(batch)
                        times.append(time.perf_counter() - t0)
                    step = statistics.median(times)
                    peaks = pipe.peak_device_activation_bytes()
                    per_device = [float(peaks[0]), float(peaks[1])]
                    pred = predicted(build_layers(s), s, schedule, m, mode, precision, pipe.balance)
                    base = base or step
                    rows.append({"schedule": schedule, "m": m, "mode": mode, "precision": precision,
                                 "measured": per_device, "predicted": pred, "step_s": step, "vs_never": step / base,
                                 "balance": pipe.balance})
                    print(f"{schedule:10} {m:>2} {mode:12} {precision:5} "
                          f"{', '.join(f'{x / 2**20:.1f}' for x in per_device):24} "
                          f"{', '.join(f'{x / 2**20:.1f}' for x in pred):18} {step:7.3f} {step / base:8.2f}")
                    pipe.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
