"""Checkpoints: resumed bit for bit, re-shaped to other pipelines, atomic under SIGKILL, damage refused, HF export,
and `stagewise train` restarted by torchrun after a rank is killed."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from checkpoint_workers import batch, kill_during_save, resume_run
from crashes import crash_after
from toy import loss_fn, make_layers, make_tied_layers

import stagewise
from stagewise import Pipeline, spawn
from stagewise.runtime.checkpoint import CheckpointError, checkpoints_in, files

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-10


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def test_resume_in_new_processes_is_bit_for_bit(tmp_path):
    """2 gloo ranks, Adam, dropout on both ranks: 6 steps straight == 3 steps, save, new processes, load, 3 steps."""
    schedules = ["1f1b", "zbv"]
    first = spawn(resume_run, 2, args=("first", str(tmp_path), schedules), timeout=120)
    second = spawn(resume_run, 2, args=("second", str(tmp_path), schedules), timeout=120)
    for name in schedules:
        for rank in (0, 1):
            a, b = first[rank][name], second[rank][name]
            assert a["first"] == a["straight"][:3], name
            assert b["resumed"] == a["straight"][3:], (name, rank, b["resumed"], a["straight"][3:])  # exact
            assert b["step"] == 3 and b["probes"] == a["probes"]  # Python's and numpy's generators came back
            assert b["weights"].keys() == a["straight_weights"].keys()
            for n, w in b["weights"].items():
                assert torch.equal(w, a["straight_weights"][n]), (name, n)
    manifest = json.loads((tmp_path / "1f1b" / "step-00000003" / "manifest.json").read_text())
    assert manifest["P"] == 2 and manifest["D"] == 1 and manifest["schedule"] == "1f1b"
    assert manifest["precision"] == "fp64" and set(manifest["rng"]) == {"0", "1"}
    assert manifest["rng"]["0"]["torch"] != manifest["rng"]["1"]["torch"]  # every rank's own generator


class Scale(torch.nn.Module):
    """A layer with a persistent buffer, so buffers are saved and loaded too."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("factor", torch.ones(()))

    def forward(self, x: dict) -> dict:
        return {**x, "h": x["h"] * self.factor}


def buffered_layers(seed: int = 0, tied: bool = False) -> list[torch.nn.Module]:
    layers = make_tied_layers(seed, blocks=7) if tied else make_layers(seed)
    layers.insert(4, Scale().double())
    return layers


def reference_run(layers: list[torch.nn.Module], steps: int, lr_after: dict[int, float]) -> tuple[list[float], dict]:
    model = torch.nn.Sequential(*layers)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for i in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_after.get(i, g["lr"])
        opt.zero_grad()
        loss = loss_fn(model(batch(i)[0]), batch(i)[1])
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses, dict(model.named_parameters())


@pytest.mark.parametrize("tied", [False, True])
def test_reshape_4_stages_1f1b_to_2_stages_gpipe_zbv_and_one_process(tmp_path, tied):
    """Saved at P=4 under 1f1b: the next 3 losses at P=2 (gpipe, another balance), P=2 zbv (virtual_stages=2, m=3) and
    in one process equal an uninterrupted single-process run (float64, 1e-10); optimizer state and the changed
    learning rate (param_groups) come back, and the buffer."""
    torch.set_default_dtype(torch.float64)
    ref_layers = buffered_layers(tied=tied)
    ref_layers[4].factor.fill_(1.5)
    ref, ref_weights = reference_run(ref_layers, 6, {3: 5e-3})
    adam = lambda ps: torch.optim.Adam(ps, lr=1e-2)  # noqa: E731
    layers = buffered_layers(tied=tied)
    layers[4].factor.fill_(1.5)
    a = Pipeline(layers, loss_fn, schedule="1f1b", microbatches=4, local_devices=4, optimizer=adam,
                 show_partition=False)
    got = [a.train_step(batch(i)).item() for i in range(3)]
    assert max(abs(x - y) / abs(y) for x, y in zip(got, ref[:3])) <= TOL
    for opt in a.optimizers.values():
        opt.param_groups[0]["lr"] = 5e-3
    a.save_checkpoint(tmp_path, step=3)
    manifest = json.loads((tmp_path / "step-00000003" / "manifest.json").read_text())
    assert manifest["balance"] == a.balance and manifest["P"] == 4 and "4.factor" in manifest["tensors"]
    if tied:
        assert manifest["aliases"] == {"9.out.weight": "0.emb.weight"}  # stored once
    targets = {"gpipe P=2 [3,7]": dict(schedule="gpipe", local_devices=2, partition=[3, 7]),
               "zbv P=2 m=3": dict(schedule="zbv", local_devices=2, microbatches=3),
               "one process": dict(schedule="1f1b", local_devices=None)}
    for label, options in targets.items():
        options = {"microbatches": 2, **options}
        b = Pipeline(buffered_layers(seed=9, tied=tied), loss_fn, optimizer=adam, show_partition=False, **options)
        assert b.load_checkpoint(tmp_path)["step"] == 3
        assert all(o.param_groups[0]["lr"] == 5e-3 for o in b.optimizers.values()), label
        losses = [b.train_step(batch(i)).item() for i in range(3, 6)]
        assert max(abs(x - y) / abs(y) for x, y in zip(losses, ref[3:])) <= TOL, (label, losses, ref[3:])
        assert max(rel(p.detach(), ref_weights[n]) for n, p in b.named_parameters()) <= TOL, label
        b.close()
    full = stagewise.load_full(tmp_path)
    ref_state = torch.nn.Sequential(*buffered_layers(tied=tied)).state_dict()
    assert list(full) == list(ref_state)  # every name of the unsplit model, in its order, buffers included
    if tied:
        assert full["9.out.weight"] is full["0.emb.weight"]


