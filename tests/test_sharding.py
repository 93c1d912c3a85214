"""Pipeline x sharded data parallel (FSDP2, ZeroRedundancyOptimizer): the lowering pass, its validation and
simulation, refusals, and exactness against one process on 4 gloo processes (float64, 1e-10)."""

from __future__ import annotations

import pytest
import torch
from shard_workers import shard_checkpoints, shard_parity
from toy import loss_fn, make_layers, make_tied_layers

from stagewise import Pipeline, load_full, spawn
from stagewise.partition.sharding import between_steps, bytes_per_param
from stagewise.runtime.checkpoint import CheckpointError
from stagewise.schedules import REDUCE, STEP, Costs, Schedule, ScheduleError, resolve_schedule, simulate, validate
from stagewise.schedules.actions import COMM_OPS, RESHARD, UNSHARD, Action

TOL = 1e-10
WORK = ("F", "B", "I", "W", "RECOMPUTE", "OVERLAP_F_B")


def _ops(prog) -> list[Action]:
    return [a for a in prog if a.op not in COMM_OPS]


def test_full_gathers_one_action_ahead_and_releases_after_the_reduction():
    sc = resolve_schedule("interleaved", 2, 4, None, 2, shard="full")
    for d, prog in enumerate(sc.programs):
        ops = _ops(prog)
        for s in sc.stages_of(d):
            at = {op: i for i, a in enumerate(ops) for op in (UNSHARD, RESHARD, REDUCE) if a.op == op and a.stage == s}
            work = [i for i, a in enumerate(ops) if a.op in WORK]
            first = next(i for i in work if ops[i].stage == s)
            before = [i for i in work if i < first]
            # the gather comes right before the compute action ahead of the stage's first forward (a prefetch)
            assert at[UNSHARD] == (before[-1] - 1 if before else 0) or ops[at[UNSHARD] + 1].op == UNSHARD, (d, s)
            last = max(i for i in work if ops[i].stage == s)
            assert last < at[REDUCE] < at[RESHARD] and ops[at[RESHARD] - 1].op == REDUCE, (d, s)
        assert ops[-1].op == STEP
    first_device = [a.label for a in _ops(sc.programs[0])]
    assert first_device[:4] == ["U", "F0", "U", "F1"]  # stage 2's gather runs during stage 0's second forward


def test_gradients_keeps_weights_whole_and_gathers_them_again_after_the_step():
    sc = resolve_schedule("zbv", 2, 4, None, 2, shard="gradients")
    for d, prog in enumerate(sc.programs):
        ops = _ops(prog)
        step = next(i for i, a in enumerate(ops) if a.op == STEP)
        after = [(a.op, a.stage) for a in ops[step + 1:]]
        assert after == [(op, s) for s in sc.stages_of(d) for op in (RESHARD, UNSHARD)]
        assert not any(a.op in (UNSHARD, RESHARD) for a in ops[:step])


def test_pairs_recomputes_and_split_backwards_keep_their_order():
    for name in ("dualpipev", "zb-h1", "v-half", "1f1b"):
        for ac in ("never", "always"):
            plain = resolve_schedule(name, 2, 4, None, 2, ac)
            sharded = resolve_schedule(name, 2, 4, None, 2, ac, shard="full")
            for p, q in zip(plain.programs, sharded.programs):  # the same actions, with the shard actions added
                assert [a for a in q if a.op not in (UNSHARD, RESHARD)] == list(p)
    with pytest.raises(ScheduleError, match="several weight versions.*shard='full'"):
        resolve_schedule("2bw", 2, 4, None, 2, shard="full")


def test_the_simulator_times_the_gathers_and_the_timeline_draws_them():
    base = simulate(resolve_schedule("1f1b", 2, 4, None, 2), Costs(f=1, b=2, reduce=1))
    sharded = resolve_schedule("1f1b", 2, 4, None, 2, shard="full")
    sim = simulate(sharded, Costs(f=1, b=2, reduce=1, unshard=0.5))
    assert sim.makespan == base.makespan + 0.5  # device 0's gather precedes everything
    labels = {e.label for e in sim.timeline.events}
    assert {"U", "X", "R"} <= labels
    unshard = [e for e in sim.timeline.events if e.op == UNSHARD]
    assert [(e.device, e.end - e.start) for e in unshard] == [(0, 0.5), (1, 0.5)]
    assert simulate(sharded, Costs(f=1, b=2, reduce=1)).makespan == base.makespan  # release costs nothing


def _broken(lists: list[list[Action]], name: str) -> Schedule:
    return Schedule(name, 2, 4, (0, 1), lists, lowered=True)


