"""How long building, validating (with lowering) and simulating a schedule takes at scale.

Run: `python benchmarks/bench_schedules.py [--devices 64 --microbatches 1024 --virtual-stages 2]`.
The goal is under 1 s per schedule for P=64, m=1024, v=2 (v only for the multi-chunk ones).
`simulate` after `validate` reuses the unit-cost run validate made (kept on the schedule);
"simulate alone" is a fresh build simulated without validating, for comparison.
One JSON line per schedule is appended to `--out` (docs/benchmarks.md is generated from such lines).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

from stagewise.schedules import SCHEDULES, Costs, build, simulate, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=1024)
    parser.add_argument("--virtual-stages", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/schedules.jsonl"))
    args = parser.parse_args()
    # what the numbers were measured on (as _common.machine says it, without importing torch)
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)
    meta = {"bench": "schedules", "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "host": platform.node(),
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "gpu": None, "python": platform.python_version(),
                        "load_1min": round(os.getloadavg()[0], 2)},
            "settings": {k: v for k, v in vars(args).items() if k != "out"}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    print(f"P={args.devices} m={args.microbatches} v={args.virtual_stages} (v for interleaved and zbv)")
    print(f"{'schedule':<12} {'actions':>9} {'build s':>8} {'validate s':>11} {'simulate s':>11} {'total s':>8} "
          f"{'simulate alone s':>17}")
    for name, info in SCHEDULES.items():
        if args.only and name not in args.only:
            continue
        virtual_stages = args.virtual_stages if info.default_virtual_stages > 1 else 1
        t0 = time.perf_counter()
        sc = build(name, args.devices, args.microbatches, virtual_stages)
        t1 = time.perf_counter()
        lowered = validate(sc)
        t2 = time.perf_counter()
        sim = simulate(sc, Costs(f=1, b=2, i=1, w=1))
        t3 = time.perf_counter()
        fresh = build(name, args.devices, args.microbatches, virtual_stages)
        t4 = time.perf_counter()
        simulate(fresh, Costs(f=1, b=2, i=1, w=1))
        t5 = time.perf_counter()
        n = lowered.programs.num_actions
        print(f"{name:<12} {n:>9} {t1 - t0:>8.2f} {t2 - t1:>11.2f} {t3 - t2:>11.2f} {t3 - t0:>8.2f}"
              f" {t5 - t4:>17.2f}   bubble {sim.bubble_fraction:.1%}", flush=True)
        with args.out.open("a") as fh:
            fh.write(json.dumps({**meta, "kind": "summary", "schedule": name, "virtual_stages": virtual_stages,
                                 "actions": n, "build_s": t1 - t0, "validate_s": t2 - t1, "simulate_s": t3 - t2,
                                 "total_s": t3 - t0, "simulate_alone_s": t5 - t4,
                                 "bubble_fraction": sim.bubble_fraction}) + "\n")
    print(f"appended to {args.out}")


if __name__ == "__main__":
    main()
