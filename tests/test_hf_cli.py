"""Hugging Face models from the command line: `stagewise train --model hf:FAMILY | PATH`, `--list-models`,
`stagewise export`, and `stagewise plan/check --model hf:FAMILY`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import stagewise
from stagewise.models.hf import build, from_transformers, small_config

transformers = pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parent.parent
TRAIN = ["--stages", "2", "--schedule", "1f1b", "--microbatches", "2", "--partition", "uniform", "--batch-size", "4",
         "--seq-len", "32", "--vocab-size", "512", "--log-every", "1", "--trace-step", "0"]


def cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "stagewise.cli", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env)


def test_list_models() -> None:
    out = cli("train", "--list-models")
    assert out.returncode == 0, out.stderr
    for name in ("gpt2-tiny", "hf:llama", "hf:qwen3", "hf:gemma3", "hf:olmo2", "--model PATH"):
        assert name in out.stdout
    bad = cli("train", "--model", "hf:nope", *TRAIN)
    assert bad.returncode == 2 and "invalid choice: 'hf:nope'" in bad.stderr


@pytest.mark.slow
def test_train_a_family_then_export(tmp_path) -> None:
    """`train --model hf:qwen2` (a tied small config, our tokenizer) trains; `export RUN OUT` writes a folder that
    AutoModelForCausalLM loads with the checkpoint's logits, the run's tokenizer beside it."""
    run = tmp_path / "run"
    out = cli("train", "--model", "hf:qwen2", "--steps", "3", *TRAIN, "--out", str(run))
    assert out.returncode == 0, out.stdout + out.stderr
    assert "HFDecoderLayer" in out.stdout
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    out = cli("export", str(run), str(tmp_path / "hf"))
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "hf" / "tokenizer.json").is_file()
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert type(exported).__name__ == "Qwen2ForCausalLM"
    assert exported.lm_head.weight is exported.model.embed_tokens.weight
    layers = from_transformers(build(exported.config), verify=False)
    nn.Sequential(*layers).load_state_dict(stagewise.load_full(run / "checkpoints"))
    ids = torch.randint(0, exported.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, nn.Sequential(*layers).eval()(ids))


def test_train_a_local_folder(tmp_path) -> None:
    """`train --model PATH` loads a folder written by save_pretrained (config.json, safetensors weights,
    tokenizer.json): with a vanishing learning rate the checkpoint holds the folder's weights."""
    from stagewise.data import builtin_corpus, train_bpe

    tok = train_bpe(builtin_corpus(), vocab_size=512)  # cached by the other runs
    model = build(small_config("llama", tok.get_vocab_size() + 8, 64, hidden_size=32, intermediate_size=48,
                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=8),
                  seed=3)
    folder = tmp_path / "llama"
    model.save_pretrained(folder)
    tok.save(str(folder / "tokenizer.json"))
    assert (folder / "model.safetensors").is_file()
    run = tmp_path / "run"
    out = cli("train", "--model", str(folder), "--steps", "1", *TRAIN, "--lr", "1e-12", "--out", str(run))
    assert out.returncode == 0, out.stdout + out.stderr
    state = stagewise.load_full(run / "checkpoints")
    assert torch.allclose(state["0.embed_tokens.weight"], model.model.embed_tokens.weight, atol=1e-9, rtol=0)
    assert torch.allclose(state["2.layer.mlp.up_proj.weight"], model.model.layers[1].mlp.up_proj.weight,
                          atol=1e-9, rtol=0)
    assert torch.allclose(state["3.lm_head.weight"], model.lm_head.weight, atol=1e-9, rtol=0)


def test_plan_and_check_a_family() -> None:
    """The planner profiles a Hugging Face family like a built-in model; `check` proves it exact."""
    out = cli("plan", "--model", "hf:llama", "--stages", "2", "--batch", "4", "--seq-len", "16", "--runs", "1",
              "--repeats", "1", "--json")
    assert out.returncode == 0, out.stderr
    plan = json.loads(out.stdout.strip().splitlines()[-1])
    assert plan["model"] == "hf:llama" and sum(plan["choice"]["balance"]) == 6
    out = cli("check", "--model", "hf:mistral", "--stages", "2", "--schedule", "zbv")
    assert out.returncode == 0 and "OK: worst relative error" in out.stdout, out.stdout + out.stderr


def test_without_transformers_the_messages_say_what_to_install(tmp_path) -> None:
    """With transformers missing, `train --model hf:...` is refused before anything starts, and `plan` and `export`
    end with the same advice, without a traceback."""
    code = ("import sys; sys.modules['transformers'] = None; from stagewise.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args in (["train", "--model", "hf:llama", "--out", str(tmp_path / "run")],
                 ["plan", "--model", "hf:llama", "--stages", "2"],
                 ["export", str(tmp_path), str(tmp_path / "out"), "--config", str(tmp_path / "config.json")]):
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        out = subprocess.run([sys.executable, "-c", code, *args], cwd=ROOT, capture_output=True, text=True,
                             timeout=120, env=env)
        assert out.returncode != 0 and "pip install 'stagewise[hf]'" in out.stderr, (args, out.stderr)
        assert "Traceback" not in out.stderr, out.stderr
    assert not (tmp_path / "run").exists()
