"""The README's "Use it on your model" block runs as written, and the behaviours its notes promise: a training call
without an optimizer warns once, shared modules warn, an `extra` that cannot be read back is refused at save time,
`last_step` always has its keys, `train_step` returns a float64 0-dim tensor, and `compile=True` keeps the names."""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

from stagewise import Pipeline, load_full
from stagewise.runtime.checkpoint import CheckpointError

ROOT = Path(__file__).resolve().parents[1]

# the README leaves layers, loss_fn and the data to the reader: tiny ones, the same on every rank
PRELUDE = """
import itertools, warnings
import torch
warnings.filterwarnings("error", message="stagewise")  # the block as written must not warn
torch.manual_seed(0)
layers = [torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 16), torch.nn.Tanh(), torch.nn.Linear(16, 4)]
def loss_fn(out, labels):
    return torch.nn.functional.mse_loss(out, labels)
inputs, labels = torch.randn(16, 8), torch.randn(16, 4)
batch = (inputs, labels)
data_iter = itertools.repeat(batch)
"""
EPILOGUE = """
assert loss.dtype == torch.float64 and loss.dim() == 0
assert {"loss", "grad_norm", "skipped"} <= set(pipe.last_step) and pipe.last_step["skipped"] is None
assert len(losses) == 100 and losses[-1] < losses[0]
if pipe.rank == 0:
    print("README block ran", flush=True)
"""


def readme_block() -> str:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Use it on your model"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_readme_block_runs_as_written_on_two_processes(tmp_path):
    script = tmp_path / "readme_block.py"
    script.write_text(PRELUDE + readme_block() + EPILOGUE)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-m", "stagewise.cli", "run", "-n", "2", "--threads", "1", str(script)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "README block ran" in out.stdout and (tmp_path / "ckpt" / "step-00000100" / "manifest.json").is_file()


def _layers() -> list[torch.nn.Module]:
    torch.manual_seed(0)
    return [torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2)]


def _loss(out, labels):
    return torch.nn.functional.mse_loss(out, labels)


BATCH = (torch.randn(8, 4), torch.randn(8, 2))


def test_a_training_call_without_optimizer_warns_once():
    pipe = Pipeline(_layers(), _loss, microbatches=2, local_devices=2, show_partition=False)
    before = [p.detach().clone() for p in pipe.parameters()]
    with pytest.warns(UserWarning, match="has no optimizer, so its training step changed no weight"):
        pipe.train_step(BATCH)
    assert all(p.grad is not None for p in pipe.parameters())  # the gradients are there, for a step by hand
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pipe.train_step(BATCH)  # once
    assert all(torch.equal(a, p) for a, p in zip(before, pipe.parameters()))
    pipe.close()


def test_last_step_keys_and_the_returned_loss_without_clipping():
    layers = _layers()
    pipe = Pipeline(layers, _loss, microbatches=2, local_devices=2, show_partition=False,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    loss = pipe.train_step(BATCH)
    assert loss.dtype == torch.float64 and loss.dim() == 0 and loss.device.type == "cpu"
    assert pipe.last_step["loss"] == loss.item() and pipe.last_step["grad_norm"] is None
    assert pipe.last_step["skipped"] is None
    pipe.close()


def test_two_pipelines_on_the_same_modules_warn_unless_the_first_is_closed_or_gone():
    layers = _layers()
    first = Pipeline(layers, _loss, microbatches=2, local_devices=2, show_partition=False)
    with pytest.warns(UserWarning, match=r"layers 0, 2 are already held by another Pipeline"):
        second = Pipeline(layers, _loss, microbatches=2, local_devices=2, show_partition=False)
    second.close()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        third = Pipeline(copy.deepcopy(layers), _loss, microbatches=2, local_devices=2, show_partition=False)
        third.close()
        del first, second  # closed or dropped: its modules are free
        Pipeline(layers, _loss, microbatches=2, local_devices=2, show_partition=False).close()


def test_an_extra_that_cannot_be_read_back_is_refused_at_save_time(tmp_path):
    pipe = Pipeline(_layers(), _loss, microbatches=2, local_devices=2, show_partition=False,
                    optimizer=lambda ps: torch.optim.SGD(ps, lr=0.1))
    pipe.train_step(BATCH)
    with pytest.raises(CheckpointError, match=r"extra\['data'\]\['position'\] \(a ellipsis: Ellipsis\) cannot be "
                                              r"saved so that load_checkpoint reads it back"):
        pipe.save_checkpoint(tmp_path / "ckpt", step=1, extra={"data": {"epoch": 0, "position": ...}})
    assert not (tmp_path / "ckpt").exists() or not any((tmp_path / "ckpt").iterdir())
    with pytest.raises(CheckpointError, match=r"extra\['fn'\] \(a function"):
        pipe.save_checkpoint(tmp_path / "ckpt", step=1, extra={"fn": _loss})
    # tensors and state dicts are fine, and come back
    state = {"data": {"epoch": 0}, "scaler": {"scale": torch.tensor(2.0)}, "opt": pipe.optimizer.state_dict()}
    pipe.save_checkpoint(tmp_path / "ckpt", step=1, extra=state)
    manifest = pipe.load_checkpoint(tmp_path / "ckpt")
    assert torch.equal(manifest["extra"]["scaler"]["scale"], torch.tensor(2.0))
    pipe.close()


def test_compiled_stages_keep_names_and_are_exact_in_float64(tmp_path):
    """`compile=True` with the aot_eager backend (no C compiler needed): the losses, weights and checkpoint names
    equal the uncompiled pipeline's, bit for bit."""
    torch.set_default_dtype(torch.float64)
    batch = (torch.randn(8, 4), torch.randn(8, 2))
    runs = {}
    for compiled in (False, "aot_eager"):
        pipe = Pipeline(_layers(), _loss, microbatches=2, local_devices=2, show_partition=False, compile=compiled,
                        optimizer=lambda ps: torch.optim.Adam(ps, lr=0.01))
        assert ("forward" in vars(pipe.stages[0].module)) == bool(compiled)  # compiled in place
        losses = [pipe.train_step(batch).item() for _ in range(3)]
        losses.append(pipe.eval_step(batch)["loss"].item())
        pipe.save_checkpoint(tmp_path / str(compiled), step=3)
        runs[compiled] = losses, load_full(tmp_path / str(compiled))
        pipe.close()
    (plain, plain_sd), (comp, comp_sd) = runs[False], runs["aot_eager"]
    assert comp == plain and list(comp_sd) == list(plain_sd) == ["0.weight", "0.bias", "2.weight", "2.bias"]
    assert all(torch.equal(comp_sd[k], plain_sd[k]) for k in plain_sd)
