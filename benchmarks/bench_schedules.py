"""How long building, validating (with lowering) and simulating a schedule takes at scale.

Run: `python benchmarks/bench_schedules.py [--devices 64 --microbatches 1024 --chunks 2]`.
The goal is under 1 s per schedule for P=64, m=1024, v=2 (v only for the multi-chunk ones).
`simulate` after `validate` reuses the unit-cost run validate made (kept on the schedule);
"simulate alone" is a fresh build simulated without validating, for comparison.
"""

from __future__ import annotations

import argparse
import time

from stagewise.schedules import SCHEDULES, Costs, build, simulate, validate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--devices", type=int, default=64)
    parser.add_argument("--microbatches", type=int, default=1024)
    parser.add_argument("--chunks", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None)
    args = parser.parse_args()
    print(f"P={args.devices} m={args.microbatches} v={args.chunks} (v for interleaved and zbv)")
    print(f"{'schedule':<12} {'actions':>9} {'build s':>8} {'validate s':>11} {'simulate s':>11} {'total s':>8} "
          f"{'simulate alone s':>17}")
    for name, info in SCHEDULES.items():
        if args.only and name not in args.only:
            continue
        chunks = args.chunks if info.default_chunks > 1 else 1
        t0 = time.perf_counter()
        sc = build(name, args.devices, args.microbatches, chunks)
        t1 = time.perf_counter()
        lowered = validate(sc)
        t2 = time.perf_counter()
        sim = simulate(sc, Costs(f=1, b=2, i=1, w=1))
        t3 = time.perf_counter()
        fresh = build(name, args.devices, args.microbatches, chunks)
        t4 = time.perf_counter()
        simulate(fresh, Costs(f=1, b=2, i=1, w=1))
        t5 = time.perf_counter()
        n = lowered.actions.num_actions
        print(f"{name:<12} {n:>9} {t1 - t0:>8.2f} {t2 - t1:>11.2f} {t3 - t2:>11.2f} {t3 - t0:>8.2f}"
              f" {t5 - t4:>17.2f}   bubble {sim.bubble_fraction:.1%}", flush=True)


if __name__ == "__main__":
    main()
