"""Guards against silent wrong results, each cheap enough to run at every step.

- `check_options`: options that would fail obscurely later (a timeout of 0, an unknown policy) are
  refused when the `Pipeline` is constructed, before any process group exists.
- `BatchCheck`: every rank must be given the same batch. Before each step the ranks compare a
  fingerprint of what they were given: the pipeline's settings (schedule, m, balance), the call
  (`train_step`, `eval_step`, accumulation), the batch's structure, shapes and dtypes, and a
  sample of its data: `SAMPLES` elements per tensor at fixed, evenly spaced positions. It is a
  sample, not a checksum of every element: batches that differ only elsewhere pass unnoticed.
  The fingerprints travel as one small all-reduce (a 63-bit hash per rank); only when they differ
  do the ranks exchange the fields themselves, and every rank stops with a message naming the
  ranks that disagree and what differs. Threads of one process share the batch object, so the
  check runs only when some ranks live in other processes.
- `RankWatch`: called by the executor around each action. It records where the rank is (the
  launcher's status file, `stagewise.runtime.status`) and keeps, for each
  (stage, micro-batch), a 0-dim sum of the forward outputs that carry a gradient, of the loss and
  of the input gradients the backward sends back. A sum is finite exactly when every summed value
  is (up to an overflow of the sum itself, at 3e38 in float32), costs one read of the tensor
  and no synchronisation: nothing is looked at unless the step turns out non-finite.
- `NonFiniteGuard`, a step part before the optimizer step: if any loss or parameter gradient of
  the step is non-finite (NaN or inf) on any rank, the step is never taken. `on_nonfinite="raise"`
  (the default) then stops every rank with an error naming the stage and micro-batch where the
  first non-finite value appeared (the earliest stage output in forward order, then the loss, then
  the backward from the last stage down); `"skip"` skips the step on every rank with a warning
  (`last_step["skipped"]` says where), as a loss scaler skips an overflowing step. Tensors that do
  not carry a gradient (an additive attention mask holding -inf) are never counted.
  Asynchronous schedules step per stage, so there each rank decides alone.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import torch

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.status import RankStatus
from stagewise.runtime.step import OptimizerStep, Step, StepContext, StepPart
from stagewise.runtime.world import World
from stagewise.schedules.actions import Action, B, F, I
from stagewise.schedules.registry import check_spec
from stagewise.tree import TensorSlot, describe, flatten

if TYPE_CHECKING:
    from stagewise.runtime.executor import RunState
    from stagewise.runtime.stage import Stage
    from stagewise.runtime.stages import StageSet

POLICIES = ("raise", "skip")
SAMPLES = 16  # data elements per tensor in a batch's fingerprint
T = TypeVar("T")


def check_options(schedule: Any, timeout: Any, on_nonfinite: Any) -> None:
    """Refuse a schedule that does not exist and options that would only fail later, and obscurely."""
    check_spec(schedule)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a positive, finite number of seconds (how long any wait on another "
                         f"device may take), got {timeout!r}")
    if on_nonfinite not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, POLICIES))}, got {on_nonfinite!r}")


# ---- every rank the same batch ---------------------------------------------------------------------

_positions: dict[tuple[int, torch.device], torch.Tensor] = {}


def _sample(t: torch.Tensor) -> list[Any]:
    n = t.numel()
    if n == 0:
        return []
    key = (n, t.device)
    idx = _positions.get(key)
    if idx is None:
        k = min(SAMPLES, n)
        idx = torch.tensor([(i * (n - 1)) // max(k - 1, 1) for i in range(k)], device=t.device)
        if len(_positions) > 1024:  # many distinct sizes (variable lengths): start over
            _positions.clear()
        _positions[key] = idx
    flat = t.detach().reshape(-1)
    return flat[idx].tolist()


def fingerprint(batch: Any, call: str, settings: str) -> dict[str, str]:
    """What ranks must agree on before a step, as short texts (see the module's notes)."""
    fields = {"call": call, "settings": settings}
    if batch is None:
        return fields
    parts = {"inputs": batch[0], "labels": batch[1]} if isinstance(batch, tuple | list) and len(batch) == 2 else \
        {"batch": batch}
    for name, tree in parts.items():
        tensors, spec = flatten(tree)
        riders = [repr(x)[:60] for x in spec.leaves if not isinstance(x, TensorSlot)]
        fields[f"{name} structure"] = f"{spec.treespec}" + (f" with values {riders}" if riders else "")
        fields[f"{name} shapes"] = describe(spec)
        fields[f"{name} sample"] = "; ".join(str(_sample(t)) for t in tensors)
    return fields


def _hash(fields: dict[str, str]) -> int:
    digest = hashlib.blake2b(repr(sorted(fields.items())).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 2  # non-negative, fits an int64 with room for a sum


def _ranks(ranks: Sequence[int]) -> str:
    return f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"


def disagreement(every: dict[int, dict[str, str]]) -> str:
    """The message for ranks whose fingerprints differ: who, and in which fields with which values."""
    groups: dict[str, list[int]] = {}
    for r in sorted(every):
        groups.setdefault(repr(sorted(every[r].items())), []).append(r)
    ordered = sorted(groups.values(), key=lambda rs: (-len(rs), rs[0]))
    reference, others = ordered[0], [r for rs in ordered[1:] for r in rs]
    keys = [k for k in every[reference[0]] if len({every[r].get(k) for r in every}) > 1]
    details = []
    for k in keys:
        values: dict[str | None, list[int]] = {}
        for r in sorted(every):
            values.setdefault(every[r].get(k), []).append(r)
        shown = "; ".join(f"{_ranks(rs)}: {str(v)[:160]}" for v, rs in values.items())
        details.append(f"{k} ({shown})")
    verb = "disagrees" if len(others) == 1 else "disagree"
    return (f"the ranks disagree before the step: {_ranks(others)} {verb} with {_ranks(reference)} on "
            f"{'; '.join(details)}. Every rank must construct the same Pipeline and call the same method with the "
            f"same batch; stagewise compares the settings, the call, and the batch's structure, shapes, dtypes and "
            f"{SAMPLES} sampled elements per tensor before each step")


class BatchCheck:
    """The per-step agreement check across processes (see the module's notes)."""

    def __init__(self, world: World, settings: str):
        self.world, self.settings = world, settings
        self.needed = len(world.local_ranks) < world.size  # some ranks live in other processes

    def fields(self, batch: Any, call: str) -> dict[str, str] | None:
        return fingerprint(batch, call, self.settings) if self.needed else None

    def agree(self, rank: int, fields: dict[str, str] | None) -> None:
        """A collective of every rank: returns when all fingerprints match, else raises on every rank."""
        if fields is None:
            return
        world = self.world
        hashes = torch.zeros(world.size, dtype=torch.int64, device=world.device(rank))
        hashes[rank] = _hash(fields)
        everyone = world.grid_groups().everyone
        world.all_reduce(rank, [hashes], everyone)
        if len(set(hashes.tolist())) == 1:
            return
        every = dict(zip(everyone.ranks, world.all_gather_object(rank, fields, everyone)))
        raise PipelineError(f"rank {rank}: {disagreement(every)}", rank=rank)


# ---- around each action ----------------------------------------------------------------------------

def _total(tensors: Iterable[torch.Tensor]) -> torch.Tensor | None:
    """The sum of every element, as a 0-dim tensor (float32 at least): finite iff every element is."""
    total = None
    for t in tensors:
        x = t.detach()
        s = x.sum(dtype=torch.float32) if x.dtype in (torch.float16, torch.bfloat16) else x.sum()
        total = s if total is None else total + s.to(total.dtype)
    return total


class RankWatch:
    """What one rank's executor reports around each action (see the module's notes)."""

    def __init__(self, rank: int, stages: dict[int, Stage], last_stage: int, status: RankStatus | None):
        self.rank, self.last, self.status = rank, last_stage, status
        self.sums: dict[tuple[int, int, str], torch.Tensor] = {}  # (stage, mb, what) -> sum
        self.fresh: set[tuple[int, int, str]] = set()  # kept since the last `take`
        self.step = 0
        if status is not None:
            status.prefix = f"stage {', '.join(map(str, sorted(stages)))} (rank {rank}): "

    def begin(self, a: Action) -> None:
        if self.status is not None:
            self.status.set(f"step {self.step}: {a}")

    def end(self, a: Action, st: RunState) -> None:
        s, n = a.stage, a.microbatch
        if a.op == F:
            if s == self.last:
                if st.train:
                    self._keep(s, n, "loss", [st.losses[n]])
                return
            if st.train:
                self._keep(s, n, "output", [t for t in flatten(st.outputs.get((s, n)))[0] if t.requires_grad])
        elif a.op in (B, I) and st.train and s > 0:
            self._keep(s, n, "input gradient", [g for g in st.grad_in.get((s, n)) or () if g is not None])

    def _keep(self, s: int, n: int, what: str, tensors: list[torch.Tensor]) -> None:
        total = _total(tensors)
        if total is not None:
            key = (s, n, what)
            old = self.sums.get(key)  # accumulating calls (step=False) meet the same micro-batch again
            self.sums[key] = total if old is None else old + total
            self.fresh.add(key)

    def take(self, keep: bool) -> tuple[dict[tuple[int, int, str], torch.Tensor], set[tuple[int, int, str]]]:
        """(every sum kept, the keys kept since the last take). A synchronous step takes them all; an unflushed
        run (steps per micro-batch) keeps them for later steps, as far back as micro-batches can be in flight."""
        sums, fresh = self.sums, self.fresh
        self.fresh = set()
        if not keep:
            self.sums = {}
        elif sums:
            newest = max(n for _, n, _ in sums)
            self.sums = {k: v for k, v in sums.items() if k[1] >= newest - 4 * (self.last + 1)}
        return sums, fresh

    def clear(self) -> None:
        self.sums, self.fresh = {}, set()


# ---- at the step -----------------------------------------------------------------------------------

class NonFiniteGuard(StepPart):
    """Stops or skips a step whose loss or gradients are non-finite (see the module's notes)."""

    contract = ("no optimizer step is taken on a non-finite loss or gradient: the step raises on every rank, "
                "naming where the first non-finite value appeared, or is skipped on every rank")

    def __init__(self, world: World, model: StageSet, watches: dict[int, RankWatch], policy: str,
                 asynchronous: bool):
        self.world, self.model, self.watches, self.policy = world, model, watches, policy
        self.asynchronous = asynchronous

    def __call__(self, ctx: StepContext) -> None:
        sums, fresh = self.watches[ctx.rank].take(keep=self.asynchronous)
        if ctx.report.get("overflow"):  # fp16: the loss scaler skips this step everywhere and backs off; expected
            return
        grads = [p.grad for p in self.model.owned[ctx.rank] if p.grad is not None]
        norm = ctx.report.get("grad_norm")  # measured by ClipGradNorm over every stage: the gradients are known
        checked = [v for k, v in sums.items() if k[2] == "loss" and k in fresh]
        if norm is None:
            total = _total(grads)
            checked += [total] if total is not None else []
        bad = float(bool(checked) and not math.isfinite(sum(v.to(torch.float64) for v in checked).item()))
        if norm is not None and not math.isfinite(norm):
            bad = 1.0
        if not self.asynchronous:  # every rank decides alike
            flag = torch.tensor([bad], dtype=torch.float64, device=self.world.device(ctx.rank))
            self.world.all_reduce(ctx.rank, [flag], self.world.grid_groups().everyone)
            bad = flag.item()
        if not bad:
            return
        ctx.skip = True
        where, stage, mb = self._locate(ctx.rank, sums)
        if self.policy == "raise":
            raise PipelineError(f"a non-finite (NaN or inf) loss or gradient in this step: {where}. The step was not "
                                "taken on any rank; Pipeline(on_nonfinite='skip') skips such steps with a warning "
                                "instead of stopping", stage=stage, microbatch=mb, action=str(ctx.action),
                                rank=ctx.rank)
        ctx.report["skipped"] = f"a non-finite loss or gradient: {where}"

    def _locate(self, rank: int, sums: dict[tuple[int, int, str], torch.Tensor]) -> tuple[str, int | None, int | None]:
        """Where the first non-finite value appeared, over every rank (a collective unless asynchronous)."""
        found = [(s, n, what, rank) for (s, n, what), v in sums.items() if not math.isfinite(v.item())]
        for s, stage in self.model.of_rank(rank).items():
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in stage.parameters()):
                found.append((s, -1, "parameter gradients", rank))
        if not self.asynchronous:
            everyone = self.world.grid_groups().everyone
            found = [x for part in self.world.all_gather_object(rank, found, everyone) for x in part]
        forward = sorted(x for x in found if x[2] in ("output", "loss"))
        if forward:
            s, n, what, r = forward[0]
            if what == "loss":
                return (f"the loss of micro-batch {n} (last stage {s}, rank {r}) is the first non-finite value; every "
                        "stage output before it was finite: check loss_fn and the labels", s, n)
            return f"it first appeared in stage {s}'s output for micro-batch {n} (rank {r}, F(stage {s}, mb {n}))", s, n
        backward = sorted(found, key=lambda x: (-x[0], x[2] != "input gradient", x[1]))
        if not backward:
            return "every recorded loss, output and gradient is finite on its own (their sum overflowed)", None, None
        s, n, what, r = backward[0]
        if what == "input gradient":
            return (f"it first appeared in the backward of stage {s} (rank {r}): the gradient of its input for "
                    f"micro-batch {n}; every forward output and loss was finite", s, n)
        return (f"it first appeared in the backward of stage {s} (rank {r}): its parameter gradients; every forward "
                "output, loss and input gradient was finite", s, None)


def guarded(step: Step, guard: StepPart) -> Step:
    """`step` with `guard` just before its optimizer step (at the end when there is none)."""
    parts = list(step.parts)
    at = next((i for i, p in enumerate(parts) if isinstance(p, OptimizerStep)), len(parts))
    return Step(parts[:at] + [guard] + parts[at:])


def writing_to(folder: Any, fn: Callable[[int], T]) -> Callable[[int], T]:
    """`fn(rank)`, with a failure to write under `folder` named by rank and folder."""

    def run(rank: int) -> T:
        try:
            return fn(rank)
        except OSError as err:
            raise PipelineError(f"rank {rank} cannot write the checkpoint folder {str(folder)!r}: "
                                f"{type(err).__name__}: {err}", rank=rank) from err

    return run
