"""`stagewise train` as a real training run: a held-out split and its loss, AdamW's decay groups and a learning-rate
schedule that resumes bit for bit, a config file, TensorBoard and W&B logs, the resume summary over every attempt."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import torch
from crashes import crash_after

from stagewise.cli import build_parser
from stagewise.cli_config import read_config, to_toml
from stagewise.data import split_texts
from stagewise.optim import LRSchedule, adamw, load_scheduler_state, scheduler_state, schedulers, step_schedulers

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--stages", "1", "--schedule", "1f1b", "--microbatches", "2", "--partition", "uniform", "--batch-size", "4",
        "--seq-len", "32", "--vocab-size", "1024", "--trace-step", "2", "--log-every", "1"]


def train(*args: str, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    full = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "stagewise.cli", "train", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=full)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_held_out_split_is_whole_documents_or_a_tail_and_never_trained_on():
    docs = [f"document {i}\n" * (10 + i) for i in range(50)]
    trained, held = split_texts(docs, 0.1)
    assert held and trained and sorted(trained + held) == sorted(docs) and not set(trained) & set(held)
    assert 0.1 <= sum(map(len, held)) / sum(map(len, docs)) < 0.2
    assert split_texts(docs, 0.1) == (trained, held)  # the same every time
    assert trained == [d for d in docs if d in trained]  # training order kept
    one = "".join(f"line {i}\n" for i in range(100))
    head, tail = split_texts([one], 0.2)
    assert head[0] + tail[0] == one and head[0].endswith("\n") and 0.15 < len(tail[0]) / len(one) < 0.25
    assert split_texts(docs, 0.0) == (docs, [])
    with pytest.raises(ValueError, match="fraction"):
        split_texts(docs, 1.0)


def test_weight_decay_spares_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    opt = adamw(1e-3, 0.1)(list(model.parameters()))
    decayed, spared = opt.param_groups
    assert decayed["weight_decay"] == 0.1 and spared["weight_decay"] == 0.0
    assert {id(p) for p in decayed["params"]} == {id(model[0].weight), id(model[1].weight)}
    assert len(spared["params"]) == 3  # the linear bias, the norm's weight and bias
    assert len(adamw(1e-3, 0.1)([model[2].weight]).param_groups) == 1  # no empty group


def test_lr_schedules_warm_up_and_decay_to_min_lr():
    cos = LRSchedule("cosine", total=10, warmup=3, min_ratio=0.1)
    assert [cos(i) for i in range(3)] == [1 / 3, 2 / 3, 1.0] and cos(3) == 1.0 and cos(9) == pytest.approx(0.1)
    assert cos(6) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6))) and cos(50) == pytest.approx(0.1)
    lin = LRSchedule("linear", total=5, warmup=0, min_ratio=0.0)
    assert [lin(i) for i in range(5)] == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert LRSchedule("constant", total=5, warmup=2)(4) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        LRSchedule("step", total=5)


def test_scheduler_state_resumes_the_same_rates():
    def run(steps: int, state=None):
        opt = adamw(1e-3, 0.1)([torch.nn.Parameter(torch.ones(2, 2)), torch.nn.Parameter(torch.ones(2))])
        scheds = schedulers([opt], LRSchedule("cosine", 12, 4, 0.1))
        if state is not None:
            load_scheduler_state(scheds, json.loads(json.dumps(state)), 1e-3)  # as a checkpoint's manifest holds it
        rates = []
        for _ in range(steps):
            rates.append([g["lr"] for g in opt.param_groups])
            opt.step()
            step_schedulers(scheds)
        return rates, scheduler_state(scheds)

    whole, _ = run(12)
    first, state = run(5)
    rest, _ = run(7, state)
    assert first + rest == whole  # bit for bit


def test_config_file_is_checked_and_the_command_line_overrides_it(tmp_path, capsys):
    parser = build_parser()
    cfg = tmp_path / "run.toml"
    cfg.write_text('stages = 2\nseq-len = 48\nlr_schedule = "cosine"\npartition = [3, 3]\nplan = false\n'
                   'microbatches = "auto"\nweight_decay = 0.1\n')
    args = parser.parse_args(["train", "--config", str(cfg), "--seq-len", "64", "--out", str(tmp_path / "r")])
    args.check(args)
    assert (args.stages, args.seq_len, args.lr_schedule, args.partition, args.microbatches) == \
        (2, 64, "cosine", [3, 3], "auto")
    for text, message in (('stagez = 2\nfoo = 1\n', "unknown keys foo, stagez"),
                          ('steps = 0\n', "steps = 0: must be >= 1, got 0"),
                          ('lr_schedule = "step"\n', "lr_schedule = 'step': choose from constant, cosine, linear"),
                          ('plan = "yes"\n', "plan = 'yes': expected true or false"),
                          ('steps = [1\n', "is not valid TOML")):
        cfg.write_text(text)
        args = parser.parse_args(["train", "--config", str(cfg)])
        with pytest.raises(SystemExit) as exit_:
            args.check(args)
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    values = {"stages": 4, "lr": 3e-4, "min_lr": None, "partition": [4, 3, 3, 4], "plan": True, "out": 'a "b"\\c',
              "resume": "x", "timeout": 1e-05}
    text = to_toml(values, "header")
    assert tomllib.loads(text) == {k: v for k, v in values.items() if v is not None and k != "resume"}
    (tmp_path / "c.toml").write_text(text)
    assert read_config(str(tmp_path / "c.toml"))["partition"] == [4, 3, 3, 4]


def test_config_errors_from_the_command_line(tmp_path):
    cfg = tmp_path / "run.toml"
    cfg.write_text("sequence_length = 64\n")
    out = train("--config", str(cfg), timeout=60)
    assert out.returncode == 2 and "unknown key sequence_length" in out.stderr and "seq_len" in out.stderr
    out = train("--wandb", "proj", "--out", str(tmp_path / "w"), timeout=60, env={"PYTHONPATH": str(ROOT)})
    assert out.returncode == 2 and "--wandb needs the Weights & Biases client" in out.stderr
    assert not (tmp_path / "w").exists()


def _fake_wandb(folder: Path) -> Path:
    """A stand-in `wandb` package that records its calls (the real client is never required)."""
    pkg = folder / "wandb"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(
        "import json, os\n"
        "def _rec(*a):\n"
        "    with open(os.environ['FAKE_WANDB_LOG'], 'a') as f: f.write(json.dumps(a, default=str) + '\\n')\n"
        "def init(**kw): _rec('init', kw['project'])\n"
        "def log(values, step=None): _rec('log', step, sorted(values))\n"
        "def finish(): _rec('finish')\n"
        "class Image:\n"
        "    def __init__(self, path): self.path = path\n")
    return folder


@pytest.mark.slow
def test_resumed_run_equals_the_uninterrupted_one_with_validation_and_logs(tmp_path):
    """One run of 6 steps (warm-up, cosine, weight decay, validation every 3 steps, TensorBoard, a stand-in W&B) against
    the same run killed after step 3 and resumed from its step-2 checkpoint: every loss, learning rate and validation
    loss is equal bit for bit, and the summary's mean of the last steps counts both attempts. Then the run's own
    config.toml repeats it."""
    pytest.importorskip("tensorboard")
    common = [*TINY, "--steps", "6", "--lr-schedule", "cosine", "--warmup-steps", "2", "--min-lr", "1e-4",
              "--weight-decay", "0.1", "--eval-every", "3", "--val-batches", "2", "--save-every", "2"]
    whole, cut, again = tmp_path / "whole", tmp_path / "cut", tmp_path / "again"
    fake = _fake_wandb(tmp_path / "site")
    env = {"PYTHONPATH": f"{ROOT}{os.pathsep}{fake}", "FAKE_WANDB_LOG": str(tmp_path / "wandb.jsonl")}
    out = train(*common, "--tensorboard", "--wandb", "proj", "--out", str(whole), env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "step 3 loss" in out.stdout and "  val " in out.stdout and "(ppl " in out.stdout and "eta " in out.stdout
    full = metrics(whole)
    assert [m["step"] for m in full] == [1, 2, 3, 4, 5, 6]
    assert [("val_loss" in m) for m in full] == [False, False, True, False, False, True]
    assert [m["lr"] for m in full][:3] == [5e-4, 1e-3, 1e-3] and full[-1]["lr"] == pytest.approx(1e-4)
    assert all(m["bubble"] >= 0 and m["peak_memory_mib"]["0"] > 0 and m["activation_mib"]["0"] > 0 for m in full)
    summary = json.loads((whole / "summary.json").read_text())
    assert summary["val_loss"] == full[-1]["val_loss"] and summary["val_perplexity"] == pytest.approx(
        math.exp(full[-1]["val_loss"]))
    assert f"validation loss {full[-1]['val_loss']:.3f}" in out.stdout
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(whole / "tensorboard"))
    events.Reload()
    tags = events.Tags()
    assert {"train/loss", "val/loss", "train/lr", "train/grad_norm", "perf/tokens_per_s", "perf/bubble",
            "memory/peak_MiB/stage0", "memory/activations_MiB/stage0"} <= set(tags["scalars"])
    assert tags["images"] == ["timeline"]
    assert [e.value for e in events.Scalars("val/loss")] == pytest.approx([m["val_loss"] for m in full if
                                                                           "val_loss" in m])
    calls = [json.loads(line) for line in (tmp_path / "wandb.jsonl").read_text().splitlines()]
    assert calls[0] == ["init", "proj"] and calls[-1] == ["finish"]
    assert any(c[0] == "log" and c[1] == 3 and "val/loss" in c[2] for c in calls)
    assert any(c[0] == "log" and c[2] == ["timeline"] for c in calls)

    killed = train(*common, "--out", str(cut), env=crash_after("0:3"))
    assert killed.returncode != 0 and "step 3 loss" in killed.stdout
    out = train("--resume", str(cut))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "resuming from" in out.stdout and "step 3 is lost and run again" in out.stdout
    assert "step 2 loss" not in out.stdout and "3 steps to go, eta" in out.stdout  # counted from the resumed step
    resumed = metrics(cut)
    for key in ("step", "loss", "lr", "val_loss"):
        assert [m.get(key) for m in resumed] == [m.get(key) for m in full], key
    again_summary = json.loads((cut / "summary.json").read_text())
    assert again_summary["last_loss_mean10"] == summary["last_loss_mean10"]  # every attempt's steps, not 3-6 only
    assert again_summary["resumed_from_step"] == 2 and again_summary["steps_this_attempt"] == 4

    saved = tomllib.loads((whole / "config.toml").read_text())
    assert saved["lr_schedule"] == "cosine" and saved["warmup_steps"] == 2 and "resume" not in saved
    out = train("--config", str(whole / "config.toml"), "--out", str(again), "--no-tensorboard", env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert [m["loss"] for m in metrics(again)] == [m["loss"] for m in full]  # the same run, repeated


def test_a_resumed_run_keeps_its_held_out_split(tmp_path, capsys):
    """The tokenizer is trained without the held-out split, so a resumed run keeps the run's split: a run from before
    splits (no val_fraction in its config.json) holds nothing out, and another --val-fraction is refused."""
    from stagewise.cli import _train_config

    run = tmp_path / "old"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"stages": 1, "steps": 5, "out": str(run)}))
    parser = build_parser()
    args = parser.parse_args(["train", "--resume", str(run)])
    assert _train_config(args).val_fraction == 0.0
    args = parser.parse_args(["train", "--resume", str(run), "--val-fraction", "0.05"])
    with pytest.raises(SystemExit):
        args.check(args)
    assert "a resumed run keeps that split" in capsys.readouterr().err
