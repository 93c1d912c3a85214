"""The fault campaign as a suite: faults and bad inputs against the API, the CLI and the launchers.

Every case asserts that every process and thread ends within a bound, that the message names what it
should (the stage, micro-batch, action, option, rank or file), that no process is left behind (every
process a case starts carries a tag in its environment; /proc is searched for it afterwards) and that
nothing is written half (no run folder for a refused command, no temporary or partial checkpoint).

`pytest -q` (CI, `make test`) runs a reduced form: the in-process cases (threads, the CLI's parser) and four
that start processes (ranks given different data, a NaN across ranks, a rank killed under `stagewise run`, a
refused `stagewise train`), about 40 s on 2 busy cores. `STAGEWISE_FAULTS=full pytest -q -m faults` runs all
of it (a few minutes: every multi-process case starts 2 or 3 Python processes).
"""

from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import threading
import time
import uuid
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fault_workers import (
    Counted,
    InfLoss,
    UseMask,
    WithMask,
    batch,
    checkpoint_to,
    early_exit,
    fault,
    layers,
    mismatch,
    mse,
    nonfinite,
)

from stagewise import Pipeline, PipelineError, spawn

pytestmark = pytest.mark.faults
ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("STAGEWISE_FAULTS", "").lower() == "full"
full = pytest.mark.skipif(not FULL, reason="in the full fault campaign only: STAGEWISE_FAULTS=full")
TAG = "STAGEWISE_FAULT_TAG"


# ---- what every case checks ----------------------------------------------------------------------------

