"""The structure the features build on: one tensor tree, schedules as objects, the World, the step's parts."""

from __future__ import annotations

import ast
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from structure_workers import layers, structured_parity
from toy import loss_fn, make_batch, make_layers, reference

from stagewise import Pipeline, spawn
from stagewise.schedules import B, F, Schedule, ScheduleError, build
from stagewise.schedules.actions import Action
from stagewise.tree import describe, flatten, map_tensors, unflatten

ROOT = Path(__file__).resolve().parents[1] / "stagewise"
TOL = 1e-10


def test_tree_keeps_namedtuples_dicts_and_riders():
    Pair = namedtuple("Pair", "a b")
    tree = {"x": Pair(torch.ones(2, 3), "keep"), "y": [torch.zeros(2), None, 4], "z": (torch.arange(2),)}
    tensors, spec = flatten(tree)
    assert [t.shape for t in tensors] == [(2, 3), (2,), (2,)]
    back = unflatten(spec, tensors)
    assert isinstance(back["x"], Pair) and back["x"].b == "keep" and back["y"][1:] == [None, 4]
    doubled = map_tensors(tree, lambda t: t * 2)
    assert isinstance(doubled["x"], Pair) and torch.equal(doubled["x"].a, torch.full((2, 3), 2.0))
    assert describe(spec) == "([2, 3]:float32, [2]:float32, [2]:int64)"


@pytest.mark.parametrize("schedule,world,m", [("1f1b", 2, 3), ("zbv", 2, 4), ("interleaved", 3, 3)])
def test_namedtuple_dict_and_mixed_stage_io_threads(schedule, world, m):
    r = structured_parity(0, world, schedule, m, local=True)
    assert r["loss"] <= TOL and r["grad"] <= TOL, r


def test_namedtuple_dict_and_mixed_stage_io_processes():
    results = spawn(structured_parity, 3, args=("1f1b", 3), timeout=300)
    for r in results:
        assert r["loss"] <= TOL and r["grad"] <= TOL, r
    names = [n for n, _ in torch.nn.Sequential(*layers()).named_parameters()]
    assert sorted(n for r in results for n in r["names"]) == sorted(names)  # every parameter held once


def _by_hand() -> Schedule:
    """1F1B on 2 devices and 2 micro-batches, written out action by action."""
    return Schedule("by-hand", 2, 2, (0, 1), [
        [Action(F, 0, 0), Action(F, 0, 1), Action(B, 0, 0), Action(B, 0, 1), Action("STEP", 0, -1, 1)],
        [Action(F, 1, 0), Action(B, 1, 0), Action(F, 1, 1), Action(B, 1, 1), Action("STEP", 1, -1, 1)],
    ])


def test_a_hand_built_schedule_object_runs_with_exact_gradients():
    torch.set_default_dtype(torch.float64)
    batch = make_batch(6, 5)
    ref_loss, ref_grads, _ = reference(make_layers(), batch)
    pipe = Pipeline(make_layers(), loss_fn, schedule=_by_hand(), local_devices=2, show_partition=False)
    assert pipe.microbatches == 2 and pipe.schedule.name == "by-hand"
    loss = pipe.train_step(batch)
    assert abs(loss.item() - ref_loss.item()) <= TOL * abs(ref_loss.item())
    for name, p in pipe.named_parameters():
        assert ((p.grad - ref_grads[name]).abs().max() / ref_grads[name].abs().max()).item() <= TOL, name


def test_a_schedule_with_a_bad_action_is_refused_before_anything_runs():
    built = []

    def factory(i):
        def make():
            built.append(i)
            return make_layers()[i]
        return make

    good = _by_hand()
    bad_lists = [list(good.programs[0]), list(good.programs[1])]
    bad_lists[1][0], bad_lists[1][1] = bad_lists[1][1], bad_lists[1][0]  # B before its F
    bad = Schedule("broken", 2, 2, (0, 1), bad_lists)
    with pytest.raises(ScheduleError, match=r"broken: device 1 .*B\(stage 1, mb 0\).*F\(stage 1, mb 0\)"):
        Pipeline([factory(i) for i in range(9)], loss_fn, schedule=bad, local_devices=2, show_partition=False,
                 optimizer=lambda ps: built.append("optimizer"))
    assert built == []  # refused before any layer was built
    with pytest.raises(ScheduleError, match="written for 2 devices, but this pipeline has 3"):
        Pipeline(make_layers(), loss_fn, schedule=good, local_devices=3, show_partition=False)
    with pytest.raises(ScheduleError, match="runs 2 micro-batches, not microbatches=4"):
        Pipeline(make_layers(), loss_fn, schedule=good, microbatches=4, local_devices=2, show_partition=False)


