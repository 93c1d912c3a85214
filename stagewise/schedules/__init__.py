"""Schedules as data: generators, the validator, the lowering to communication, the simulator.

Nothing here imports torch.
"""

from stagewise.schedules.actions import (
    COMM_OPS,
    COMPUTE_OPS,
    OVERLAP_F_B,
    PAIR_OPS,
    RECOMPUTE,
    RECV_B,
    RECV_F,
    REDUCE,
    SEND_B,
    SEND_F,
    STEP,
    Action,
    B,
    F,
    I,
    ScheduleError,
    W,
)
from stagewise.schedules.asynchronous import pipedream, two_bw
from stagewise.schedules.breadth_first import looped_bfs
from stagewise.schedules.controllable_memory import v_half, v_min
from stagewise.schedules.dualpipe import dualpipev
from stagewise.schedules.files import dumps, load, loads, save
from stagewise.schedules.flushing import gpipe, naive, one_f_one_b
from stagewise.schedules.interleaved import interleaved
from stagewise.schedules.lowering import lower
from stagewise.schedules.recompute import with_recompute
from stagewise.schedules.reduction import with_reductions
from stagewise.schedules.registry import SCHEDULES, SYNCHRONOUS, ScheduleInfo, build, resolve_schedule
from stagewise.schedules.schedule import Schedule
from stagewise.schedules.simulate import Costs, Simulation, simulate
from stagewise.schedules.timeline import Event, Timeline
from stagewise.schedules.validate import validate
from stagewise.schedules.zero_bubble import zb_h1, zb_h2, zbv

__all__ = [
    "B", "COMM_OPS", "COMPUTE_OPS", "F", "I", "OVERLAP_F_B", "PAIR_OPS", "RECV_B", "RECV_F", "RECOMPUTE", "REDUCE",
    "SEND_B", "SEND_F", "STEP", "W", "Action", "Costs", "Event", "SCHEDULES", "SYNCHRONOUS", "Schedule",
    "ScheduleError", "ScheduleInfo", "Simulation", "Timeline", "build", "dualpipev", "dumps", "gpipe", "interleaved",
    "load", "loads", "looped_bfs", "lower", "naive", "one_f_one_b", "pipedream", "resolve_schedule", "save",
    "simulate", "two_bw", "v_half", "v_min", "validate", "with_recompute", "with_reductions", "zb_h1", "zb_h2", "zbv",
]