def test_sigkill_in_the_middle_of_a_save_leaves_the_previous_checkpoint(tmp_path):
    """Rank 1 is held inside the save of step 3 (after its first file) and SIGKILLed: step 2 stays the newest
    visible checkpoint and loads; the partial one is hidden, and the next save clears it."""
    root, marker = tmp_path / "ckpt", tmp_path / "held"
    failure: list[BaseException] = []

    def run() -> None:
        try:
            spawn(kill_during_save, 2, args=(str(root), str(marker)), timeout=120)
        except BaseException as err:
            failure.append(err)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 90
    while not marker.exists():
        assert time.monotonic() < deadline and t.is_alive(), f"rank 1 never reached the hold: {failure}"
        time.sleep(0.1)
    pid, held_at = marker.read_text().split()
    assert Path(held_at).parent.name == ".step-00000003.partial"
    assert [p.name for _, p in checkpoints_in(root)] == ["step-00000002"]  # nothing of step 3 is visible
    os.kill(int(pid), signal.SIGKILL)
    t.join(60)
    assert failure and "exited with code -9" in str(failure[0]), failure
    assert [p.name for _, p in checkpoints_in(root)] == ["step-00000002"]
    partial = root / ".step-00000003.partial"
    assert partial.exists() and not (partial / "manifest.json").exists()
    torch.set_default_dtype(torch.float64)
    _, ref_weights = reference_run(make_layers(), 2, {})
    pipe = Pipeline(make_layers(seed=3), loss_fn, local_devices=2, microbatches=4, show_partition=False,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    assert pipe.load_checkpoint(root)["step"] == 2
    assert max(rel(p.detach(), ref_weights[n]) for n, p in pipe.named_parameters()) <= TOL
    pipe.save_checkpoint(root, step=3)
    assert [p.name for _, p in checkpoints_in(root)] == ["step-00000003", "step-00000002"]
    assert not (root / ".step-00000003.partial").exists()


def _two_checkpoints(root: Path) -> Pipeline:
    torch.set_default_dtype(torch.float64)
    pipe = Pipeline(make_tied_layers(), loss_fn, local_devices=2, microbatches=2, show_partition=False,
                    optimizer=lambda ps: torch.optim.Adam(ps, lr=1e-2))
    pipe.save_checkpoint(root, step=0)  # before any step: the optimizer has no state yet
    assert pipe.load_checkpoint(root)["step"] == 0
    for i in range(4):
        pipe.train_step(batch(i))
        if i % 2:
            pipe.save_checkpoint(root, step=i + 1)
    return pipe


@pytest.mark.parametrize("damage", ["truncate", "flip", "delete", "manifest", "manifest-edit"])
def test_damaged_checkpoint_is_refused_and_fallback_loads_the_previous(tmp_path, damage, capfd):
    root = tmp_path / "ckpt"
    pipe = _two_checkpoints(root)
    newest = root / "step-00000004"
    name = {"truncate": "weights-rank00001.safetensors", "flip": "optimizer-rank00000.pt",
            "delete": "weights-rank00000.safetensors", "manifest": "manifest.json",
            "manifest-edit": "manifest.json"}[damage]
    path = newest / name
    data = path.read_bytes()
    if damage == "truncate":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flip":
        path.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])
    elif damage == "delete":
        path.unlink()
    elif damage == "manifest":
        path.write_bytes(data[: len(data) // 3])
    else:  # still valid JSON, one recorded shape changed
        path.write_text(path.read_text().replace('"shape": [\n    11,', '"shape": [\n    12,', 1))
        assert path.read_bytes() != data
    expect = {"truncate": "is truncated", "flip": "fails its checksum", "delete": "is missing",
              "manifest": "cannot be read", "manifest-edit": "fails its own checksum"}[damage]
    before = {n: p.detach().clone() for n, p in pipe.named_parameters()}
    with pytest.raises(CheckpointError, match=expect) as info:
        pipe.load_checkpoint(root)
    assert str(path) in str(info.value) and "fallback=True" in str(info.value)
    assert all(torch.equal(p, before[n]) for n, p in pipe.named_parameters())  # nothing was loaded
    with pytest.raises(CheckpointError, match=expect):
        stagewise.load_full(root)
    manifest = pipe.load_checkpoint(root, fallback=True)
    assert manifest["step"] == 2 and manifest["path"] == str(root / "step-00000002")
    assert manifest["skipped"][0][0] == str(newest)
    assert "skipped damaged checkpoint" in capfd.readouterr().err
    assert stagewise.load_full(root, fallback=True).keys() == stagewise.load_full(root / "step-00000002").keys()
    pipe.train_step(batch(0))  # the pipeline is still usable after a refused load


def test_a_save_that_cannot_be_written_names_the_rank_and_folder(tmp_path):
    pipe = _two_checkpoints(tmp_path / "ckpt")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(CheckpointError, match=r"rank 0 cannot create the checkpoint folder .*a-file"):
        pipe.save_checkpoint(blocker / "ckpt", step=1)

    def refuse(rank: int, path: Path) -> None:  # a rank whose writes fail (as on a read-only mount)
        if rank == 1:
            raise PermissionError(13, "Permission denied", str(path))

    files.on_file_written = refuse
    try:
        with pytest.raises(CheckpointError, match=r"rank 1 cannot write checkpoint file .*\.step-00000009\.partial"):
            pipe.save_checkpoint(tmp_path / "ckpt", step=9)
    finally:
        files.on_file_written = None
    assert not (tmp_path / "ckpt" / ".step-00000009.partial").exists()
    assert [p.name for _, p in checkpoints_in(tmp_path / "ckpt")] == ["step-00000004", "step-00000002",
                                                                      "step-00000000"]
    pipe.train_step(batch(0))  # a failed save does not end the pipeline


def test_keep_newest_n_and_folder_mode(tmp_path):
    torch.set_default_dtype(torch.float64)
    pipe = Pipeline(make_layers(), loss_fn, local_devices=2, microbatches=2, show_partition=False)
    for step in range(1, 6):
        pipe.save_checkpoint(tmp_path / "root", step=step, keep=2)
    assert [p.name for _, p in checkpoints_in(tmp_path / "root")] == ["step-00000005", "step-00000004"]
    assert sorted(p.name for p in (tmp_path / "root").iterdir()) == ["step-00000004", "step-00000005"]
    pipe.save_checkpoint(tmp_path / "one", extra={"note": "x", "tensor": torch.arange(3)})  # extra.pt
    pipe.save_checkpoint(tmp_path / "one", extra={"note": "y"})  # replaces it
    assert pipe.load_checkpoint(tmp_path / "one")["extra"] == {"note": "y"}
    assert not list(tmp_path.glob(".*"))


def test_gpt2_checkpoint_exports_to_transformers(tmp_path):
    """A GPT-2 converted from transformers, trained 2 steps on 4 stages (tied head), saved; load_full + the HF
    export give a GPT2LMHeadModel equal to the pipeline's model, and the HF model round-trips exactly."""
    transformers = pytest.importorskip("transformers")
    from stagewise.models import from_transformers, lm_loss, to_transformers, to_transformers_state_dict
    from stagewise.models.gpt2 import GPT2Config

    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                 bos_token_id=99, eos_token_id=99, attn_implementation="sdpa")
    hf = transformers.GPT2LMHeadModel(hc).eval()
    layers = from_transformers(hf)
    exact = to_transformers_state_dict(torch.nn.Sequential(*layers).state_dict())
    assert exact.keys() == hf.state_dict().keys()
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in exact.items())  # the inverse of from_transformers
    pipe = Pipeline(layers, lm_loss, local_devices=4, microbatches=2, show_partition=False,
                    optimizer=lambda ps: torch.optim.AdamW(ps, lr=1e-3))
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        pipe.train_step((ids, ids))
    pipe.save_checkpoint(tmp_path, step=2)
    cfg = GPT2Config(vocab_size=100, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    exported = to_transformers(stagewise.load_full(tmp_path), cfg)
    assert exported.lm_head.weight is exported.transformer.wte.weight
    ours = torch.nn.Sequential(*layers).eval()
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, ours(ids), atol=1e-5, rtol=0)


