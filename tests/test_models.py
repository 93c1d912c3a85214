"""GPT-2 as a layer list: parity with transformers, the embedding/head tie, causality, parameter counts, loss."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from stagewise.models import (
    CONFIGS,
    TIE_KEY,
    GPT2Config,
    config,
    count_parameters,
    from_transformers,
    gpt2_layers,
    lm_loss,
    load_pretrained,
)

transformers = pytest.importorskip("transformers")

VOCAB = 100


def hf_gpt2(tie: bool = True, seed: int = 0) -> nn.Module:
    """A small random transformers GPT2LMHeadModel in eval mode."""
    torch.manual_seed(seed)
    hc = transformers.GPT2Config(
        vocab_size=VOCAB,
        n_positions=64,
        n_embd=32,
        n_layer=2,
        n_head=4,
        bos_token_id=VOCAB - 1,  # the default 50256 lies outside a 100-token vocabulary
        eos_token_id=VOCAB - 1,
        tie_word_embeddings=tie,
        # "eager" attention is not causal for a block called without a mask; "sdpa" is exact
        attn_implementation="sdpa",
    )
    return transformers.GPT2LMHeadModel(hc).eval()


def ids(b: int = 3, t: int = 20, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def hf() -> nn.Module:
    return hf_gpt2()


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.float64, 1e-10)])
def test_converted_logits_equal_transformers(dtype: torch.dtype, tol: float) -> None:
    model = hf_gpt2().to(dtype)
    ours = nn.Sequential(*from_transformers(model)).eval()
    x = ids()
    with torch.no_grad():
        ref, got = model(x).logits, ours(x)
    assert got.dtype == dtype and got.shape == (3, 20, VOCAB)
    assert (ref - got).abs().max().item() < tol


def test_conversion_keeps_the_tie(hf: nn.Module) -> None:
    layers = from_transformers(hf)
    wte = layers[0].wte.weight
    assert layers[-1].lm_head.weight is wte
    assert wte.stagewise_tie == TIE_KEY
    assert count_parameters(layers) == hf.num_parameters()
    assert [type(m).__name__ for m in layers] == ["GPT2Embedding", "GPT2Block", "GPT2Block", "GPT2Head"]
    # weights are copies: the converted layers do not alias the transformers model
    assert wte.data_ptr() != hf.transformer.wte.weight.data_ptr()


def test_gradients_equal_transformers() -> None:
    model = hf_gpt2().double()
    layers = from_transformers(model)
    x = ids()
    lm_loss(model(x).logits[:, :-1], x[:, 1:]).backward()
    assert not any(m.training for m in layers)  # the eval mode carries over, so dropout (0.1) is off in both
    lm_loss(nn.Sequential(*layers)(x)[:, :-1], x[:, 1:]).backward()
    # the tied weight's gradient sums its embedding and head uses in both models
    assert torch.allclose(layers[0].wte.weight.grad, model.transformer.wte.weight.grad, atol=1e-12)
    assert torch.allclose(layers[1].attn.c_attn.weight.grad, model.transformer.h[0].attn.c_attn.weight.grad.t())


def test_untied_model_converts_untied() -> None:
    model = hf_gpt2(tie=False)
    assert model.lm_head.weight is not model.transformer.wte.weight
    layers = from_transformers(model)
    assert layers[-1].lm_head.weight is not layers[0].wte.weight
    assert count_parameters(layers) == model.num_parameters()
    x = ids()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, nn.Sequential(*layers).eval()(x), atol=1e-5)


def test_load_pretrained_from_a_local_folder(hf: nn.Module, tmp_path: Path) -> None:
    hf.save_pretrained(tmp_path)
    layers = load_pretrained(tmp_path)
    assert layers[-1].lm_head.weight is layers[0].wte.weight
    x = ids()
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, nn.Sequential(*layers).eval()(x), atol=1e-5)


def test_load_pretrained_failure_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="could not load GPT-2 weights") as info:
        load_pretrained(tmp_path)  # an empty folder: no weights
    assert "save_pretrained" in str(info.value) and "config('gpt2')" in str(info.value)


def test_native_model_is_causal_and_tied() -> None:
    cfg = config("gpt2-tiny", vocab_size=VOCAB, n_layer=2, n_embd=64)
    torch.manual_seed(0)
    layers = gpt2_layers(cfg)
    assert layers[-1].lm_head.weight is layers[0].wte.weight
    assert layers[0].wte.weight.stagewise_tie == TIE_KEY
    model = nn.Sequential(*layers).eval()
    x = ids(2, 16)
    y = x.clone()
    y[:, 10] = (y[:, 10] + 1) % VOCAB
    with torch.no_grad():
        a, b = model(x), model(y)
    assert a.shape == (2, 16, VOCAB)
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-6)
    assert not torch.allclose(a[:, 10:], b[:, 10:], atol=1e-3)


def test_gpt2_init_scales_residual_projections() -> None:
    cfg = config("gpt2-tiny", n_layer=8)
    torch.manual_seed(0)
    block = gpt2_layers(cfg)[1]
    assert block.mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert block.ln_1.weight.eq(1).all() and block.attn.c_attn.bias.eq(0).all()


def test_dtype_conversion_keeps_the_tie() -> None:
    layers = gpt2_layers(config("gpt2-tiny", n_layer=1), dtype=torch.float64)
    assert layers[-1].lm_head.weight is layers[0].wte.weight
    assert all(p.dtype == torch.float64 for m in layers for p in m.parameters())


def test_real_gpt2_has_124m_parameters() -> None:
    layers = gpt2_layers(config("gpt2"), device="meta")  # shapes only, nothing allocated
    assert count_parameters(layers) == 124_439_808
    untied = gpt2_layers(config("gpt2", tie_word_embeddings=False), device="meta")
    assert count_parameters(untied) == 124_439_808 + 50257 * 768  # the seed's 163M: the head cloned


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_param_count_formula_matches_the_layers(name: str) -> None:
    cfg = CONFIGS[name]
    assert count_parameters(gpt2_layers(cfg, device="meta")) == cfg.param_count()


def test_config_validation() -> None:
    assert config("gpt2-tiny", vocab_size=512).vocab_size == 512
    with pytest.raises(KeyError, match="gpt2-tiny"):
        config("gpt3")
    with pytest.raises(ValueError, match="divisible"):
        GPT2Config(vocab_size=10, n_positions=8, n_embd=30, n_layer=1, n_head=4)
    emb = gpt2_layers(config("gpt2-tiny", n_layer=1, n_positions=8))[0]
    with pytest.raises(ValueError, match="n_positions"):
        emb(torch.zeros(1, 9, dtype=torch.long))


def test_lm_loss_ignores_padding() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, VOCAB, generator=g)
    labels = torch.randint(0, VOCAB, (2, 5), generator=g)
    loss = lm_loss(logits, labels)
    manual = -torch.log_softmax(logits, -1).gather(-1, labels[..., None]).mean()
    assert torch.allclose(loss, manual)
    # appending padded positions (any logits, label -100) leaves the loss unchanged
    padded_logits = torch.cat([logits, torch.randn(2, 7, VOCAB, generator=g)], dim=1)
    padded_labels = torch.cat([labels, torch.full((2, 7), -100)], dim=1)
    assert torch.allclose(lm_loss(padded_logits, padded_labels), loss)