def test_the_validator_names_a_misplaced_gather_or_release():
    good = resolve_schedule("1f1b", 2, 4, None, 2, shard="full")
    assert validate(good)

    def edited(d: int, edit) -> list[list[Action]]:
        lists = [list(p) for p in good.programs]
        lists[d] = edit(lists[d])
        return lists

    def move(prog, op, to):
        i = next(k for k, a in enumerate(prog) if a.op == op)
        a = prog.pop(i)
        prog.insert(to(prog), a)
        return prog

    late = edited(0, lambda p: move(p, UNSHARD, lambda q: next(k for k, a in enumerate(q) if a.op == "F") + 1))
    with pytest.raises(ScheduleError, match=r"device 0 action #\d+ F\(stage 0, mb 0\): needs stage 0's whole "
                                            r"parameters, but they are sharded here \(gathered only later\)"):
        validate(_broken(late, "late"))
    early = edited(1, lambda p: move(p, RESHARD, lambda q: next(k for k, a in enumerate(q) if a.op == REDUCE)))
    with pytest.raises(ScheduleError, match=r"REDUCE\(stage 1\): needs stage 1's whole parameters, but they are "
                                            r"sharded here \(released at #\d+\)"):
        validate(_broken(early, "early"))
    twice = edited(0, lambda p: [Action(UNSHARD, 0)] + p)
    with pytest.raises(ScheduleError, match=r"UNSHARD\(stage 0\): gathers stage 0, which is whole already"):
        validate(_broken(twice, "twice"))
    kept = edited(0, lambda p: [a for a in p if a.op != RESHARD])
    with pytest.raises(ScheduleError, match="ends its program with stage 0 whole but starts it sharded"):
        validate(_broken(kept, "kept"))
    wrong = edited(0, lambda p: [Action(UNSHARD, 1)] + p)
    with pytest.raises(ScheduleError, match="stage 1 lives on device 1, so its parameters are gathered and released "
                                            "there, not on 0"):
        validate(_broken(wrong, "wrong"))


def test_options_sharding_cannot_take_are_refused_before_anything_is_built():
    built = []

    def factory():
        built.append(1)
        return make_layers()[0]

    with pytest.raises(ValueError, match=r"shard='full' needs one process per rank: FSDP2 .* threads of one process "
                                         r"\(local_devices=2\) do not have. Launch P x D processes.*stagewise run"):
        Pipeline([factory] * 9, loss_fn, data_parallel=2, local_devices=2, shard="full", show_partition=False)
    with pytest.raises(ValueError, match="shard='optimizer' needs one process per rank: ZeroRedundancyOptimizer"):
        Pipeline([factory] * 9, loss_fn, data_parallel=2, local_devices=2, shard="optimizer", show_partition=False)
    with pytest.raises(ValueError, match="shard must be one of 'none', 'optimizer', 'gradients', 'full'"):
        Pipeline([factory] * 9, loss_fn, shard="zero3", show_partition=False)
    with pytest.raises(ValueError, match="data_parallel=1 has none to split over"):
        Pipeline([factory] * 9, loss_fn, shard="gradients", show_partition=False)
    with pytest.raises(ValueError, match="fp16 loss scaling is not supported with sharded gradients: use "
                                         "precision='bf16'"):
        Pipeline([factory] * 9, loss_fn, data_parallel=2, shard="full", precision="fp16", show_partition=False)
    with pytest.raises(ValueError, match="compile=False"):
        Pipeline([factory] * 9, loss_fn, data_parallel=2, shard="full", compile=True, show_partition=False)
    assert built == []
    pipe = Pipeline(make_tied_layers(), loss_fn, data_parallel=2, local_devices=2, show_partition=False)
    assert pipe.sharding.mode == "none" and pipe.sharding.held_bytes()  # the default: nothing sharded
    pipe.close()


def test_the_planner_prices_the_shards_and_the_gathered_weights():
    assert [bytes_per_param(m, 4) for m in ("none", "optimizer", "gradients", "full")] == [16, 10, 12, 12]
    assert bytes_per_param("full", 1) == 16 and between_steps("full", 4) == 4 and between_steps("gradients", 4) == 8
    from stagewise.measure.plan_model import plan_model
    from stagewise.partition import PartitionError

    torch.manual_seed(0)
    layers = [torch.nn.Linear(256, 256) for _ in range(4)]  # 2 x 65792 parameters per device
    sample = (torch.randn(8, 256), torch.randn(8, 256))
    options = dict(data_parallel=4, schedule="1f1b", microbatches=2, memory_limit=1.8e6, runs=1, repeats=1,
                   recompute="never")
    with pytest.raises(PartitionError, match="no configuration fits the memory limit"):
        plan_model(layers, torch.nn.functional.mse_loss, sample, 2, shard="none", **options)  # 16 B: 2.1 MB
    plan, _ = plan_model(layers, torch.nn.functional.mse_loss, sample, 2, shard="full", **options)  # 12 B: 1.6 MB
    assert plan.settings["shard"] == "full" and max(plan.choice.memory) <= 1.8e6
    assert plan.choice.memory[0] >= 12 * 2 * 65792  # the all-gathered weights and whole gradients are counted