def _train(*args: str, env: dict | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "stagewise.cli", "train", *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=full_env)


@pytest.mark.slow
def test_train_restarts_after_a_rank_is_killed(tmp_path_factory):
    """`stagewise train --save-every 2 --max-restarts 1` with rank 1 SIGKILLed after step 5: torchrun restarts
    both ranks, they resume from step 4 by themselves, and every loss equals a run resumed from that checkpoint."""
    tmp = tmp_path_factory.mktemp("restart")
    common = ["--stages", "2", "--model", "gpt2-tiny", "--seq-len", "32", "--batch-size", "4", "--microbatches", "2",
              "--vocab-size", "1024", "--log-every", "1", "--trace-step", "0", "--steps", "8", "--save-every", "2"]
    env: dict[str, str] = {}  # the tokenizer and token caches are keyed by content: the usual cache is safe to share
    run = tmp / "run"
    out = _train(*common, "--max-restarts", "1", "--out", str(run),
                 env={**env, **crash_after("1:5")})
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert "exitcode: -9" in log and "restart 1: resuming from" in log and "step-00000004 (step 4)" in log
    assert "the previous attempt had reached step 5: step 5 is lost and run again" in log
    events = [json.loads(line) for line in (run / "events.jsonl").read_text().splitlines()]
    assert events == [{**events[0], "event": "restart", "attempt": 1, "from_step": 4, "reached": 5}]
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(1, 9))  # the lost step logged once
    # the same checkpoint resumed by hand, in a fresh run folder
    again = tmp / "again"
    (again / "checkpoints").mkdir(parents=True)
    shutil.copy(run / "config.json", again / "config.json")
    shutil.copytree(run / "checkpoints" / "step-00000004", again / "checkpoints" / "step-00000004")
    out2 = _train("--resume", str(again), env=env)
    assert out2.returncode == 0, (out2.stdout + out2.stderr)[-4000:]
    resumed = [json.loads(line) for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert [m["loss"] for m in metrics[4:]] == [m["loss"] for m in resumed]  # steps 5-8, bit for bit
    assert json.loads((run / "summary.json").read_text())["last_loss"] == resumed[-1]["loss"]
    assert [p.name for _, p in checkpoints_in(run / "checkpoints")] == ["step-00000008", "step-00000006",
                                                                        "step-00000004"]


def test_data_parallel_replicas_save_once_and_all_load(tmp_path):
    """D=2 (a 2 x 2 grid of threads, the runtime's StageSet without a Pipeline): only the first replica writes
    tensors; a D=1 checkpoint loads into every replica, and the D=2 one into one process."""
    from stagewise.runtime import checkpoint
    from stagewise.runtime.grid import Grid
    from stagewise.runtime.stage_set import StageSet
    from stagewise.runtime.threads import LocalWorld
    from stagewise.schedules import build

    torch.set_default_dtype(torch.float64)
    world = LocalWorld(Grid(2, 2))
    factories = [lambda i=i: make_layers(blocks=3)[i] for i in range(5)]  # every replica builds its own copies
    model = StageSet(factories, [3, 2], build("1f1b", 2, 2), world, seed=0)
    with torch.no_grad():
        for rank in (1, 3):  # the second replica differs until a load makes it equal
            for st in model.of_rank(rank).values():
                for p in st.parameters():
                    p.add_(1.0)
    checkpoint.save(tmp_path / "dp", world, model, {}, step=1)
    manifest = json.loads((tmp_path / "dp" / "step-00000001" / "manifest.json").read_text())
    assert manifest["D"] == 2 and manifest["P"] == 2 and set(manifest["rng"]) == {"0", "1", "2", "3"}
    assert sorted(manifest["files"]) == ["weights-rank00000.safetensors", "weights-rank00002.safetensors"]
    full = stagewise.load_full(tmp_path / "dp")
    one = Pipeline(make_layers(seed=4, blocks=3), loss_fn, local_devices=None, show_partition=False)
    one.load_checkpoint(tmp_path / "dp")
    assert all(torch.equal(p, full[n]) for n, p in one.named_parameters())
    one.save_checkpoint(tmp_path / "single", step=1)
    checkpoint.load(tmp_path / "single", world, model, {})
    for rank in range(4):
        for st in model.of_rank(rank).values():
            assert all(torch.equal(p, full[n]) for n, p in st.named_parameters()), rank
