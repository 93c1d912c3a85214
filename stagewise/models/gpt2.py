"""GPT-2 as a list of layers: [GPT2Embedding, GPT2Block x n_layer, GPT2Head], nanoGPT-style.

Every layer maps one tensor to one tensor, so the list can be cut anywhere into pipeline stages:
ids (B, T) int64 -> hidden (B, T, D) -> ... -> hidden (B, T, D) -> logits (B, T, V).
With `tie_word_embeddings` the head's weight is the embedding's `wte.weight` (one nn.Parameter),
marked with `stagewise_tie = "gpt2.wte"` so copies on different stages can be kept in sync.
"""

from __future__ import annotations

import dataclasses
import math
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from os import PathLike
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

TIE_KEY = "gpt2.wte"


@dataclass(frozen=True)
class GPT2Config:
    """Shape of a GPT-2. `dropout` is used for embeddings, attention probabilities and residuals alike."""

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    dropout: float = 0.0
    layer_norm_epsilon: float = 1e-5
    tie_word_embeddings: bool = True

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")

    def param_count(self) -> int:
        """Number of parameters, the tied embedding/head counted once (124,439,808 for "gpt2")."""
        d = self.n_embd
        block = 12 * d * d + 13 * d  # qkv + proj + 4x MLP weights and biases, two LayerNorms
        head = 0 if self.tie_word_embeddings else self.vocab_size * d
        return (self.vocab_size + self.n_positions) * d + self.n_layer * block + 2 * d + head


CONFIGS: dict[str, GPT2Config] = {
    "gpt2-tiny": GPT2Config(vocab_size=8192, n_positions=128, n_embd=128, n_layer=4, n_head=4),
    "gpt2-mini": GPT2Config(vocab_size=8192, n_positions=256, n_embd=256, n_layer=6, n_head=8),
    "gpt2": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=12, n_head=12),
    "gpt2-medium": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1024, n_layer=24, n_head=16),
    "gpt2-large": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1280, n_layer=36, n_head=20),
    "gpt2-xl": GPT2Config(vocab_size=50257, n_positions=1024, n_embd=1600, n_layer=48, n_head=25),
}


def config(name: str, **overrides: Any) -> GPT2Config:
    """A named config from CONFIGS with some fields replaced, e.g. config("gpt2-tiny", vocab_size=512)."""
    if name not in CONFIGS:
        raise KeyError(f"unknown GPT-2 config {name!r}; choose one of {', '.join(CONFIGS)}")
    return dataclasses.replace(CONFIGS[name], **overrides)


class GPT2Embedding(nn.Module):
    """Token + position embedding, then dropout: ids (B, T) int64 -> hidden (B, T, D)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.n_positions, cfg.n_embd)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        t = input_ids.shape[-1]
        if t > self.wpe.num_embeddings:
            raise ValueError(f"sequence length {t} exceeds n_positions={self.wpe.num_embeddings}")
        pos = torch.arange(t, device=input_ids.device)
        return self.drop(self.wte(input_ids) + self.wpe(pos))


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd)
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = (z.view(b, t, self.n_head, d // self.n_head).transpose(1, 2) for z in self.c_attn(x).split(d, 2))
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0, is_causal=True)
        return self.resid_drop(self.c_proj(y.transpose(1, 2).reshape(b, t, d)))


class GPT2Block(nn.Module):
    """Pre-LayerNorm transformer block: x + attn(ln_1(x)), then x + mlp(ln_2(x)); (B, T, D) -> (B, T, D)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        d = cfg.n_embd
        self.ln_1 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(d, eps=cfg.layer_norm_epsilon)
        self.mlp = nn.Sequential(
            OrderedDict(
                c_fc=nn.Linear(d, 4 * d),
                act=nn.GELU(approximate="tanh"),  # GPT-2's "gelu_new"
                c_proj=nn.Linear(4 * d, d),
                drop=nn.Dropout(cfg.dropout),
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class GPT2Head(nn.Module):
    """Final LayerNorm and LM head without bias: hidden (B, T, D) -> logits (B, T, V)."""

    def __init__(self, cfg: GPT2Config):
        super().__init__()
        self.ln_f = nn.LayerNorm(cfg.n_embd, eps=cfg.layer_norm_epsilon)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lm_head(self.ln_f(x))


def gpt2_layers(
    cfg: GPT2Config, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
) -> list[nn.Module]:
    """[GPT2Embedding, *GPT2Block, GPT2Head] with GPT-2's init; device="meta" builds without allocating."""
    with torch.device(device or "cpu"):
        layers: list[nn.Module] = [GPT2Embedding(cfg), *(GPT2Block(cfg) for _ in range(cfg.n_layer)), GPT2Head(cfg)]
    for name, p in nn.Sequential(*layers).named_parameters():
        if name.endswith("c_proj.weight"):  # residual projections: std / sqrt(number of residual additions)
            nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))
        elif name.endswith("bias"):
            nn.init.zeros_(p)
        elif ".ln_" not in name:  # LayerNorms keep weight 1, bias 0
            nn.init.normal_(p, std=0.02)
    if cfg.tie_word_embeddings:
        tie_head(layers[0], layers[-1])
    if dtype is not None:
        for layer in layers:
            layer.to(dtype)  # in place (param.data is swapped), so the tied Parameter stays one object
    return layers