def _tagged(tag: str) -> list[str]:
    """Running processes (not zombies) started by this case: their environment holds the case's tag."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"{TAG}={tag}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and "resource_tracker" not in cmd:
            found.append(f"{d.name}: {cmd[:200]}")
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Tag the processes a case starts; afterwards none may still run, nor any rank thread but the stuck one."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    before = set(threading.enumerate())
    yield tag
    deadline = time.monotonic() + 10  # processes told to stop may take a moment to go
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _tagged(tag), f"processes left behind: {_tagged(tag)}"
    left = [t.name for t in set(threading.enumerate()) - before
            if t.is_alive() and t.name.startswith("stagewise-rank") and not getattr(t, "stuck_on_purpose", False)]
    assert not left, f"rank threads left behind: {left}"


@contextmanager
def within(seconds: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert took < seconds, f"took {took:.1f} s, the bound is {seconds} s"


def pipe(fault_layer: torch.nn.Module | None = None, partition: list[int] | None = None, devices: int = 2,
         **kw) -> Pipeline:
    kw.setdefault("microbatches", 4)
    kw.setdefault("timeout", 5)
    at = kw.pop("at", 3)
    default = [4, 3] if fault_layer is not None else [3, 3]  # a fault is the last layer of stage 0
    return Pipeline(layers(fault_layer, at), kw.pop("loss_fn", mse), partition=partition or default,
                    local_devices=devices, show_partition=False, **kw)


def raises(pattern: str, fn, *args, bound: float = 15, kind: type[BaseException] = Exception, **kw) -> str:
    with within(bound), pytest.raises(kind) as info:
        fn(*args, **kw)
    text = str(info.value)
    assert re.search(pattern, text), f"{pattern!r} not in: {text}"
    return text


# ---- non-finite values (threads) -------------------------------------------------------------------------

def test_nan_in_a_middle_stage_names_the_stage_and_microbatch():
    p = pipe(Counted(2, "nan"), partition=[3, 2, 2], devices=3)
    raises(r"first appeared in stage 1's output for micro-batch 2 \(rank 1, F\(stage 1, mb 2\)\).*not taken on "
           r"any rank.*on_nonfinite='skip'", p.train_step, batch(8), kind=PipelineError)
    raises("stopped after an earlier failure", p.train_step, batch(8))


def test_inf_in_the_first_stage_names_stage_0():
    p = pipe(Counted(1, "inf"), partition=[6, 1], at=5)  # an inf that no tanh absorbs: the loss is inf
    raises(r"stage 0's output for micro-batch 1", p.train_step, batch(8), kind=PipelineError)


def test_an_inf_loss_names_the_loss_and_its_microbatch():
    p = pipe(partition=[3, 3], loss_fn=InfLoss(3))
    raises(r"the loss of micro-batch 3 \(last stage 1, rank 1\).*check loss_fn", p.train_step, batch(8))


def test_a_nan_gradient_names_the_backward_stage_and_microbatch():
    p = pipe(Counted(1, "nan-grad"), partition=[3, 2, 2], devices=3)
    raises(r"backward of stage 1 \(rank 1\): the gradient of its input for micro-batch 1", p.train_step, batch(8))


def test_a_nan_parameter_gradient_names_the_stage():
    p = pipe(Counted(0, "nan-weight-grad"), partition=[3, 2, 2], devices=3)
    raises(r"backward of stage 1 \(rank 1\): its parameter gradients", p.train_step, batch(8))


def test_skip_policy_skips_the_step_everywhere_and_trains_on():
    p = pipe(Counted(2, "nan"), on_nonfinite="skip", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    before = [w.detach().clone() for w in p.parameters()]
    warned = r"step skipped on every rank: .*stage 0's output for micro-batch 2"
    with within(15), pytest.warns(UserWarning, match=warned):
        loss = p.train_step(batch(8))
    assert not torch.isfinite(loss) and "stage 0's output" in p.last_step["skipped"]
    assert all(torch.equal(a, w.detach()) for a, w in zip(before, p.parameters()))  # no weight moved anywhere
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.isfinite(p.train_step(batch(8)))  # the fault was once: training goes on
    assert "skipped" not in p.last_step and not all(torch.equal(a, w.detach()) for a, w in zip(before, p.parameters()))


def test_skip_policy_with_data_parallel_replicas_keeps_them_equal():
    p = pipe(Counted(1, "nan"), on_nonfinite="skip", data_parallel=2, optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1),
             microbatches=2)
    with within(15), pytest.warns(UserWarning, match="step skipped"):
        p.train_step(batch(8))
    replicas = [[w for st in p.model.of_rank(r).values() for w in st.parameters()] for r in (0, 1)]
    assert all(torch.equal(a, b) for a, b in zip(*replicas))


def test_raise_policy_wins_over_clipping_skip():
    p = pipe(Counted(2, "nan"), max_grad_norm=1.0)
    raises(r"stage 0's output for micro-batch 2", p.train_step, batch(8))


def test_nan_in_an_accumulating_call_is_named_at_the_step():
    p = pipe(Counted(5, "nan"))  # call 5: micro-batch 1 of the second call
    p.train_step(batch(8), step=False)
    p.train_step(batch(8), step=False)
    raises(r"stage 0's output for micro-batch 1", p.train_step, batch(8))


def test_nan_under_an_asynchronous_schedule_raises():
    p = pipe(Counted(2, "nan"), schedule="pipedream", optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    # each rank decides alone here: the first to stop names what it saw (its own stage's output, or the loss)
    raises(r"non-finite .*(stage 0's output for micro-batch 2|the loss of micro-batch 2)", p.train,
           iter([batch(8)] * 2), 2)


def test_eval_returns_a_nan_loss_without_stopping():
    p = pipe(Counted(1, "nan"))
    with within(15):
        assert not torch.isfinite(p.eval_step(batch(8))["loss"])
    assert torch.isfinite(p.train_step(batch(8)))  # nothing was kept from the evaluation


def test_an_inf_mask_without_gradient_is_not_a_fault():
    layers_ = [torch.nn.Linear(4, 4), WithMask(), UseMask(), torch.nn.Linear(4, 1)]
    p = Pipeline(layers_, mse, partition=[2, 2], local_devices=2, microbatches=2, show_partition=False, timeout=5)
    with within(15):
        assert torch.isfinite(p.train_step(batch(8)))


# ---- options refused at construction ---------------------------------------------------------------------

def _factories(built: list) -> list:
    def make(i: int):
        def build():
            built.append(i)
            return torch.nn.Linear(4, 4) if i < 2 else torch.nn.Linear(4, 1)
        return build
    return [make(i) for i in range(3)]


@pytest.mark.parametrize("option,pattern", [
    ({"timeout": 0}, r"timeout must be a positive, finite number of seconds.*got 0"),
    ({"timeout": -1}, r"timeout must be .*got -1"),
    ({"timeout": float("nan")}, r"timeout must be .*got nan"),
    ({"timeout": float("inf")}, r"timeout must be .*got inf"),
    ({"timeout": "30"}, r"timeout must be .*got '30'"),
    ({"on_nonfinite": "ignore"}, r"on_nonfinite must be one of 'raise', 'skip', got 'ignore'"),
    ({"schedule": "fast"}, r"unknown schedule 'fast'"),
    ({"microbatches": 0}, r"micro-batches must be an integer >= 1, got 0"),
    ({"partition": [2, 2]}, r"covers 4 layers but the model has 3"),
])
def test_a_bad_option_is_refused_before_anything_runs(option, pattern):
    built: list = []
    raises(pattern, Pipeline, _factories(built), mse, local_devices=2, show_partition=False, bound=5,
           **{"timeout": 5, **option})
    assert built == [] or "partition" in option  # refused before any layer was built (a balance needs the count)


def test_partition_by_time_with_a_sample_that_does_not_fit_names_the_layer():
    bad = layers()
    bad[2] = torch.nn.Linear(5, 8)  # expects 5 features, gets 8
    raises(r"layer 2 \(Linear\) failed on its input \[2, 8\]:float32: RuntimeError: .*Give a sample shaped like",
           Pipeline, bad, mse, partition="time", sample=batch(8), local_devices=2, show_partition=False,
           kind=ValueError)


# ---- bad batches and bad stages (threads) ----------------------------------------------------------------

@pytest.mark.parametrize("given,pattern", [
    (lambda: (batch(8)[0], batch(8)[1][:4]), r"inputs hold 8 samples but its labels 4"),
    (lambda: batch(3), r"batch of 3 samples cannot be split into 4 micro-batches"),
    (lambda: batch(8)[0], r"a batch is \(inputs, labels\); got Tensor"),
    (lambda: ((torch.randn(8, 4), torch.randn(7, 4)), batch(8)[1]), r"disagree on dim 0 \(sizes \[7, 8\]\)"),
])
def test_a_bad_batch_is_refused_with_what_is_wrong(given, pattern):
    p = pipe()
    raises(pattern, p.train_step, given())
    assert torch.isfinite(p.train_step(batch(8)))  # refused before the step: the pipeline is still usable


@pytest.mark.parametrize("partition,devices,schedule,stage", [([4, 3], 2, "1f1b", 0), ([2, 2, 2, 1], 2, "zbv", 1)])
def test_a_stage_returning_none_is_named_not_the_next_one(partition, devices, schedule, stage):
    p = pipe(Counted(0, "none"), partition=partition, devices=devices, schedule=schedule)
    raises(rf"stage {stage} \(rank {stage}\) returned None at F\(stage {stage}, mb 0.*its last layer, layer 3 "
           rf"\(Counted\), returned None.*missing `return`", p.train_step, batch(8))


@pytest.mark.parametrize("mode,pattern", [
    ("raise", r"stage 1 \(rank 1\) failed at F\(stage 1, mb 2\): RuntimeError: boom in micro-batch 2"),
    ("raise-backward", r"stage 1 \(rank 1\) failed at B\(stage 1, mb 2\): RuntimeError: boom in the backward"),
    ("shape", r"stage 1 returned .*\[2, 7\].* for micro-batch 2 but .*\[2, 8\].* for micro-batch 0"),
])
def test_a_failing_stage_thread_names_stage_microbatch_and_action(mode, pattern):
    p = pipe(Counted(2, mode), partition=[3, 2, 2], devices=3)
    raises(pattern, p.train_step, batch(8), kind=PipelineError)
    raises("stopped after an earlier failure", p.train_step, batch(8), bound=2)


def test_a_failing_loss_fn_names_the_last_stage():
    def loss_fn(out, labels):
        raise KeyError("labels has no field 'y'")

    raises(r"stage 1 \(rank 1\) failed at F\(stage 1, mb 0\): KeyError", pipe(loss_fn=loss_fn).train_step, batch(8))
    raises(r"loss_fn must return a scalar tensor, got Tensor\[2, 1\]",
           pipe(loss_fn=lambda o, y: (o - y) ** 2).train_step, batch(8))


def test_a_rank_thread_stuck_in_its_own_computation_ends_the_step():
    release = threading.Event()

    class Stuck(torch.nn.Module):
        def forward(self, x):
            if torch.is_grad_enabled() and x.shape[0] == 2 and not release.is_set():
                threading.current_thread().stuck_on_purpose = True
                release.wait(120)
            return x

    p = pipe(Stuck(), partition=[3, 4], timeout=2)
    try:
        raises(r"timed out at .*; rank 1 did not stop \(stuck in its own computation\)", p.train_step, batch(8),
               bound=15)
        raises("stopped after an earlier failure", p.train_step, batch(8), bound=2)
    finally:
        release.set()


def test_save_checkpoint_to_a_folder_no_rank_can_write_names_rank_and_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    p = pipe()
    p.train_step(batch(8))
    raises(rf"checkpoint {re.escape(str(blocker))}/ckpt was not written: rank [01] cannot create the checkpoint "
           rf"folder {re.escape(str(blocker))}/\.ckpt\.partial: \[Errno 20\] Not a directory", p.save_checkpoint,
           blocker / "ckpt")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a-file"]  # nothing written anywhere


# ---- the command line (parsed in this process; one case as a real process) ------------------------------

def _cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of `stagewise ARGV` run in this process (only for commands that end early)."""
    from stagewise.cli import main

    with within(10):
        try:
            code = main(list(argv))
        except SystemExit as err:
            code = err.code if isinstance(err.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv,pattern", [
    (["--microbatches", "0"], r"argument --microbatches: must be >= 1, got 0"),
    (["--schedule", "nope"], r"argument --schedule: unknown schedule 'nope'; choose one of naive, gpipe, 1f1b"),
    (["--stages", "0"], r"argument --stages: must be >= 1, got 0"),
    (["--steps", "0"], r"argument --steps: must be >= 1, got 0"),
    (["--steps", "-1"], r"argument --steps: must be >= 1, got -1"),
    (["--partition", "3,x"], r"argument --partition: unknown partition '3,x'; use uniform, parameters"),
    (["--partition", "3,0,3"], r"argument --partition: every stage needs at least one layer"),
    (["--partition", "type:("], r"argument --partition: 'type:\(': the regular expression does not compile"),
    (["--model", "nope"], r"argument --model: invalid choice: 'nope' \(choose from 'gpt2-tiny'"),
    (["--partition", "3,3"], r"argument --partition: 3,3 gives 2 stages and 6 layers, but gpt2-tiny has 6 layers"),
    (["--microbatches", "8", "--batch-size", "4"],
     r"argument --batch-size: a batch of 4 samples cannot be split into 8 micro-batches"),
    (["--microbatches", "8", "--dp", "2", "--batch-size", "12"],
     r"argument --batch-size: a batch of 12 samples cannot be split into 2 data-parallel replicas x 8 micro-batches"),
    (["--dp", "2", "--batch-size", "1"], r"argument --batch-size: a batch of 1 samples cannot feed 2 data-parallel"),
    (["--schedule", "zbv", "--chunks", "3"], r"argument --chunks: zbv: .*chunks must be 2"),
    (["--schedule", "pipedream", "--dp", "2"], r"argument --schedule: .*takes an optimizer step after every"),
    (["--timeout", "0"], r"argument --timeout: must be a finite number > 0, got 0"),
    (["--lr", "-1"], r"argument --lr: must be a finite number > 0, got -1"),
    (["--max-grad-norm", "nan"], r"argument --max-grad-norm: must be a finite number > 0, got nan"),
    (["--data", "/no/such/corpus"], r"argument --data: no such file or folder: '/no/such/corpus'"),
    (["--dataset", "nope"], r"argument --dataset: invalid choice: 'nope' \(choose from 'squad'\)"),
    (["--dp", "0"], r"argument --dp: must be >= 1, got 0"),
    (["--vocab-size", "x"], r"argument --vocab-size: expected an integer >= 1, got 'x'"),
    (["--on-nonfinite", "ignore"], r"argument --on-nonfinite: invalid choice: 'ignore' \(choose from 'raise'"),
])
def test_train_refuses_a_bad_option_before_anything_starts(capsys, tmp_path, argv, pattern):
    out = tmp_path / "run"
    code, _, err = _cli(capsys, "train", *argv, "--out", str(out))
    assert code == 2 and re.search(r"stagewise train: error: " + pattern, err), err
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no run folder, nothing else written


