"""The command line as a user runs it: simulate, partition, run, train."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def stagewise(*args: str, timeout: float = 120, env: dict | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stagewise.cli", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


def test_simulate_json_and_list(tmp_path):
    out = stagewise("simulate", "--schedule", "1f1b", "--stages", "4", "--microbatches", "8", "--json",
                    "--png", str(tmp_path / "t.png"), "--trace", str(tmp_path / "t.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["schedule"] == "1f1b" and data["stages"] == 4 and data["devices"] == 4 and data["microbatches"] == 8
    assert data["bubble_fraction"] == pytest.approx(3 / 11)
    assert data["peak_inflight"] == [4, 3, 2, 1] and data["peak_weight_versions"] == [1, 1, 1, 1]
    assert (tmp_path / "t.png").stat().st_size > 1000 and json.loads((tmp_path / "t.json").read_text())["traceEvents"]
    listed = stagewise("simulate", "--list")
    assert listed.returncode == 0 and all(n in listed.stdout for n in ("zbv", "2bw", "interleaved"))
    text = stagewise("simulate", "--schedule", "zbv", "--stages", "2", "--microbatches", "4")
    assert "dev 0" in text.stdout and "bubble" in text.stdout
    bad = stagewise("simulate", "--schedule", "zbv", "--virtual-stages", "3")
    assert bad.returncode == 2 and "virtual_stages must be 2" in bad.stderr
    for old, new in (("--chunks", "--virtual-stages"), ("--activation-checkpointing", "--recompute")):
        renamed = stagewise("simulate", "--schedule", "zbv", old, "2")
        assert renamed.returncode == 2 and f"{old} was renamed {new}" in renamed.stderr


def test_partition_reproduces_the_seed_table():
    out = stagewise("partition", "--model", "gpt2", "--stages", "4", "--method", "type:GPT2Block", "--json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    assert data["balance"] == [4, 3, 3, 4]
    assert [s["params"] for s in data["stages"]] == [60647424, 21263616, 21263616, 59862528]  # the seed's log
    assert data["total_params"] == 124439808  # the tie kept: 124M, not 163M
    bad = stagewise("partition", "--model", "gpt2", "--stages", "4", "--method", "type:Nothing")
    assert bad.returncode == 2 and "Nothing" in bad.stderr


def test_run_launches_a_script_on_two_processes():
    out = stagewise("run", "-n", "2", "--threads", "1", "examples/toy_pipeline.py", "--steps", "6", timeout=180)
    # the ranks' own messages come first, torchrun's summary last: show both ends
    assert out.returncode == 0, out.stdout[-1500:] + "\n---\n" + out.stderr[:4000] + "\n...\n" + out.stderr[-1500:]
    assert "step 0 loss" in out.stdout and "step 5 loss" in out.stdout


def test_train_writes_its_run_folder_and_learns(tmp_path):
    run = tmp_path / "run"
    out = stagewise("train", "--stages", "2", "--steps", "30", "--microbatches", "4", "--batch-size", "8",
                    "--seq-len", "64", "--vocab-size", "1024", "--log-every", "10", "--trace-step", "3",
                    "--out", str(run), timeout=600, env={"STAGEWISE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "stage 0  device 0" in out.stdout and "step 10 loss" in out.stdout and "step 30 loss" in out.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [10, 20, 30]
    assert all(m["tokens_per_s"] > 0 for m in metrics)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["last_loss_mean10"] < summary["first_loss"] - 0.5  # it learns (about 7.0 -> 6.0 here)
    assert (run / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    trace = json.loads((run / "trace.json").read_text())
    assert len({e["pid"] for e in trace["traceEvents"] if e.get("ph") == "X"}) == 2  # measured and simulated
    # no --schedule: the planner chose (m held at 4), printed its table, saved it, and checked its prediction
    plan = json.loads((run / "plan.json").read_text())
    assert "choice:" in out.stdout and plan["choice"]["microbatches"] == 4
    assert summary["schedule"] == plan["choice"]["schedule"] and summary["balance"] == plan["choice"]["balance"]
    saved = summary["prediction"]["saved_bytes"]
    assert all(abs(r - 1) <= 0.05 for r in saved["ratio"]) and "prediction vs measured" in out.stdout
    ckpt = run / "checkpoints" / "step-00000030"
    meta = json.loads((ckpt / "manifest.json").read_text())
    assert sum(meta["balance"]) == 6 and meta["step"] == 30 and meta["extra"]["data"]["next_batch"] == 30
    assert (ckpt / "weights-rank00000.safetensors").exists() and (ckpt / "weights-rank00001.safetensors").exists()


def test_bench_against_torch_on_a_tiny_model(tmp_path):
    """`stagewise bench` end to end on a tiny GPT: both libraries run, losses agree, every output is written."""
    out_file, png = tmp_path / "vs.jsonl", tmp_path / "vs.png"
    out = stagewise("bench", "--stages", "2", "--schedules", "1f1b", "zbv", "--microbatches", "2", "--steps", "1",
                    "--repeats", "2", "--warmup", "1", "--batch", "4", "--seq-len", "8", "--n-layer", "2",
                    "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--timeout", "240",
                    "--out", str(out_file), "--png", str(png), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "first-step losses agree" in out.stdout
    assert "P=2 m=2 auto" in out.stdout and "cores' bound" in out.stdout
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    rounds = [r for r in rows if r.get("kind") == "round" and r["library"] != "single"]
    assert {(r["config"], r["library"]) for r in rounds} >= {("1f1b m=2", "stagewise"), ("1f1b m=2", "torch"),
                                                             ("zbv m=2", "torch"), ("zbv m=2 auto", "stagewise")}
    assert all(len(r["untimed_step_times_s"]) == 1 and len(r["step_times_s"]) == 1 for r in rounds)
    assert png.stat().st_size > 0


def test_bench_the_planners_choice_against_torch_and_two_threads(tmp_path):
    """`stagewise bench --planner --single-threads 2`: the planner's pipeline in every torch configuration's rounds,
    the 2-thread process beside it, the cores' bound printed, and the planner's bars drawn without the even split."""
    out_file, png = tmp_path / "vs.jsonl", tmp_path / "vs.png"
    out = stagewise("bench", "--stages", "2", "--schedules", "1f1b", "--microbatches", "2", "--steps", "1",
                    "--repeats", "2", "--warmup", "1", "--batch", "4", "--seq-len", "8", "--n-layer", "2",
                    "--n-embd", "32", "--n-head", "2", "--vocab", "64", "--timeout", "240", "--planner", "--no-even",
                    "--no-auto", "--single-threads", "2", "--out", str(out_file), "--png", str(png), timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    text = out.stdout
    assert "the planner's choice:" in text and "planner/torch's best within its rounds" in text
    assert "2-thread process tok/s" in text and "cores' bound (min(P, " in text and "goal 1.15x" in text
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    libs = {(r["config"], r["library"]) for r in rows if r.get("kind") == "round"}
    assert {("planner@1f1b m=2", "stagewise"), ("1f1b m=2", "torch"), ("single2@1f1b m=2", "single-threads")} <= libs
    assert png.stat().st_size > 0


def test_train_with_data_parallel_replicas_and_clipping(tmp_path):
    run = tmp_path / "run"
    out = stagewise("train", "--stages", "1", "--dp", "2", "--steps", "6", "--microbatches", "2", "--batch-size", "8",
                    "--seq-len", "32", "--vocab-size", "512", "--log-every", "3", "--trace-step", "2",
                    "--max-grad-norm", "1.0", "--out", str(run), timeout=600,
                    env={"STAGEWISE_CACHE": str(tmp_path / "cache")})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "1 stage(s) x 2 data-parallel replicas" in out.stdout and "grad norm" in out.stdout
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [3, 6] and all(m["grad_norm"] > 0 for m in metrics)
    assert json.loads((run / "summary.json").read_text())["dp"] == 2
