"""Schedules as files: the CSV form torch.distributed.pipelining writes, round trips, refusals, torch's own files."""

from __future__ import annotations

import csv
import re

import pytest

from stagewise.schedules import (
    SCHEDULES,
    SYNCHRONOUS,
    Schedule,
    ScheduleError,
    build,
    dumps,
    load,
    loads,
    lower,
    resolve_schedule,
    save,
    validate,
)

GRID = [(1, 1), (1, 3), (2, 1), (2, 5), (3, 4), (4, 8), (5, 11), (8, 3), (8, 17)]


def lists(sc: Schedule) -> list[list]:
    return [list(p) for p in sc.programs]


@pytest.mark.parametrize("name", SYNCHRONOUS)
def test_every_synchronous_schedule_round_trips_exactly(name, tmp_path):
    for P, m in GRID:
        sc = build(name, P, m)
        path = save(sc, tmp_path / f"{name}-{P}-{m}.csv")
        back = load(path)
        assert lists(back) == lists(sc), (name, P, m)
        assert back.placement == sc.placement and back.virtual_stages == sc.virtual_stages and back.microbatches == m
        assert back.name == f"{name}-{P}-{m}"
        split_used = any(a.op in ("I", "W") for p in sc.programs for a in p)
        assert back.split_backward == split_used
        assert load(path, name=name).name == name
        assert dumps(back) == dumps(sc) == dumps(lower(sc))  # communication is left out of the file


def test_the_file_is_what_torch_writes():
    text = dumps(build("dualpipev", 2, 4))
    rows = list(csv.reader(text.splitlines()))
    assert len(rows) == 2
    assert rows[0][:3] == ["0F0", "0F1", "0F2"]
    assert "(0F3;3B1)OVERLAP_F_B" in rows[0]
    assert all(re.fullmatch(r"\d+[FIBW]\d+|\(\d+F\d+;\d+B\d+\)OVERLAP_F_B", c) for r in rows for c in r)


def test_asynchronous_schedules_are_not_written():
    with pytest.raises(ScheduleError, match="asynchronous"):
        dumps(build("pipedream", 2, 2, batches=2))


@pytest.mark.parametrize("text,where,why", [
    ("0F0,0B0\n1F0,1Q0\n", "row 2, column 2", r"'1Q0' is not an action \(expected \{stage\}"),
    ("0F,0B0\n", "row 1, column 1", "names no micro-batch"),
    ("0F0,1F0,1B0,0B0\n0F1\n", "row 2, column 1", "already runs it there; a stage lives on one device"),
    ("0F0,(1F0;0I0)OVERLAP_F_B\n", "row 1, column 2", "pairs exactly a forward then a full backward"),
    ("0F0,(1F0;0B0)OVERLAP\n", "row 1, column 2", "no action that groups others"),
    ("0F0,0STEP\n", "row 1, column 2", "optimizer steps are implied"),
    ("0F0,0B0\n\n2F0,2B0\n", "row 2", "device 1 runs no action"),
    ("0F0,2F0,2B0,0B0\n1F0,1B0\n", "row 2", "device 1 holds 1 stages but device 0 holds 2"),
    ("0F0,0B0\n1B0,1F0\n", "row 2, column 1 \\('1B0'\\)", "waits forever at its action #0 B"),
    ("0F0,0B0\n1F0\n", "row 2", r"B\(stage 1, mb 0\) never runs"),
    ("# a comment\n0F0,0F1,0B0,0B1,0B1\n", "row 2, column 5", "runs twice"),
])
def test_bad_files_are_refused_naming_row_and_column(text, where, why, tmp_path):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(ScheduleError) as err:
        load(path)
    assert re.search(rf"bad\.csv {where}", str(err.value)), str(err.value)
    assert re.search(why, str(err.value)), str(err.value)


def test_whole_file_faults_and_torch_extras():
    with pytest.raises(ScheduleError, match="no rows"):
        loads("# nothing\n\n")
    with pytest.raises(ScheduleError, match="stage 1 is in no row"):
        loads("0F0,0B0\n2F0,2B0\n")
    with pytest.raises(ScheduleError, match="cannot read schedule file"):
        load("/nonexistent/dir/x.csv")
    # torch's idle slots (empty cells) and its communication/sharding cells are read and dropped
    sc = loads("0F0,,0SEND_F0,0RECV_B0,0B0,0UNSHARD,0RESHARD,0REDUCE_GRAD\n1RECV_F0,1F0, 1B0 ,1SEND_B0\n")
    assert lists(sc) == lists(build("gpipe", 2, 1))


# ---- torch's own schedules, written by torch ----

