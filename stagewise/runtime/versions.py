"""Weight versions of one stage for the asynchronous schedules (PipeDream, PipeDream-2BW).

The module's parameters are the master weights, which the optimizer updates. Every
version a schedule mentions is a snapshot of the masters taken right after the STEP that
created it; forwards run on their version's snapshot (through `torch.func.functional_call`)
and their backwards differentiate with respect to that same snapshot (weight stashing).
A snapshot is dropped once the newest version has replaced it and no backward still needs it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Protocol

import torch
from torch import nn

from stagewise.schedules.actions import B
from stagewise.schedules.schedule import Schedule


class Versioned(Protocol):
    """What `stashing` needs of a stage (`stagewise.runtime.stage.Stage`): its index, layers and versions slot."""

    index: int
    module: nn.Module
    versions: WeightVersions | None


class WeightVersions:
    """Snapshots of a stage's trainable parameters, keyed by version number.

    `uses[v]` is how many backwards of the schedule use version v on this stage.
    """

    def __init__(self, module: nn.Module, uses: dict[int, int]):
        named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.masters = [p for _, p in named]
        self.remaining = dict(uses)
        self.latest = 0
        self.snapshots: dict[int, list[torch.Tensor]] = {0: self._snapshot()}
        self.peak = 1

    def _snapshot(self) -> list[torch.Tensor]:
        return [p.detach().clone().requires_grad_(True) for p in self.masters]

    def params(self, version: int) -> dict[str, torch.Tensor]:
        if version not in self.snapshots:
            raise RuntimeError(f"weight version {version} is not held (held: {sorted(self.snapshots)})")
        return dict(zip(self.names, self.snapshots[version]))

    def tensors(self, version: int) -> list[torch.Tensor]:
        return self.snapshots[version]

    def accumulate(self, grads: list[torch.Tensor | None]) -> None:
        """Add one micro-batch's weight gradients (w.r.t. its version) to the masters' `.grad`."""
        for p, g in zip(self.masters, grads):
            if g is not None:
                p.grad = g.detach() if p.grad is None else p.grad + g

    def release(self, version: int) -> None:
        """A backward that used `version` is done."""
        self.remaining[version] = self.remaining.get(version, 0) - 1
        if self.remaining[version] <= 0 and version != self.latest:
            self.snapshots.pop(version, None)

    def created(self, version: int) -> None:
        """The optimizer has just updated the masters: they become `version`."""
        self.snapshots[version] = self._snapshot()
        old, self.latest = self.latest, version
        if self.remaining.get(old, 0) <= 0:
            self.snapshots.pop(old, None)
        self.peak = max(self.peak, len(self.snapshots))


@contextmanager
def stashing(schedule: Schedule, stages: Sequence[Versioned], peaks: dict[int, int]) -> Iterator[None]:
    """Give every stage (of every local replica) the weight versions `schedule` uses while it runs; `peaks`
    receives the most versions each stage index held at once (compare `simulate(schedule).peak_weight_versions`)."""
    for st in stages:
        s = st.index
        uses: dict[int, int] = {}
        for a in schedule.programs[schedule.placement[s]]:
            if a.op == B and a.stage == s:
                uses[a.version] = uses.get(a.version, 0) + 1
        st.versions = WeightVersions(st.module, uses)
        st.module.zero_grad(set_to_none=True)
    try:
        yield
    finally:
        for st in stages:
            if st.versions is not None:
                peaks[st.index] = max(peaks.get(st.index, 0), st.versions.peak)
            st.versions = None
