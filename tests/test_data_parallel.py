"""Pipeline x data parallel: exact against one process (float64, 1e-10), reductions in the schedule, launchers."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from dp_workers import pp_dp, two_bw, wrong_world
from toy import loss_fn, make_layers

from stagewise import Pipeline, spawn
from stagewise.runtime.launch import free_port
from stagewise.schedules import (
    REDUCE,
    Action,
    Costs,
    Schedule,
    ScheduleError,
    build,
    simulate,
    validate,
    with_reductions,
)

TOL = 1e-10
ROOT = Path(__file__).resolve().parents[1]


def _check_pp_dp(results: list[dict], expected_names: int) -> None:
    for r in results:
        for key in ("1f1b", "zbv", "tied_accumulated", "token_mean", "token_mean_counted"):
            assert r[key]["loss"] <= TOL and r[key]["weight"] <= TOL, (key, r[key])
        assert abs(r["1f1b"]["grad_norm"] - r["zbv"]["grad_norm"]) <= TOL * r["zbv"]["grad_norm"]
        assert r["1f1b"]["grad_norm"] > 0


def test_pp2_dp2_on_four_processes_equals_one_process_with_clipping():
    """PP2 x DP2 (4 gloo processes): 1f1b and zbv, SGD with momentum, max_grad_norm=0.5, 5 steps on an 11-sample
    batch (uneven over 2 replicas x 2 micro-batches); tied embedding/head with accumulation over 3 calls."""
    results = spawn(pp_dp, 4, args=(2,), timeout=600)
    _check_pp_dp(results, 4)
    # ranks 0, 1 hold stage 0 (replicas), ranks 2, 3 stage 1; each replica holds every parameter once
    assert results[0]["1f1b"]["names"] == results[1]["1f1b"]["names"]
    all_names = sorted(n for n, _ in torch.nn.Sequential(*make_layers()).named_parameters())
    assert sorted(results[0]["1f1b"]["names"] + results[2]["1f1b"]["names"]) == all_names


def test_pipeline_by_data_parallel_threads_and_plain_data_parallel():
    _check_pp_dp([pp_dp(0, 2, 2, local=True)], 4)  # PP2 x DP2 as threads
    _check_pp_dp(spawn(pp_dp, 2, args=(1,), timeout=300), 2)  # P=1 x D=2: plain data parallelism, gloo


def test_two_bw_with_replicas_follows_its_update_rule():
    assert two_bw(0, 2, 2, local=True)["err"] <= TOL
    for r in spawn(two_bw, 4, args=(2,), timeout=300):
        assert r["err"] <= TOL


def test_refusals_name_what_to_change():
    with pytest.raises(ScheduleError, match="optimizer step after every micro-batch.*2bw"):
        Pipeline(make_layers(), loss_fn, schedule="pipedream", data_parallel=2, local_devices=2, show_partition=False)
    pipe = Pipeline(make_layers(), loss_fn, microbatches=2, data_parallel=2, local_devices=2, show_partition=False)
    with pytest.raises(ValueError, match=r"batch of 3 samples cannot be split into 2 data-parallel replicas x 2 "
                                         r"micro-batches.*at least 4 samples"):
        pipe.train_step((torch.zeros(3, 5, dtype=torch.long), torch.zeros(3, 5, dtype=torch.long)))
    errors = spawn(wrong_world, 3, timeout=120)
    assert all("3 processes cannot form pipelines of data_parallel=2" in e and "world size must be P x D" in e
               for e in errors), errors


def test_validator_refuses_a_reduction_before_the_stages_last_backward():
    good = with_reductions(build("1f1b", 2, 3))
    assert validate(good)
    lists = [list(p) for p in good.programs]
    at = next(i for i, a in enumerate(lists[1]) if a.op == REDUCE)
    red = lists[1].pop(at)
    lists[1].insert(1, red)  # right after the first forward, before any backward of stage 1
    with pytest.raises(ScheduleError, match=r"device 1 action #1 REDUCE\(stage 1\): reduces stage 1's gradients "
                                            r"before its backward piece B\(stage 1, mb 0\)"):
        validate(Schedule("early", 2, 3, (0, 1), lists))
    lists = [list(p) for p in good.programs]
    lists[0] = [a for a in lists[0] if a.op != REDUCE]
    with pytest.raises(ScheduleError, match=r"steps before stage 0's gradients are reduced"):
        validate(Schedule("missing", 2, 3, (0, 1), lists))
    lists = [list(p) for p in good.programs]
    lists[0].insert(-1, Action(REDUCE, 0, -1, 1))
    with pytest.raises(ScheduleError, match="reduces stage 0 a second time"):
        validate(Schedule("twice", 2, 3, (0, 1), lists))


def test_reductions_are_placed_after_each_stages_last_backward_and_timed():
    sc = validate(with_reductions(build("1f1b", 2, 4)))
    for d, prog in enumerate(sc.programs):
        ops = [a.op for a in prog if a.op in ("B", "REDUCE", "STEP")]
        assert ops[-2:] == ["REDUCE", "STEP"], (d, ops)
    base = simulate(validate(build("1f1b", 2, 4)), Costs(f=1, b=2))
    sim = simulate(sc, Costs(f=1, b=2, reduce=1.5))
    # device 1 finishes first: its reduction overlaps device 0's last backward, device 0's is exposed
    assert sim.makespan == base.makespan + 1.5
    reduce_events = [e for e in sim.timeline.events if e.op == "REDUCE"]
    assert [(e.device, e.start, e.end) for e in reduce_events] == [(0, 15.0, 16.5), (1, 13.0, 14.5)]
    zbv = validate(with_reductions(build("zbv", 2, 4)))
    first = {(d, a.stage): i for d, p in enumerate(zbv.programs) for i, a in enumerate(p) if a.op == REDUCE}
    assert set(first) == {(0, 0), (0, 3), (1, 1), (1, 2)}  # every stage of every device, once


_SCRIPT = """
import sys, torch, stagewise
from torch import nn
torch.manual_seed(0)
layers = [nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 1)]
pipe = stagewise.Pipeline(layers, loss_fn=nn.functional.mse_loss, microbatches=2, data_parallel=2, timeout=60,
                          optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1), show_partition=False)
