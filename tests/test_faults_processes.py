"""The fault campaign, part two: the command line, processes (`stagewise.spawn`) and the launchers (see
tests/test_faults.py for the suite's contract and its reduced and full forms)."""


from __future__ import annotations

import math
import os
import re
import subprocess
import sys
import time

import pytest
from fault_checks import ROOT, full, nothing_left_behind, within  # noqa: F401 (nothing_left_behind: an autouse fixture)
from fault_workers import (
    checkpoint_to,
    early_exit,
    fault,
    leave,
    mismatch,
    nonfinite,
)

from stagewise import spawn

pytestmark = pytest.mark.faults


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
    (["--schedule", "zbv", "--virtual-stages", "3"], r"argument --virtual-stages: zbv: .*virtual_stages must be 2"),
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


@pytest.mark.parametrize("command", ["plan", "check", "partition"])
def test_an_unknown_model_is_refused_naming_the_choices(capsys, command):
    code, _, err = _cli(capsys, command, "--model", "nonsense")
    assert code == 2 and re.search(rf"stagewise {command}: error: argument --model: invalid choice: 'nonsense' "
                                   r"\(choose from 'gpt2-tiny', 'gpt2-mini', 'gpt2'", err), err
    assert "Traceback" not in err


def test_check_on_the_command_line_says_the_model_is_random(capsys):
    code, out, _ = _cli(capsys, "check", "--layers", "fault_workers:random_layers", "--loss", "fault_workers:mse",
                        "--sample", "fault_workers:batch")
    assert code == 1 and "FAILED" in out and "the model is not deterministic" in out, out


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
    """The batches differ in one bit of one element (not one of 16 evenly spaced samples: every byte counts)."""
    errors = _spawn_fails(mismatch, 2, ("data",), 60)
    _both(errors, r"the ranks disagree before the step: rank 1 disagrees with rank 0 on inputs checksum \(rank 0: "
                  r"[0-9a-f]{16}; rank 1: [0-9a-f]{16}\).*a checksum of every byte of every tensor")
    assert "labels checksum" not in errors[0]  # only what differs


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


@pytest.mark.parametrize("how", ["return", pytest.param("kill", marks=full)])
def test_a_rank_that_leaves_during_a_collective_is_named(how):
    errors = _spawn_fails(leave, 2, (how,), 60)
    assert (list(errors) == [0]) if how == "return" else ("exited with code -9" in errors[1])
    # not gloo's "Connection closed by peer ... GLHF!" alone: who stopped answering, where, and what to do
    assert re.search(r"PeerError: rank 0 \(stage 0\): rank 1 \(stage 1\) stopped answering during an all_reduce "
                     r"\(ranks \[0, 1\]\)\. A rank that stops answering crashed, was killed, or returned from the "
                     r"script without making this call: every rank must call the same Pipeline methods .* in the same "
                     r"order; see its own output for why it stopped \(RuntimeError: .*(Connection|connection)",
                     errors[0]), errors[0][-3000:]


@full
def test_a_stuck_rank_process_is_ended_by_its_watchdog():
    errors = _spawn_fails(fault, 2, ("hang", 4.0), 45)
    assert "timed out at B(stage 0, mb 2)" in errors[0] and "exited with code 1" in errors[1]


@full
def test_save_checkpoint_under_processes_names_rank_and_folder(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    errors = _spawn_fails(checkpoint_to, 2, (str(blocker / "ckpt"),), 60)
    _both(errors, rf"{re.escape(str(blocker))}/ckpt was not written: rank 0 cannot create the checkpoint folder "
                  rf"{re.escape(str(blocker))}/\.ckpt")
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