def tie_head(embedding: GPT2Embedding, head: GPT2Head) -> None:
    """Make the head use the embedding's weight (one Parameter) and mark it for ties across stages."""
    head.lm_head.weight = embedding.wte.weight
    embedding.wte.weight.stagewise_tie = TIE_KEY  # type: ignore[attr-defined]


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (B, T, V) against labels (B, T), skipping labels == -100 (padding)."""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


def count_parameters(layers: Iterable[nn.Module]) -> int:
    """Number of parameter elements, a Parameter shared by several layers counted once."""
    seen: dict[int, int] = {}
    for layer in layers:
        for p in layer.parameters():
            seen[id(p)] = p.numel()
    return sum(seen.values())


def from_transformers(hf_model: nn.Module) -> list[nn.Module]:
    """Convert a transformers GPT2LMHeadModel into gpt2_layers form with identical outputs.

    Weights are copied (Conv1D stores (in, out), nn.Linear (out, in)); the result has the model's
    device, dtype and train/eval mode, and keeps the embedding/head tie when the model has it.
    """
    hc, tr = hf_model.config, hf_model.transformer
    unsupported = {
        "n_inner": hc.n_inner not in (None, 4 * hc.n_embd),
        "activation_function": hc.activation_function not in ("gelu_new", "gelu_pytorch_tanh"),
        "scale_attn_weights": not hc.scale_attn_weights,
        "scale_attn_by_inverse_layer_idx": hc.scale_attn_by_inverse_layer_idx,
        "add_cross_attention": hc.add_cross_attention,
        "dropout": len({hc.embd_pdrop, hc.attn_pdrop, hc.resid_pdrop}) > 1,
    }
    if any(unsupported.values()):
        raise ValueError(f"GPT-2 variant not supported by stagewise: {[k for k, v in unsupported.items() if v]}")
    tied = hf_model.lm_head.weight is tr.wte.weight
    cfg = GPT2Config(
        vocab_size=hc.vocab_size,
        n_positions=hc.n_positions,
        n_embd=hc.n_embd,
        n_layer=hc.n_layer,
        n_head=hc.n_head,
        dropout=hc.resid_pdrop,
        layer_norm_epsilon=hc.layer_norm_epsilon,
        tie_word_embeddings=tied,
    )
    ref = tr.wte.weight
    layers = gpt2_layers(cfg, device="meta")  # no init work: every tensor is overwritten below
    sources: list[nn.Module] = [tr, *tr.h, nn.ModuleDict({"ln_f": tr.ln_f, "lm_head": hf_model.lm_head})]
    for i, (ours, theirs) in enumerate(zip(layers, sources)):
        ours.to_empty(device=ref.device).to(ref.dtype)
        with torch.no_grad():
            for name, p in ours.named_parameters():
                src = theirs.get_parameter(name)
                # Conv1D weights inside blocks are (in, out); embeddings, LayerNorms and lm_head are not
                p.copy_(src.t() if 0 < i < len(layers) - 1 and src.ndim == 2 else src)
    if tied:
        tie_head(layers[0], layers[-1])
    for layer in layers:
        layer.train(hf_model.training)  # same dropout behaviour as the model given
    return layers


def to_transformers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `from_transformers` for weights: a `gpt2_layers` state dict (keys as
    `nn.Sequential(*layers)` names them, e.g. from `stagewise.load_full(checkpoint)`) as a Hugging Face
    `GPT2LMHeadModel` state dict. Conv1D weights inside blocks are transposed back to (in, out); a tied
    head gives `lm_head.weight` as the very tensor of `transformer.wte.weight`."""
    last = max(int(k.split(".", 1)[0]) for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        layer, name = key.split(".", 1)
        i = int(layer)
        if i == 0:
            out[f"transformer.{name}"] = t
        elif i == last:
            out[name if name.startswith("lm_head.") else f"transformer.{name}"] = t
        else:
            out[f"transformer.h.{i - 1}.{name}"] = t.t().contiguous() if t.ndim == 2 else t
    return out


def to_transformers(state: dict[str, torch.Tensor], cfg: GPT2Config) -> nn.Module:
    """A Hugging Face `GPT2LMHeadModel` (eval mode) with the weights of a `gpt2_layers` state dict."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError("exporting to Hugging Face needs `transformers`: pip install 'stagewise[hf]'") from exc
    hc = transformers.GPT2Config(vocab_size=cfg.vocab_size, n_positions=cfg.n_positions, n_embd=cfg.n_embd,
                                 n_layer=cfg.n_layer, n_head=cfg.n_head, resid_pdrop=cfg.dropout,
                                 embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                                 layer_norm_epsilon=cfg.layer_norm_epsilon,
                                 tie_word_embeddings=cfg.tie_word_embeddings,
                                 bos_token_id=cfg.vocab_size - 1, eos_token_id=cfg.vocab_size - 1)
    hf_state = to_transformers_state_dict(state)
    model = transformers.GPT2LMHeadModel(hc).to(next(iter(hf_state.values())).dtype)
    model.load_state_dict(hf_state, strict=True)
    return model.eval()


def load_pretrained(name_or_path: str | PathLike[str] = "gpt2") -> list[nn.Module]:
    """GPT-2 weights from the Hugging Face Hub or a local save_pretrained() folder, as gpt2_layers.

    The layers come in eval mode (as from_pretrained gives them): call .train() on each to fine-tune.
    """
    try:
        from transformers import GPT2LMHeadModel
    except ImportError as exc:
        raise RuntimeError(
            "loading pretrained GPT-2 needs the `transformers` package: pip install transformers"
        ) from exc
    try:
        hf_model = GPT2LMHeadModel.from_pretrained(name_or_path)
    except Exception as exc:  # OSError offline, ValueError/EnvironmentError for broken folders
        raise RuntimeError(
            f"could not load GPT-2 weights from {str(name_or_path)!r} ({type(exc).__name__}: {exc}). "
            "Pretrained weights need network access to the Hugging Face Hub or a local copy: pass a folder "
            "written by save_pretrained(), or train from scratch with a built-in config, e.g. "
            "gpt2_layers(config('gpt2'))."
        ) from exc
    return from_transformers(hf_model)