g = torch.Generator().manual_seed(1)
x = torch.randn(8, 8, generator=g); y = x.sum(1, keepdim=True).sin()
for step in range(3):
    loss = pipe.train_step((x, y))
print(f"rank {pipe.rank} of {pipe.world.size}: grid {pipe.world.grid.pipeline}x{pipe.world.grid.data} "
      f"loss {loss.item():.6f}", flush=True)
"""


def test_two_nodes_of_two_processes_on_loopback(tmp_path):
    """`stagewise run` twice (two "nodes" of 2 processes each) on 127.0.0.1: PP2 x DP2 trains and ends cleanly."""
    script = tmp_path / "dp_script.py"
    script.write_text(_SCRIPT)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "stagewise.cli", "run", "-n", "2", "--nnodes", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(port)]
    start = time.monotonic()
    procs = [subprocess.Popen(cmd + ["--node-rank", str(k), str(script)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for k in range(2)]
    outs = [p.communicate(timeout=180) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, out + err[-3000:]
    text = "".join(out for out, _ in outs)  # two ranks of one node share a pipe: their lines may interleave
    found = sorted(re.findall(r"rank (\d) of 4: grid (\d)x(\d) loss (\d+\.\d{6})", text))
    assert [r for r, *_ in found] == ["0", "1", "2", "3"], text
    assert len({loss for *_, loss in found}) == 1 and all((p, d) == ("2", "2") for _, p, d, _ in found), text
    assert time.monotonic() - start < 180
