"""The schedule IR: an action is one unit of work on one device; a schedule is a list of them per device."""

from __future__ import annotations

from typing import NamedTuple

# Compute ops.
F = "F"  # forward of one (stage, micro-batch)
B = "B"  # full backward (input and weight gradients together)
I = "I"  # noqa: E741  # backward for the input gradient only
W = "W"  # backward for the weight gradient only (after I)
STEP = "STEP"  # optimizer step on the device; `version` is the weight version it produces
REDUCE = "REDUCE"  # data parallel: average stage `stage`'s gradients over its replicas (added by `with_reductions`)
RECOMPUTE = "RECOMPUTE"  # activation checkpointing: run F(stage, mb) again to rebuild what it did not keep
UNSHARD = "UNSHARD"  # sharded data parallel: all-gather stage `stage`'s parameters (added by `with_sharding`)
RESHARD = "RESHARD"  # sharded data parallel: release stage `stage`'s whole parameters, keep its shard
# one device's own work (REDUCE and UNSHARD: collectives of its replicas)
COMPUTE_OPS = (F, B, I, W, STEP, REDUCE, RECOMPUTE, UNSHARD, RESHARD)

# Communication ops, added by `lower()`.
SEND_F = "SEND_F"  # send stage `stage`'s output for `microbatch` to device `peer`
RECV_F = "RECV_F"  # receive the input of stage `stage` for `microbatch` from device `peer`
SEND_B = "SEND_B"  # send the gradient of stage `stage`'s input to device `peer`
RECV_B = "RECV_B"  # receive the gradient of stage `stage`'s output from device `peer`
COMM_OPS = (SEND_F, RECV_F, SEND_B, RECV_B)

# An overlapped pair (DualPipe): this row is one action made of the next two rows of the same
# device, a forward F(s, n) then a full backward B(s', n') of another (stage, micro-batch). The
# pair starts when the device is free and what both members need has arrived; the results of
# both are ready (and sent) when the pair ends. Its own stage and micro-batch are -1.
OVERLAP_F_B = "OVERLAP_F_B"
PAIR_OPS = (OVERLAP_F_B,)
OPS = COMPUTE_OPS + COMM_OPS + PAIR_OPS  # an op's index here is its code in the columnar form (`Programs`)


class Action(NamedTuple):
    """One unit of work on one device.

    `stage` is the (virtual) stage index, `microbatch` the micro-batch index (-1 for STEP),
    `version` the weight version the action uses (STEP: the version it creates), and
    `peer` the other device of a communication action (-1 otherwise).
    """

    op: str
    stage: int
    microbatch: int = -1
    version: int = 0
    peer: int = -1

    def __str__(self) -> str:
        if self.op == OVERLAP_F_B:
            return f"{OVERLAP_F_B}(the next two actions, overlapped)"
        if self.op == STEP:
            return f"STEP(stage {self.stage} -> v{self.version})"
        if self.op in (REDUCE, UNSHARD, RESHARD):
            return f"{self.op}(stage {self.stage})"
        v = f" v{self.version}" if self.version else ""
        p = f" peer {self.peer}" if self.peer >= 0 else ""
        return f"{self.op}(stage {self.stage}, mb {self.microbatch}{v}{p})"

    @property
    def label(self) -> str:
        """A short label for timelines, such as `F3` or `W0`."""
        if self.op == OVERLAP_F_B:
            return "F+B"
        if self.op == RECOMPUTE:
            return f"C{self.microbatch}"
        if self.op in (UNSHARD, RESHARD):
            return "U" if self.op == UNSHARD else "X"
        return self.op[0] if self.op in (STEP, REDUCE) else f"{self.op}{self.microbatch}"


class ScheduleError(ValueError):
    """A schedule is impossible to build or is not a valid pipeline schedule.

    `device` and `index` name the offending action (its device and its position in that
    device's list) when the error is about one; a schedule file maps them to its row and column.
    """

    def __init__(self, message: str, device: int | None = None, index: int | None = None) -> None:
        super().__init__(message)
        self.device, self.index = device, index
