"""Guards against silent wrong results, each cheap enough to run at every step.

- `check_options`: options that would fail obscurely later or train wrongly without a word (a timeout
  of 0, an unknown policy, `max_grad_norm=0` or below, `data_parallel=0`) are refused when the
  `Pipeline` is constructed, before any process group exists.
- `BatchCheck`: every rank must be given the same batch. Before each step the ranks compare a
  fingerprint of what they were given: the pipeline's settings (schedule, m, balance), the call
  (`train_step`, `eval_step`, accumulation), the batch's structure, shapes and dtypes, and a
  `checksum` of every byte of every tensor, computed once per batch where the tensor lives: a
  weighted sum of 64-bit words, modulo 2^64 (numpy on the CPU, about 20 GB/s on one core: some 30 us
  for the demo's 16 x 128 tokens; torch on a GPU; both give the same number). Batches differing in
  any one element are told apart (bytes: -0.0 and 0.0 differ, so may two NaNs). The fingerprints travel
  as one small all-reduce (a 63-bit hash per rank); only when they differ do the ranks exchange
  the fields themselves, and every rank stops with a message naming the ranks that disagree and
  what differs. Threads of one process share the batch object, so the
  check runs only when some ranks live in other processes.
- `RankWatch`: called by the executor around each action. It records where the rank is (the
  launcher's status file, `stagewise.runtime.status`) and keeps, for each
  (stage, micro-batch), a 0-dim sum of the forward outputs that carry a gradient (the last stage's
  too, so that a NaN made by its layers is told from one made by loss_fn; on the CPU, where a loss is
  seen at no cost, only when the loss is not finite), of the loss and of the input gradients the
  backward sends back. A sum is finite exactly when every summed value
  is (up to an overflow of the sum itself, at 3e38 in float32), costs one read of the tensor
  and no synchronisation: nothing is looked at unless the step turns out non-finite.
- `NonFiniteGuard`, a step part before the optimizer step: if any loss or parameter gradient of
  the step is non-finite (NaN or inf) on any rank, the step is never taken. `on_nonfinite="raise"`
  (the default) then stops every rank with an error naming the stage and micro-batch where the
  first non-finite value appeared (the earliest stage output in forward order, then the loss, then
  the backward from the last stage down); `"skip"` skips the step on every rank with a warning
  (`last_step["skipped"]` says where), as a loss scaler skips an overflowing step. Tensors that do
  not carry a gradient (an additive attention mask holding -inf) are never counted.
  Asynchronous schedules step per stage, so there each rank decides alone. Under fp16 the
  `LossScaling` part flags an inf/NaN gradient first; with every loss finite that is an overflow:
  the scaler backs off and the step is skipped, or, once it gives up (`LossScaleError`: at
  `min_scale`, or after `max_consecutive_skips` skips in a row), every rank stops naming where the
  overflow first appeared. A non-finite loss is never an overflow: it follows the policy and the
  scale stays (DeepSpeed's rule).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
import torch

from stagewise.runtime.errors import PipelineError
from stagewise.runtime.precision import LossScaleError, LossScaler
from stagewise.runtime.status import RankStatus
from stagewise.runtime.step import OptimizerStep, Step, StepContext, StepPart
from stagewise.runtime.world import World
from stagewise.schedules.actions import Action, B, F, I
from stagewise.schedules.registry import check_spec
from stagewise.tree import TensorSlot, describe, flatten

if TYPE_CHECKING:
    from stagewise.runtime.executor import RunState
    from stagewise.runtime.stage import Stage
    from stagewise.runtime.stage_set import StageSet

POLICIES = ("raise", "skip")
T = TypeVar("T")


def _positive_number(x: Any) -> bool:
    return not isinstance(x, bool) and isinstance(x, int | float) and math.isfinite(x) and x > 0


def check_options(schedule: Any, timeout: Any, on_nonfinite: Any, max_grad_norm: Any = None,
                  data_parallel: Any = 1) -> None:
    """Refuse a schedule that does not exist and options that would only fail later, obscurely, or train
    wrongly without a word (a max_grad_norm of 0 freezes the weights, a negative one climbs the loss)."""
    if schedule != "auto":  # "auto": the planner chooses
        check_spec(schedule)
    if not _positive_number(timeout):
        raise ValueError(f"timeout must be a positive, finite number of seconds (how long any wait on another "
                         f"device may take), got {timeout!r}")
    if on_nonfinite not in POLICIES:
        raise ValueError(f"on_nonfinite must be one of {', '.join(map(repr, POLICIES))}, got {on_nonfinite!r}")
    if max_grad_norm is not None and not _positive_number(max_grad_norm):
        raise ValueError(f"max_grad_norm must be a positive, finite number (the largest global gradient norm; "
                         f"None: no clipping), got {max_grad_norm!r}")
    if isinstance(data_parallel, bool) or not isinstance(data_parallel, int) or data_parallel < 1:
        raise ValueError(f"data_parallel must be an integer >= 1 (replicas of the whole pipeline), got "
                         f"{data_parallel!r}")


# ---- every rank the same batch ---------------------------------------------------------------------

# checksum(): word i of a tensor's data weighs ROW(i // COLUMNS) * COLUMN(i % COLUMNS), modulo 2^64
_COLUMNS = 1024
_ROW_K, _COLUMN_K = 0x9E3779B97F4A7C16, 0xC2B2AE3D27D4EB50  # even 64-bit constants: the weights k * j + 1 are odd
_DEVICE_ROWS = 4096  # rows per piece of a device checksum (bounds its temporaries to 32 MiB)
_COLUMN_W = np.arange(_COLUMNS, dtype=np.uint64) * np.uint64(_COLUMN_K) + np.uint64(1)


def _signed(k: int) -> int:
    return k - 2**64 if k >= 2**63 else k


def checksum(t: torch.Tensor) -> str:
    """A checksum of every byte of `t`'s data, where the tensor lives, as 16 hex digits.

    The data is read as 64-bit words (the last bytes that fill no word each count as one), word i
    weighted by the odd number (r * _ROW_K + 1) * (c * _COLUMN_K + 1) for i = r * 1024 + c, and the
    weighted words summed modulo 2^64. Integer arithmetic: the same on any device and in any order of
    summation, so the CPU (numpy's einsum over 1024-word rows: about 20 GB/s on one core) and a GPU
    (torch) agree. A change to any one word always changes it (an odd weight is invertible modulo
    2^64); several changes, or a reordering, go unnoticed only by a coincidence of their weights.
    """
    x = t.detach()
    if x.layout != torch.strided:
        x = x.to_dense()
    if x.device.type == "meta":
        return "meta (no data)"
    data = x.resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    n = data.numel() // 8
    words = data[:n * 8]
    if n and words.data_ptr() % 8:  # a storage offset that is not a multiple of 8 bytes
        words = words.clone()
    rows = n // _COLUMNS
    body = words.view(torch.int64)[:rows * _COLUMNS].view(rows, _COLUMNS)
    # what fills no row of 1024 words (fewer than 1024 words and the last bytes), on the CPU: at most 8 KiB
    total = (_host_sum if data.device.type == "cpu" else _device_sum)(body) if rows else 0
    if data.numel() > rows * _COLUMNS * 8:
        tail = np.concatenate([words[rows * _COLUMNS * 8:].cpu().numpy().view(np.uint64),
                               data[n * 8:].cpu().numpy().astype(np.uint64)])
        total += _tail_sum(tail, rows * _COLUMNS)
    return f"{total % 2**64:016x}"


def _tail_sum(z: np.ndarray, first: int) -> int:
    """The weighted sum of words `first`, `first + 1`, ... (any count; used for the few that fill no row)."""
    i = np.arange(first, first + z.size, dtype=np.uint64)
    rows, columns = i // np.uint64(_COLUMNS), i % np.uint64(_COLUMNS)
    weights = (rows * np.uint64(_ROW_K) + np.uint64(1)) * (columns * np.uint64(_COLUMN_K) + np.uint64(1))
    return int(np.dot(z, weights))


def _host_sum(body: torch.Tensor) -> int:
    """The weighted sum of the rows of 1024 words, with numpy (unsigned: wraps modulo 2^64 by definition)."""
    row = np.arange(body.shape[0], dtype=np.uint64) * np.uint64(_ROW_K) + np.uint64(1)
    return int(np.dot(np.einsum("ij,j->i", body.numpy().view(np.uint64), _COLUMN_W), row))


def _device_sum(body: torch.Tensor) -> int:
    """The same with torch on the tensor's device (int64 arithmetic wraps modulo 2^64 there too), in pieces."""
    device, rows = body.device, body.shape[0]
    total = torch.zeros((), dtype=torch.int64, device=device)
    column = torch.arange(_COLUMNS, dtype=torch.int64, device=device).mul_(_signed(_COLUMN_K)).add_(1)
    for first in range(0, rows, _DEVICE_ROWS):
        part = body[first:first + _DEVICE_ROWS]
        row = torch.arange(first, first + part.shape[0], dtype=torch.int64, device=device)
        total += ((part * column).sum(1) * row.mul_(_signed(_ROW_K)).add_(1)).sum()
    return int(total.item())


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
        fields[f"{name} checksum"] = "; ".join(checksum(t) for t in tensors)
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
            f"same batch (on the same kind of device); stagewise compares the settings, the call, and the batch's "
            f"structure, shapes, dtypes and a checksum of every byte of every tensor before each step")


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
            if not st.train:
                return
            if s == self.last:  # its layers' output too, so that a NaN they made is not blamed on loss_fn
                out, st.last_output = st.last_output, None
                loss = st.losses[n]
                # read like every stage's output; on the CPU a finite loss is seen at once (no device to wait
                # for) and then the output, often the largest tensor of the step (logits), is not read
                if loss.device.type != "cpu" or not math.isfinite(loss.item()):
                    self._keep(s, n, "output", [t for t in flatten(out)[0] if t.requires_grad])
                self._keep(s, n, "loss", [loss])
                return
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
                 asynchronous: bool, scalers: dict[int, LossScaler] | None = None):
        self.world, self.model, self.watches, self.policy = world, model, watches, policy
        self.asynchronous, self.scalers = asynchronous, scalers or {}

    def __call__(self, ctx: StepContext) -> None:
        sums, fresh = self.watches[ctx.rank].take(keep=self.asynchronous)
        # fp16: the LossScaling part found an inf/NaN gradient on some rank (every rank knows). If every loss is
        # finite that is an overflow, the scaler's business; a non-finite loss is this policy's, as any other.
        overflow = bool(ctx.report.get("overflow"))
        checked = [v for k, v in sums.items() if k[2] == "loss" and k in fresh]
        norm = None if overflow else ctx.report.get("grad_norm")  # ClipGradNorm's, over every stage: grads known
        if norm is None and not overflow:
            total = _total(p.grad for p in self.model.owned[ctx.rank] if p.grad is not None)
            checked += [total] if total is not None else []
        bad = float(bool(checked) and not math.isfinite(sum(v.to(torch.float64) for v in checked).item()))
        if norm is not None and not math.isfinite(norm):
            bad = 1.0
        if not self.asynchronous or overflow:  # every rank decides alike (an overflow was a verdict of every rank)
            flag = torch.tensor([bad], dtype=torch.float64, device=self.world.device(ctx.rank))
            self.world.all_reduce(ctx.rank, [flag], self.world.grid_groups().everyone)
            bad = flag.item()
        if overflow and not bad:
            self._overflow(ctx, sums)
            return
        if not bad:
            return
        ctx.report.pop("overflow", None)  # a non-finite loss: no scale would help, the scale stays
        ctx.skip = True
        where, stage, mb = self._locate(ctx.rank, sums)
        if self.policy == "raise":
            raise PipelineError(f"a non-finite (NaN or inf) loss or gradient in this step: {where}. The step was not "
                                "taken on any rank; Pipeline(on_nonfinite='skip') skips such steps with a warning "
                                "instead of stopping", stage=stage, microbatch=mb, action=str(ctx.action),
                                rank=ctx.rank)
        ctx.report["skipped"] = f"a non-finite loss or gradient: {where}"

    def _overflow(self, ctx: StepContext, sums: dict[tuple[int, int, str], torch.Tensor]) -> None:
        """An fp16 gradient overflow with finite losses: the scaler backs off and the step is skipped, or the
        scaler gives up and every rank stops, naming where the overflow first appeared in this step."""
        scaler = self.scalers[ctx.rank]
        scale = scaler.scale
        try:
            scaler.update(True)
        except LossScaleError as err:
            where, stage, mb = self._locate(ctx.rank, sums)
            raise PipelineError(
                f"fp16 loss scaling gave up: {err}. In this step {where}. The gradients overflow fp16's range (65504) "
                "whatever the scale, and an overflowing step is never taken: train in precision='bf16' (fp32's "
                "range), or find what grows that large there (diverging weights: a lower learning rate); "
                "Pipeline(loss_scale={'min_scale': ..., 'max_consecutive_skips': ...}) sets these limits",
                stage=stage, microbatch=mb, action=str(ctx.action), rank=ctx.rank) from None
        ctx.report["skipped"] = (f"an inf or NaN gradient at loss scale {scale:g} (fp16 overflow; the scale is now "
                                 f"{scaler.scale:g}, {scaler.skips} step(s) skipped in a row)")
        ctx.report["overflow_skips"] = scaler.skips

    def _locate(self, rank: int, sums: dict[tuple[int, int, str], torch.Tensor]) -> tuple[str, int | None, int | None]:
        """Where the first non-finite value appeared, over every rank (a collective unless asynchronous)."""
        found = [(s, n, what, rank) for (s, n, what), v in sums.items() if not math.isfinite(v.item())]
        for s, stage in self.model.of_rank(rank).items():
            if any(p.grad is not None and not torch.isfinite(p.grad).all() for p in stage.parameters()):
                found.append((s, -1, "parameter gradients", rank))
        if not self.asynchronous:
            everyone = self.world.grid_groups().everyone
            found = [x for part in self.world.all_gather_object(rank, found, everyone) for x in part]
        # forward order: by stage, then micro-batch; a stage's output before the loss computed from it
        forward = sorted((x for x in found if x[2] in ("output", "loss")), key=lambda x: (x[0], x[1], x[2] == "loss"))
        if forward:
            s, n, what, r = forward[0]
            if what == "loss":
                return (f"the loss of micro-batch {n} (last stage {s}, rank {r}) is the first non-finite value; every "
                        "stage output before it, the last stage's own output included, was finite: check loss_fn "
                        "and the labels", s, n)
            where = f"it first appeared in stage {s}'s output for micro-batch {n} (rank {r}, F(stage {s}, mb {n}))"
            if s == self.model.schedule.num_stages - 1:
                where += (f": the output of the last stage's layers, before loss_fn saw it (a layer of stage {s} "
                          "produced it, not the loss)")
            return where, s, n
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