def test_train_refuses_an_unwritable_run_folder(capsys, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    code, _, err = _cli(capsys, "train", "--out", str(blocker / "run"))
    assert code == 2 and f"argument --out: cannot write the folder '{blocker}/run': {blocker} is a file" in err, err


@pytest.mark.parametrize("argv,pattern", [
    (["-n", "0", "x.py"], r"stagewise run: error: argument -n/--nproc: must be >= 1, got 0"),
    ([], r"stagewise run: error: give the script to run"),
    (["-n", "2", "no_such_script.py"], r"argument script: no such file or folder: 'no_such_script.py'"),
    (["--nnodes", "2", "--node-rank", "2", "x.py"], r"argument --node-rank: must be below --nnodes \(2\), got 2"),
    (["--master-port", "70000", "x.py"], r"argument --master-port: a TCP port is 1..65535, got 70000"),
])
def test_run_refuses_a_bad_option(capsys, tmp_path, monkeypatch, argv, pattern):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.py").write_text("raise SystemExit('must not run')\n")
    code, _, err = _cli(capsys, "run", *argv)
    assert code == 2 and re.search(pattern, err), err


def test_train_help_shows_every_default_and_the_choices(capsys):
    code, out, _ = _cli(capsys, "train", "--help")
    text = " ".join(out.split())
    assert code == 0
    for expected in ("--microbatches MICROBATCHES micro-batches per batch, or auto: the planner's choice (default: "
                     "auto)", "or auto: the planner's choice (default: auto)",
                     "one of: naive, gpipe, 1f1b, interleaved", "dualpipev, pipedream, 2bw",
                     "uniform, parameters, type:REGEX, time, memory, auto", "or layer counts per stage such as "
                     "4,3,3,4 (default: auto)",
                     "one of: gpt2-tiny, gpt2-mini, gpt2,", "(default: gpt2-tiny)", "(default: runs/gpt2)",
                     "--steps STEPS the run's total steps (a resumed run stops there too) (default: 300)"):
        assert expected in text, expected


def _stagewise(*args: str, timeout: float = 180) -> tuple[subprocess.CompletedProcess, float]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")])}
    start = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "stagewise.cli", *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=timeout, env=env)
    return out, time.monotonic() - start


