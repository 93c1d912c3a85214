"""The planner's ties: which candidates the profile's noise does not separate from the fastest, and which of them
is chosen (`preference`). No torch.

Profiles are measured `runs` times (`stagewise.measure.planner_profiles`), and every run is also kept alone
(`ProfileSet.per_run`). The candidates within MAX_BAND of the fastest are re-predicted from each run's profile
alone; those that some run predicts no slower than the fastest are ties (the repeated runs do not separate them
from it), and the choice is the first of them by `preference` (no recompute, fewer actions per device, i.e.
micro-batches x virtual stages, fewer virtual stages, the simpler schedule, less memory). Without runs to compare
(one run, or a given `noise`), the band rule: candidates within the noise of the fastest are ties, the noise being
the spread of each layer's time between runs (each run first scaled to the same total), summed over the layers,
relative to the total, at most MAX_BAND. The cap keeps a profile taken on a very busy machine from trading a much
faster schedule for a simpler one.
"""

from __future__ import annotations

from collections.abc import Sequence

from stagewise.partition.cost_model import CostModel
from stagewise.partition.plan_results import Candidate
from stagewise.partition.profiles import ProfileSet
from stagewise.schedules import Schedule
from stagewise.schedules.recompute import MODES

# Simpler first: ties in predicted time go to the earliest. 1F1B before GPipe (the same bubble in less memory);
# the split-backward and chunked schedules after the plain ones.
PREFERENCE = ("naive", "1f1b", "gpipe", "zb-h1", "zb-h2", "interleaved", "looped-bfs", "zbv", "v-half", "v-min",
              "dualpipev")
MAX_BAND = 0.05  # the widest tie band, however noisy the profile


def preference(c: Candidate) -> tuple:
    """The tie-break order: no recompute, fewer actions per device (micro-batches x virtual stages), fewer
    virtual stages, the simpler schedule, less memory.

    Fewer actions first because what the model leaves out is paid per action and per message (the executor's
    own work, a transfer's latency, a wake-up when ranks share cores): measured on 4 ranks sharing 2 cores, the
    planner's old order (the simpler schedule first) took 1f1b m=16 over zb-h1 m=4, predicted 1% apart, and it
    measured 36% slower."""
    return (MODES.index(c.recompute), c.microbatches * c.virtual_stages, c.virtual_stages, schedule_rank(c.schedule),
            max(c.memory), c.step_s)


def schedule_rank(name: str) -> int:
    """A schedule's place in PREFERENCE (unknown ones last)."""
    return PREFERENCE.index(name) if name in PREFERENCE else len(PREFERENCE)


def by_runs(profiles: ProfileSet, noise: float | None) -> bool:
    """Whether the repeated profile runs decide the ties (else the band rule)."""
    return noise is None and len(profiles.per_run) > 1


def pruning_band(profiles: ProfileSet, noise: float | None) -> float:
    """How far (relative) from the best step a candidate can still tie: the search must not prune it before the
    tie is decided."""
    if by_runs(profiles, noise):
        return MAX_BAND
    return min(MAX_BAND, max(p.noise for p in profiles.sizes.values())) if noise is None else noise


def ties(found: Sequence[Candidate], profiles: ProfileSet, schedules: dict[tuple[str, int, int, str], Schedule],
         per_replica: int, options: dict, noise: float | None) -> tuple[list[Candidate], float]:
    """The candidates tied with the fastest (`found[0]`; `found` sorted by step), and the band they span (relative
    to the fastest). `schedules` maps (name, virtual stages, m, recompute) to the candidate's schedule, `options`
    are the search's `CostModel` options."""
    best = found[0]
    if by_runs(profiles, noise):
        tied = unresolved(found, profiles, schedules, per_replica, options)
        return tied, max(c.step_s / best.step_s - 1 for c in tied)
    width = min(MAX_BAND, profiles.at(best.samples).noise) if noise is None else noise
    return [c for c in found if c.step_s <= best.step_s * (1 + width)], width


def unresolved(found: Sequence[Candidate], profiles: ProfileSet, schedules: dict[tuple[str, int, int, str], Schedule],
               per_replica: int, options: dict) -> list[Candidate]:
    """The candidates the repeated profile runs do not separate from the fastest (`found[0]`): those within
    MAX_BAND of it that some run, taken alone, predicts no slower than the fastest. The fastest is one of them.

    Each run is a whole profile of the model: a slow layer in one run moves every candidate that holds it, so
    this is the noise the tie is about, measured on the candidates themselves rather than summed over the
    layers."""
    best = found[0]
    pool = [c for c in found if c.step_s <= best.step_s * (1 + MAX_BAND)]
    steps: dict[int, list[float]] = {id(c): [] for c in pool}
    for k in range(len(profiles.per_run)):
        run = profiles.run(k)
        for c in pool:
            schedule = schedules[(c.schedule, c.virtual_stages, c.microbatches, c.recompute)]
            model = CostModel(schedule, run.at(-(-per_replica // c.microbatches)),
                              step_per_param=run.step_per_param, **options)
            steps[id(c)].append(model.estimate(c.balance).step_s)
    ahead = steps[id(best)]
    return [c for c in pool if c is best or any(x <= y for x, y in zip(steps[id(c)], ahead))]