def _check(results: list[dict]) -> None:
    names = sorted(n for n, _ in torch.nn.Sequential(*make_layers()).named_parameters())
    for r in results:
        for key, e in r.items():
            if not isinstance(key, tuple):
                continue
            assert e["loss"] <= TOL and e["weight"] <= TOL and e["after"] <= TOL, (key, e)
            if e["norm"] is not None:  # the norm over every shard: clip_grad_norm_'s of the unsplit model
                assert e["norm"] <= TOL, (key, e)
            shard = key[-1]
            assert e["kinds"] == (["DTensor"] if shard == "full" else ["Parameter"]), (key, e)
        # each of ranks 0, 1 (stage 0's replicas) and 2, 3 holds its stages' parameters, every name once
    for schedule in ("1f1b", "zbv", "interleaved"):
        held = sorted(n for r in results[::2] for n in r[(schedule, "full")]["names"])
        assert held == names, schedule
    for r in results:
        assert r["bf16"]["loss"] <= 1e-2 and r["bf16"]["weight"] <= 2e-2, r["bf16"]
        mem = r["memory"]
        # between steps: everything split with "full"; each mode holds less than the one before
        assert mem["full"]["total"] <= (1 / 2 + 0.05) * mem["none"]["total"], mem
        assert mem["none"]["total"] > mem["optimizer"]["total"] >= mem["full"]["total"], mem
        assert mem["gradients"]["gradients"] <= 0.55 * mem["none"]["gradients"], mem
        assert mem["optimizer"]["optimizer"] <= 0.55 * mem["none"]["optimizer"], mem
        params = 4 * (64 * 64 + 64)  # the stage's 4 float64 Linear(64, 64): the model's figure per parameter
        for mode, held in mem.items():
            assert abs(held["total"] - between_steps(mode, 2, 8, 8, 16) * params) <= 0.01 * held["total"], (mode, mem)
        assert r["timing"]["reduce_scatter_s"] > 0 and "all_gather_wait_s" in r["timing"]
        assert r["groups"]["loss"] <= TOL and r["groups"]["weight"] <= TOL and r["groups"]["groups"] == 2, r["groups"]


def test_pp2_by_dp2_sharded_equals_one_process():
    """4 gloo processes: 1f1b, zbv and interleaved in every shard mode, tied weights with clipping and accumulation,
    (sum, count) losses, activation checkpointing, bf16 and the bytes held between steps."""
    _check(spawn(shard_parity, 4, timeout=400))


@pytest.mark.slow
def test_pp2_by_dp2_sharded_every_feature_on_every_schedule_and_mode():
    _check(spawn(shard_parity, 4, args=(True,), timeout=600))


def test_sharded_checkpoints_resume_bit_for_bit_and_load_into_any_shape(tmp_path):
    """Saved after 2 steps by each shard mode (P2 x D2), loaded into other modes, schedules, P=1 x D=4 and P=4 x D=1,
    one more step: equal to one process (1e-10), and bit for bit the uninterrupted run when the shape is the same."""
    results = spawn(shard_checkpoints, 4, args=(str(tmp_path),), timeout=400)
    for r in results:
        for key, e in r.items():
            if key[0] == "load_full":
                assert e <= TOL, (key, e)  # the unsplit weights after 2 steps
                continue
            assert e["err"] <= TOL, (key, e)
            assert e["bitwise"] or not e["same"], (key, e)
    assert sum(key[0] == "load_full" for key in results[0]) == 4
    manifest = __import__("json").loads((tmp_path / "full" / "manifest.json").read_text())
    assert manifest["optimizer"]["dcp"] == "optimizer-dcp" and manifest["optimizer"]["class"] == "Adam"
    shards = sorted(n for n in manifest["files"] if n.startswith("optimizer-dcp/"))
    assert "optimizer-dcp/.metadata" in shards and len(shards) >= 5  # every rank wrote its shards
    damaged = tmp_path / "full" / shards[1]
    damaged.write_bytes(damaged.read_bytes()[:-1])
    with pytest.raises(CheckpointError, match=r"optimizer-dcp/.* is truncated"):
        load_full(tmp_path / "full")


def test_stagewise_train_shards_and_resumes_in_another_mode(tmp_path):
    """`stagewise train --dp 2 --shard full` (4 processes), then `--resume` with `--shard optimizer`."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    common = [sys.executable, "-m", "stagewise.cli", "train", "--out", str(tmp_path / "run")]
    first = subprocess.run(common + ["--stages", "2", "--dp", "2", "--shard", "full", "--steps", "2", "--schedule",
                                     "zbv", "--microbatches", "2", "--batch-size", "8", "--seq-len", "16",
                                     "--partition", "uniform", "--log-every", "1", "--val-fraction", "0"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-3000:]
    assert "2 stage(s) x 2 data-parallel replicas" in first.stdout and "step 2 loss" in first.stdout
    again = subprocess.run(common + ["--resume", str(tmp_path / "run"), "--steps", "3", "--shard", "optimizer"],
                           env=env, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step 3 loss" in again.stdout, again.stdout[-2000:]