def test_train_refusal_as_a_real_command_exits_2_at_once(tmp_path):
    out, took = _stagewise("train", "--microbatches", "0", "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and "stagewise train: error: argument --microbatches: must be >= 1" in out.stderr
    assert took < 20 and not (tmp_path / "run").exists()


# ---- processes (`stagewise.spawn`, a plain launcher) -----------------------------------------------------

def _spawn_fails(fn, nprocs: int, args: tuple, bound: float) -> dict[int, str]:
    with within(bound), pytest.raises(RuntimeError) as info:
        spawn(fn, nprocs, args=args, timeout=120)
    return info.value.rank_errors


def _both(errors: dict[int, str], pattern: str) -> None:
    for r in (0, 1):
        assert re.search(pattern, errors[r]), (r, pattern, errors[r][-3000:])


def test_ranks_given_different_data_are_refused_naming_them():
    errors = _spawn_fails(mismatch, 2, ("data",), 60)
    _both(errors, r"the ranks disagree before the step: rank 1 disagrees with rank 0 on inputs sample \(rank 0: "
                  r"\[-?\d.*; rank 1: \[")
    assert "labels sample" not in errors[0]  # only what differs


@full
@pytest.mark.parametrize("what,pattern", [
    ("shapes", r"rank 1 disagrees with rank 0 on inputs shapes \(rank 0: \[8, 4\]:float32; rank 1: \[9, 4\]:float32\)"),
    ("microbatches", r"on settings \(rank 0: schedule 1f1b, 4 micro-batches.*rank 1: schedule 1f1b, 3 micro-batches"),
    ("call", r"on call \(rank 0: train_step; rank 1: eval_step\)"),
])
def test_ranks_that_disagree_are_refused_naming_what_differs(what, pattern):
    _both(_spawn_fails(mismatch, 2, (what,), 60), pattern)


@pytest.mark.parametrize("policy", ["raise", pytest.param("skip", marks=full)])
def test_nan_under_processes(policy):
    if policy == "raise":
        errors = _spawn_fails(nonfinite, 2, ("raise",), 60)
        _both(errors, r"non-finite .*stage 0's output for micro-batch 2 \(rank 0")
        return
    with within(60):
        results = spawn(nonfinite, 2, args=("skip",), timeout=120)
    for r in results:
        assert r["unchanged"] and "stage 0's output for micro-batch 2" in r["skipped"]
        assert r["next"] == results[0]["next"] and math.isfinite(r["next"])  # the next step ran, alike everywhere


@full
@pytest.mark.parametrize("who,pattern", [
    (1, r"rank 0: the process group of 2 processes did not form within 6 s: only 1 of 2 processes joined; rank 1 "
        r"did not join.*crashed or exited before building the Pipeline"),
    (0, r"rank 1: the process group of 2 processes did not form within 6 s: rank 1 could not reach the group's "
        r"store.*crashed or exited before building the Pipeline"),
])
def test_a_rank_that_exits_before_the_pipeline_is_named(who, pattern):
    errors = _spawn_fails(early_exit, 2, (who,), 60)
    assert "exited with code 0 before reporting" in errors[who]
    assert re.search(pattern, errors[1 - who]), errors[1 - who][-3000:]


@full
@pytest.mark.parametrize("mode,failing,pattern,other", [
    ("raise", 1, r"stage 1 \(rank 1\) failed at F\(stage 1, mb 2\): RuntimeError: boom in micro-batch 2",
     r"rank 0 stopped during the step because rank 1: stage 1 \(rank 1\) failed at F\(stage 1, mb 2\)"),
    ("exit", 1, r"exited with code 7", r"stage 0 \(rank 0\) failed at .*device 1 \(stage 1\) stopped answering"),
    ("none", 0, r"stage 0 \(rank 0\) returned None at F\(stage 0, mb 2\): its last layer, layer 3 \(Counted\)",
     r"rank 1 stopped during the step because rank 0: stage 0 \(rank 0\) returned None"),
])
def test_a_failing_rank_process_ends_every_rank_naming_it(mode, failing, pattern, other):
    errors = _spawn_fails(fault, 2, (mode, 10.0), 45)
    assert re.search(pattern, errors[failing]), errors[failing][-3000:]
    assert re.search(other, errors[1 - failing]), errors[1 - failing][-3000:]


@full
def test_a_stuck_rank_process_is_ended_by_its_watchdog():
    errors = _spawn_fails(fault, 2, ("hang", 4.0), 45)
    assert "timed out at B(stage 0, mb 2)" in errors[0] and "exited with code 1" in errors[1]


@full
def test_save_checkpoint_under_processes_names_rank_and_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    errors = _spawn_fails(checkpoint_to, 2, (str(blocker / "ckpt"),), 60)
    _both(errors, rf"rank [01]:? .*cannot write the checkpoint folder '{re.escape(str(blocker))}/ckpt'")
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a-file"]


# ---- the launchers: `stagewise run` (torchrun) ---------------------------------------------------------------

def _run_script(mode: str, bound: float) -> str:
    out, took = _stagewise("run", "-n", "2", "--threads", "1", str(ROOT / "tests" / "fault_workers.py"), mode)
    assert out.returncode == 1, out.stdout[-2000:] + out.stderr[-3000:]
    assert took < bound, f"took {took:.1f} s"
    return out.stderr


def test_run_names_the_rank_stage_and_action_of_a_killed_rank():
    err = _run_script("kill", 60)
    summary = err[err.index("stagewise: the job failed"):]
    assert re.search(r"rank 1 was killed by SIGKILL \(exit code -9\); last status: stage 1 \(rank 1\): step 2: "
                     r"F\(stage 1, mb 2\)  <- first failure", summary), summary
    assert re.search(r"rank 0 (was ended by the launcher|exited with code).*stage 0 \(rank 0\)", summary), summary


@full
def test_run_names_a_rank_that_exited_before_the_pipeline():
    err = _run_script("early-exit", 60)
    assert re.search(r"rank 1 exited with code 3; last status: none: it never reached the Pipeline", err), err[-3000:]


@full
def test_run_shows_the_failing_rank_s_own_error():
    err = _run_script("raise", 60)
    assert re.search(r"rank 1 (exited with code 1|was ended by the launcher[^;]*); last status: stage 1 \(rank 1\): "
                     r"failed: stage 1 \(rank 1\) failed at F\(stage 1, mb 2\): RuntimeError: boom in micro-batch 6",
                     err), err[-3000:]