def _bare_torch(cls, P: int, m: int, v: int):
    """A torch schedule object with its action lists computed, without stages or a process group.

    torch computes `pipeline_order` from a few attributes in `_calculate_single_rank_operations`;
    its constructor would need real stages on an initialised process group, so it is skipped."""
    sched = object.__new__(cls)
    sched.pp_group_size, sched._n_microbatches = P, m
    sched._num_stages = sched.num_stages = P * v
    sched.n_local_stages, sched._stages = v, [None] * v
    sched.number_of_rounds = max(1, m // P)
    sched.microbatches_per_round = m // sched.number_of_rounds
    sched.pipeline_order = {r: sched._calculate_single_rank_operations(r) for r in range(P)}
    return sched


@pytest.mark.parametrize("cls_name,ours", [("ScheduleLoopedBFS", "looped-bfs"), ("ScheduleZBVZeroBubble", "zbv"),
                                           ("ScheduleDualPipeV", "dualpipev"),
                                           ("ScheduleInterleaved1F1B", "interleaved"),
                                           ("ScheduleInterleavedZeroBubble", None)])
def test_torch_writes_a_file_we_load_and_validate(cls_name, ours, tmp_path):
    T = pytest.importorskip("torch.distributed.pipelining.schedules")
    cls = getattr(T, cls_name, None)
    if cls is None:
        pytest.skip(f"this torch has no {cls_name}")
    for P, m in [(2, 4), (3, 6), (4, 8), (4, 12)]:
        sched = _bare_torch(cls, P, m, 2)
        path = tmp_path / f"{cls_name}-{P}-{m}.csv"
        T.PipelineScheduleMulti._dump_csv(sched, str(path))  # torch's own writer (compute actions)
        got = load(path)
        assert got.num_devices == P and got.num_stages == 2 * P and got.microbatches == m
        if ours:  # the same algorithm: the same lists
            assert lists(got) == lists(build(ours, P, m, 2)), (cls_name, P, m)
        # and torch reads what we write: every cell parses back to itself
        for row in csv.reader(dumps(got).splitlines()):
            assert [repr(T._Action.from_str(c)) for c in row] == row


def test_torch_file_with_communication_loads_to_its_compute_actions(tmp_path):
    T = pytest.importorskip("torch.distributed.pipelining.schedules")
    sched = _bare_torch(T.ScheduleZBVZeroBubble, 2, 4, 2)
    stage_to_rank = {0: 0, 1: 1, 2: 1, 3: 0}
    with_comms = T._add_send_recv({r: T._add_unshard_reshard(list(a)) for r, a in sched.pipeline_order.items()},
                                  stage_to_rank=lambda s: stage_to_rank[s], num_stages=4)
    path = tmp_path / "zbv_comms.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows(with_comms[r] for r in sorted(with_comms))
    text = path.read_text()
    assert "SEND_F" in text and "UNSHARD" in text
    got = load(path)
    assert lists(got) == lists(build("zbv", 2, 4))


# ---- resolve_schedule, for Pipeline ----

def test_resolve_schedule_takes_a_name_a_file_or_a_schedule(tmp_path):
    by_name = resolve_schedule("dualpipev", 3, 7)
    assert by_name.lowered and by_name.name == "dualpipev"
    path = save(build("v-min", 3, 7), tmp_path / "mine.csv")
    from_file = resolve_schedule(path, 3, 7)
    assert from_file.lowered and from_file.name == "mine"
    assert lists(from_file) == lists(validate(build("v-min", 3, 7)))
    assert resolve_schedule(str(path), 3, 7, virtual_stages=2).virtual_stages == 2
    given = build("zb-h2", 2, 4)
    assert lists(resolve_schedule(given, 2, 4)) == lists(validate(given))
    assert resolve_schedule(path, 3).microbatches == 7  # the file's own count when unset
    with pytest.raises(ScheduleError, match="mine.csv is written for 3 devices, but this pipeline has 4"):
        resolve_schedule(path, 4, 7)
    with pytest.raises(ScheduleError, match="runs 7 micro-batches, not microbatches=8"):
        resolve_schedule(path, 3, 8)
    with pytest.raises(ScheduleError, match="holds 2 virtual stages per device, not virtual_stages=3"):
        resolve_schedule(path, 3, 7, virtual_stages=3)
    with pytest.raises(ScheduleError, match="'zb-h2' is written for 2 devices, but this pipeline has 3"):
        resolve_schedule(given, 3, 4)
    assert resolve_schedule("zb-h2", 2).microbatches == 4  # a name: m defaults to 4
    with pytest.raises(ScheduleError, match="takes no options"):
        resolve_schedule(path, 3, 7, batches=2)
    with pytest.raises(ScheduleError, match="unknown schedule"):
        resolve_schedule("nope", 2, 2)
    with pytest.raises(ScheduleError, match="a schedule is a name"):
        resolve_schedule(3, 2, 2)


def test_cli_simulate_save_and_file(tmp_path, capsys):
    from stagewise.cli import main

    path = tmp_path / "out" / "zbh2.csv"
    assert main(["simulate", "--schedule", "zb-h2", "--stages", "3", "--microbatches", "5", "--save", str(path)]) == 0
    assert lists(load(path)) == lists(build("zb-h2", 3, 5))
    capsys.readouterr()
    assert main(["simulate", "--file", str(path), "--json"]) == 0
    import json

    data = json.loads(capsys.readouterr().out)
    assert (data["schedule"], data["devices"], data["microbatches"]) == ("zbh2", 3, 5)
    bad = tmp_path / "bad.csv"
    bad.write_text("0F0,0B0\n1F0,1X0\n")
    assert main(["simulate", "--file", str(bad)]) == 2
    assert "row 2, column 2" in capsys.readouterr().err
    assert main(["simulate", "--schedule", "dualpipev", "--stages", "2", "--microbatches", "4", "--overlap",
                 "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["costs"]["overlap"] is True
    assert main(["simulate", "--list"]) == 0
    listed = capsys.readouterr().out
    assert all(n in listed for n in ("looped-bfs", "zb-h2", "v-half", "v-min", "dualpipev"))


def test_schedules_package_does_not_import_torch():
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")])))
    code = ("import sys, stagewise.schedules, stagewise.schedules.files, stagewise.viz; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=root)
    assert set(SCHEDULES) >= {"looped-bfs", "zb-h2", "v-half", "v-min", "dualpipev"}