def test_schedule_options_are_checked_against_the_generator():
    assert build("pipedream", 2, 2, batches=2, vertical_sync=True).asynchronous
    with pytest.raises(ScheduleError, match=r"schedule '1f1b' takes no option 'vertical_sync' \(its options: none\)"):
        build("1f1b", 2, 2, vertical_sync=True)
    with pytest.raises(ScheduleError, match="takes no option 'batchez'.*batches"):
        build("2bw", 2, 2, batchez=3)


def _imports(path: Path, everywhere: bool = False) -> set[str]:
    """The stagewise modules a file imports at module level, or `everywhere` (in functions and TYPE_CHECKING
    blocks too)."""
    tree = ast.parse(path.read_text())
    found = set()
    for node in ast.walk(tree) if everywhere else tree.body:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("stagewise"):
            # `from package import submodule` imports the submodule
            subs = {f"{node.module}.{a.name}" for a in node.names
                    if (ROOT.parent / f"{node.module}.{a.name}".replace(".", "/")).with_suffix(".py").exists()}
            found |= subs if len(subs) == len(node.names) else {node.module}
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("stagewise"))
    return found


def _module(path: Path) -> str:
    rel = path.relative_to(ROOT.parent).with_suffix("")
    parts = list(rel.parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def test_runtime_does_not_import_partition_and_there_is_no_import_cycle():
    """No file imports, anywhere in it (lazily or for type checking too), a file that imports it back; the package's
    face (stagewise/__init__.py, which hands on names lazily) is left out."""
    files = {_module(p): p for p in ROOT.rglob("*.py")}
    for name, path in files.items():
        if name.startswith("stagewise.runtime"):
            assert not any(m.startswith("stagewise.partition") for m in _imports(path, everywhere=True)), name
    graph = {name: {m for m in _imports(path, everywhere=True) if m in files and m != "stagewise"}
             for name, path in files.items() if name != "stagewise"}
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        state[n] = 1
        for m in sorted(graph[n]):
            if state.get(m) == 1:
                cycle = path[path.index(m):] + [m] if m in path else [n, m]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            elif m not in state:
                visit(m, path + [m])
        state[n] = 2

    sys.setrecursionlimit(10000)
    for n in sorted(graph):
        if n not in state:
            visit(n, [n])


def test_planning_is_torch_free_and_measurement_sits_above_the_runtime():
    """The planning package (stagewise.partition: solvers, methods, search, the cost and memory models, the planner)
    imports nothing but itself and the schedules, anywhere in its files, and never torch: what measures with torch
    is stagewise.measure, which the runtime never imports."""
    for path in sorted((ROOT / "partition").glob("*.py")):
        tree = ast.parse(path.read_text())
        roots = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert "torch" not in roots, path.name
        for m in _imports(path, everywhere=True):
            assert m.startswith(("stagewise.partition", "stagewise.schedules")), (path.name, m)
    for path in (ROOT / "runtime").rglob("*.py"):
        assert not any(m.startswith("stagewise.measure") for m in _imports(path, everywhere=True)), path


def test_pipeline_has_no_branch_on_threads_or_processes():
    text = (ROOT / "pipeline.py").read_text()
    assert len(text.splitlines()) < 250
    for word in ("LocalWorld", "DistWorld", "self.local", "torch.distributed", "dist.", "threading"):
        assert word not in text, word


def test_a_rank_thread_stuck_in_its_own_computation_does_not_hang_the_step():
    import threading
    import time

    release = threading.Event()

    class Stuck(torch.nn.Module):
        calls = 0

        def forward(self, x):
            Stuck.calls += 1
            if Stuck.calls == 3:
                release.wait(120)
            return x

    torch.set_default_dtype(torch.float64)
    layers = make_layers(blocks=3)
    layers.insert(3, Stuck())
    pipe = Pipeline(layers, loss_fn, schedule="1f1b", microbatches=4, partition=[3, 3], timeout=2, local_devices=2,
                    show_partition=False)
    start = time.monotonic()
    try:
        with pytest.raises(Exception, match=r"timed out at .*; rank 1 did not stop \(stuck in its own computation\)"):
            pipe.train_step(make_batch(8, 5))
        assert time.monotonic() - start < 15
        with pytest.raises(Exception, match="stopped after an earlier failure"):
            pipe.train_step(make_batch(8, 5))
    finally:
        release.set()
