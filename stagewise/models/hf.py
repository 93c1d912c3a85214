"""Any Hugging Face causal LM that declares a pipeline plan, as a list of layers, and back.

transformers declares for most decoder-only families a `base_model_pp_plan`: `embed_tokens` -> `layers` -> `norm`
(and `lm_head` on the `*ForCausalLM`). `from_transformers(model)` cuts the model there:

    [HFEmbedding, HFDecoderLayer x num_hidden_layers, HFHead]

- `HFEmbedding` takes `input_ids` (B, T), or a dict with `input_ids` and optionally `attention_mask` (B, T) and
  `position_ids` (B, T), and returns a dict `{"hidden_states", "attention_mask", "position_ids"}`; the mask and
  the positions (0..T-1 unless given, as transformers makes them) ride along to every later stage.
- `HFDecoderLayer` holds one of the model's decoder layers and its own copy of the rotary embedding (buffers
  only, no parameters): it builds the layer's attention mask (causal or sliding-window, for the model's
  attention backend: eager, sdpa, ...) and the rotary cos/sin from the riders, as the base model's forward does,
  so padded batches and every backend give the model's own numbers on any stage.
- `HFHead` is the final norm and the LM head (with Gemma-2/3's final logit soft-capping, Cohere's logit scale):
  logits (B, T, V).

The layers hold the model's own modules (no copy: deep-copy the model first to keep it apart). A tied LM head is
the embedding's very Parameter (marked `stagewise_tie`), so the pipeline keeps the copies equal. The returned
list (`ModelLayers`) carries the model's config (`.config`), which `stagewise.export` needs to write a folder that
`AutoModelForCausalLM.from_pretrained` loads. GPT-2 (no pp plan; its own converter in `gpt2.py`) goes through
the same entry point.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import inspect
import json
import shutil
from collections.abc import Mapping
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stagewise.models.gpt2 import CONFIGS, GPT2Config
from stagewise.models.gpt2 import from_transformers as gpt2_from_transformers
from stagewise.models.gpt2 import to_transformers as gpt2_to_transformers
from stagewise.models.gpt2 import to_transformers_state_dict as gpt2_state_dict

TIE_KEY = "hf.embed_tokens"
PLAN = ("embed_tokens", "layers", "norm")
MASKS = {"full_attention": "create_causal_mask", "sliding_attention": "create_sliding_window_causal_mask"}
INSTALL = "pip install 'stagewise[hf]'"


class TransformersMissing(RuntimeError, ValueError):
    """`transformers` is not installed; the message says what needed it and how to install it (a ValueError too,
    so the command line prints it as a usage error, without a traceback)."""


def require_transformers(what: str) -> Any:
    """The `transformers` module, or a `TransformersMissing` saying what needs it and how to install it."""
    try:
        import transformers
    except ImportError as exc:
        raise TransformersMissing(f"{what} needs the `transformers` package: {INSTALL}") from exc
    return transformers


class ModelLayers(list):
    """A list of layers (what `Pipeline`, `GPipe`, the planner and `stagewise.check` take) that also carries the
    transformers config of the model it came from (`.config`), for `stagewise.export` and `save_pretrained`."""

    def __init__(self, layers: Any = (), config: Any = None):
        super().__init__(layers)
        self.config = config


class HFEmbedding(nn.Module):
    """input_ids (B, T) or {"input_ids", "attention_mask"?, "position_ids"?} -> {"hidden_states" (B, T, D),
    "attention_mask" (B, T) or None, "position_ids" (B, T)}."""

    def __init__(self, embed_tokens: nn.Module):
        super().__init__()
        self.embed_tokens = embed_tokens

    def forward(self, x: Any) -> dict[str, Any]:
        if isinstance(x, Mapping):
            ids, mask, pos = x["input_ids"], x.get("attention_mask"), x.get("position_ids")
        else:
            ids, mask, pos = x, None, None
        hidden = self.embed_tokens(ids)
        if pos is None:  # what the base model makes without a cache: 0..T-1 on every row
            b, t = ids.shape
            pos = torch.arange(t, device=hidden.device).unsqueeze(0).repeat(b, 1)
        return {"hidden_states": hidden, "attention_mask": mask, "position_ids": pos}


@functools.cache
def _mask_params(fn: Any) -> frozenset[str]:
    return frozenset(inspect.signature(fn).parameters)


def make_mask(fn: Any, config: Any, hidden: torch.Tensor, mask: torch.Tensor | None, pos: torch.Tensor) -> Any:
    """The attention mask a decoder layer gets from the base model's forward (no cache), for its backend."""
    params = _mask_params(fn)
    kwargs: dict[str, Any] = {"config": config, "attention_mask": mask, "position_ids": pos}
    kwargs["inputs_embeds" if "inputs_embeds" in params else "input_embeds"] = hidden
    for name in ("cache", "past_key_values"):
        if name in params:
            kwargs[name] = None
            break
    if "cache_position" in params:  # transformers before the cache-free mask signature
        kwargs["cache_position"] = torch.arange(hidden.shape[1], device=hidden.device)
    return fn(**kwargs)


class HFDecoderLayer(nn.Module):
    """One decoder layer of the model: {"hidden_states", "attention_mask", "position_ids"} -> the same dict with
    the layer's output. Its attention mask and rotary cos/sin are built here from the riders."""

    def __init__(self, layer: nn.Module, rotary_emb: nn.Module | None, config: Any, layer_type: str):
        super().__init__()
        transformers = require_transformers("converting a Hugging Face model")
        self.layer = layer
        self.rotary_emb = copy.deepcopy(rotary_emb) if rotary_emb is not None else None  # buffers, no parameters
        self.config = config
        self.layer_type = layer_type
        self.mask_fn = getattr(transformers.masking_utils, MASKS[layer_type])
        self.rotary_takes_type = rotary_emb is not None and "layer_type" in inspect.signature(
            rotary_emb.forward).parameters

    def forward(self, x: dict[str, Any]) -> dict[str, Any]:
        hidden, pos = x["hidden_states"], x["position_ids"]
        kwargs: dict[str, Any] = {"attention_mask": make_mask(self.mask_fn, self.config, hidden,
                                                              x.get("attention_mask"), pos),
                                  "position_ids": pos}
        if self.rotary_emb is not None:
            kwargs["position_embeddings"] = (self.rotary_emb(hidden, pos, self.layer_type) if self.rotary_takes_type
                                             else self.rotary_emb(hidden, pos))
        out = self.layer(hidden, **kwargs)
        return {**x, "hidden_states": out[0] if isinstance(out, tuple) else out}

    def extra_repr(self) -> str:
        return f"layer_type={self.layer_type}"


class HFHead(nn.Module):
    """The final norm and the LM head: {"hidden_states", ...} (or the hidden states) -> logits (B, T, V)."""

    def __init__(self, norm: nn.Module, lm_head: nn.Module, softcap: float | None = None,
                 logit_scale: float | None = None):
        super().__init__()
        self.norm = norm
        self.lm_head = lm_head
        self.softcap = softcap
        self.logit_scale = logit_scale

    def forward(self, x: Any) -> torch.Tensor:
        hidden = x["hidden_states"] if isinstance(x, Mapping) else x
        logits = self.lm_head(self.norm(hidden))
        if self.logit_scale is not None:  # Cohere
            logits = logits * self.logit_scale
        if self.softcap is not None:  # Gemma 2 and 3, as their ForCausalLM does it
            logits = logits / self.softcap
            logits = torch.tanh(logits)
            logits = logits * self.softcap
        return logits


def _refuse(model: nn.Module, why: str) -> ValueError:
    return ValueError(
        f"stagewise cannot convert {type(model).__name__}: {why}. from_transformers takes a GPT-2 or a "
        "*ForCausalLM whose config declares a pipeline plan (config.base_model_pp_plan: embed_tokens -> layers -> "
        "norm, and an lm_head); for any other model, pass your own list of layers to Pipeline")


def _layer_type(config: Any, i: int) -> str:
    types = getattr(config, "layer_types", None)
    if types:
        return types[i]
    return "sliding_attention" if getattr(config, "sliding_window", None) is not None else "full_attention"


def from_transformers(model: nn.Module, *, verify: bool = True) -> ModelLayers:
    """A transformers causal LM as a list of layers with identical outputs (see the module docstring).

    GPT-2 (`GPT2LMHeadModel`) is converted by `stagewise.models.gpt2.from_transformers` (weights copied); any
    other `*ForCausalLM` whose config declares `base_model_pp_plan` is cut at embed_tokens / each decoder layer /
    norm + lm_head, its modules shared with the model. Anything else is refused with a ValueError naming the
    class. With `verify` (default) the converted list and the model are run once on a small padded batch (eval
    mode, no gradients) and a difference in the logits is an error: a family whose forward does more than the
    plan says is refused rather than trained wrongly.
    """
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "model_type", None) == "gpt2":
        layers = ModelLayers(gpt2_from_transformers(model), copy.deepcopy(config))
    else:
        layers = ModelLayers(_convert_planned(model), config)
    if verify:
        _verify(model, layers)
    return layers


def _convert_planned(model: nn.Module) -> list[nn.Module]:
    config = getattr(model, "config", None)
    plan = getattr(config, "base_model_pp_plan", None) if config is not None else None
    if not plan:
        raise _refuse(model, "it declares no pipeline plan (its config has no base_model_pp_plan)")
    if tuple(plan) != PLAN:
        raise _refuse(model, f"its pipeline plan is {list(plan)}, not {list(PLAN)} (a model with parts beyond "
                      "one text decoder, such as a vision tower)")
    if getattr(config, "is_encoder_decoder", False):
        raise _refuse(model, "it is an encoder-decoder model")
    base = getattr(model, getattr(model, "base_model_prefix", "model"), None)
    lm_head = getattr(model, "lm_head", None)
    if base is None or lm_head is None or not all(hasattr(base, k) for k in PLAN):
        raise _refuse(model, "it has no base model with embed_tokens, layers and norm, or no lm_head (is it a "
                      "*ForCausalLM?)")
    if getattr(config, "output_router_logits", False):
        raise _refuse(model, "it adds a mixture-of-experts routing loss (output_router_logits=True), which needs "
                      "every layer's router logits at the loss")
    if getattr(config, "use_bidirectional_attention", False):
        raise _refuse(model, "it uses bidirectional attention")
    decoders = list(base.layers)[: config.num_hidden_layers]
    types = [_layer_type(config, i) for i in range(len(decoders))]
    if unknown := sorted(set(types) - set(MASKS)):
        raise _refuse(model, f"its layers include {unknown}; stagewise builds masks for {sorted(MASKS)}")
    rotary = getattr(base, "rotary_emb", None)
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(model, "logit_scale", None)
    layers: list[nn.Module] = [HFEmbedding(base.embed_tokens),
                               *(HFDecoderLayer(d, rotary, config, t) for d, t in zip(decoders, types)),
                               HFHead(base.norm, lm_head, softcap, float(scale) if scale is not None else None)]
    weight = getattr(base.embed_tokens, "weight", None)
    if weight is not None and getattr(lm_head, "weight", None) is weight:
        weight.stagewise_tie = TIE_KEY  # type: ignore[attr-defined]
    return layers


def _verify(model: nn.Module, layers: list[nn.Module]) -> None:
    """Run the model and the list once on a small padded batch; a difference in the logits is a ValueError."""
    first = next(model.parameters(), None)
    if first is None or first.device.type == "meta":
        return
    vocab = int(model.config.vocab_size)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (2, 8), generator=g).to(first.device)
    mask = torch.ones_like(ids)
    if isinstance(layers[0], HFEmbedding):
        mask[1, 7:] = 0  # one padded position (GPT-2's layers take input_ids alone: causal, no padding mask)
    inputs: Any = {"input_ids": ids, "attention_mask": mask} if isinstance(layers[0], HFEmbedding) else ids
    modes = [(m, m.training) for m in [model, *layers]]
    try:
        for m, _ in modes:
            m.eval()
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask).logits
            got = nn.Sequential(*layers)(inputs)
    finally:
        for m, mode in reversed(modes):
            m.train(mode)
    tol = 2e-2 if first.dtype in (torch.float16, torch.bfloat16) else 1e-4
    scale = want.nan_to_num(0.0).abs().max().item() or 1.0
    err = float("inf")
    if got.shape == want.shape and torch.equal(got.isnan(), want.isnan()):  # NaN where the model gives NaN
        err = (got.float() - want.float()).nan_to_num(0.0).abs().max().item() / scale
    if not err <= tol:
        raise _refuse(model, f"the converted layers' logits differ from the model's by {err:.3g} (relative, "
                      f"tolerance {tol:g}) on a test batch: its forward does more than its pipeline plan says")


# ---------------------------------------------------------------------------------------------- export

def to_transformers_state_dict(state: Mapping[str, torch.Tensor], config: Any = None,
                               base_model_prefix: str = "model") -> dict[str, torch.Tensor]:
    """A state dict of the layer list (keys as `nn.Sequential(*layers)` names them, e.g. from
    `stagewise.load_full(checkpoint)`) under the transformers model's names: `0.embed_tokens.*` ->
    `model.embed_tokens.*`, `i.layer.*` -> `model.layers.{i-1}.*`, the last layer's `norm.*` -> `model.norm.*`
    and `lm_head.*` -> `lm_head.*`. GPT-2 (`config` None, a `GPT2Config` or a transformers GPT-2 config) goes
    through `gpt2.to_transformers_state_dict`."""
    if config is None or isinstance(config, GPT2Config) or getattr(config, "model_type", None) == "gpt2":
        return gpt2_state_dict(dict(state))
    last = max(int(k.split(".", 1)[0]) for k in state)
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        layer, name = key.split(".", 1)
        i = int(layer)
        if i == 0:
            out[f"{base_model_prefix}.{name}"] = t
        elif i == last:
            out[name if name.startswith("lm_head.") else f"{base_model_prefix}.{name}"] = t
        elif name.startswith("layer."):
            out[f"{base_model_prefix}.layers.{i - 1}.{name[len('layer.'):]}"] = t
        # other tensors of a decoder wrapper (a rotary buffer, when persistent) are rebuilt by the model
    return out


def to_transformers(state: Mapping[str, torch.Tensor], config: Any) -> nn.Module:
    """A transformers `*ForCausalLM` (eval mode) built from `config` (a transformers config, or its dict) with
    the weights of a layer-list state dict. Every weight of the model must come from the state (a tied LM head
    may be missing: it is the embedding). A native `GPT2Config` goes through `gpt2.to_transformers`."""
    if isinstance(config, GPT2Config):
        return gpt2_to_transformers(dict(state), config)
    transformers = require_transformers("exporting to Hugging Face")
    config = _as_config(config)
    dtype = next((t.dtype for t in state.values() if t.is_floating_point()), torch.float32)
    model = transformers.AutoModelForCausalLM.from_config(config).to(dtype)
    hf_state = to_transformers_state_dict(state, config, model.base_model_prefix)
    missing, unexpected = model.load_state_dict(hf_state, strict=False)
    tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(config, "tie_word_embeddings", False) \
        else set()
    expected_buffers = {k for k, _ in model.named_buffers()}
    missing = [k for k in missing if k not in tied and k not in expected_buffers]
    if missing or unexpected:
        raise ValueError(f"the state dict does not fit a {type(model).__name__} of this config: missing "
                         f"{missing[:5]}, unexpected {list(unexpected)[:5]}")
    return model.eval()


def _as_config(config: Any) -> Any:
    if isinstance(config, Mapping):
        transformers = require_transformers("exporting to Hugging Face")
        data = dict(config)
        return transformers.AutoConfig.for_model(data.pop("model_type"), **data)
    if config is None:
        raise ValueError("exporting needs the model's transformers config: from_transformers(model).config, or a "
                         "checkpoint written by `stagewise train` (it stores it)")
    return config


def config_dict(config: Any) -> dict[str, Any]:
    """A transformers config as a JSON-able dict (what `stagewise train` stores in its checkpoints)."""
    return json.loads(config.to_json_string(use_diff=False))


def save_pretrained(state: Mapping[str, torch.Tensor], out: str | PathLike[str], config: Any,
                    tokenizer: str | PathLike[str] | None = None) -> Path:
    """Write a layer-list state dict as a Hugging Face folder (config.json, model.safetensors, and `tokenizer`
    copied to tokenizer.json) that `AutoModelForCausalLM.from_pretrained(out)` loads with the same logits.
    `config` is the transformers config (`from_transformers(m).config`, or its dict) or a native `GPT2Config`.
    For a checkpoint, `stagewise.export(checkpoint, out)` reads it (and the config it carries) first."""
    model = to_transformers(state, config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    return out


# ------------------------------------------------------------------------- small models of each family

@dataclasses.dataclass(frozen=True)
class Family:
    """A family `stagewise train --model hf:NAME` builds from a small config (no download)."""

    model_type: str  # transformers' name for AutoConfig.for_model
    note: str
    overrides: dict[str, Any] = dataclasses.field(default_factory=dict)


SMALL = {"hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4, "num_attention_heads": 4,
         "num_key_value_heads": 2, "head_dim": 32}
FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "Llama 2/3: RMSNorm, SwiGLU, grouped-query attention, rotary"),
    "mistral": Family("mistral", "Mistral: Llama with sliding-window attention"),
    "qwen2": Family("qwen2", "Qwen2: Llama with q/k/v biases; tied embeddings", {"tie_word_embeddings": True}),
    "qwen3": Family("qwen3", "Qwen3: q/k RMSNorm per head; tied embeddings", {"tie_word_embeddings": True}),
    "gemma": Family("gemma", "Gemma: scaled embeddings, (1 + w) RMSNorm in float32, GeGLU; tied"),
    "gemma2": Family("gemma2", "Gemma 2: alternating sliding/full attention, logit soft-capping; tied",
                     {"sliding_window": 32, "query_pre_attn_scalar": 32}),
    "gemma3": Family("gemma3_text", "Gemma 3 (text): q/k norms, local and global rotary; tied",
                     {"sliding_window": 32, "query_pre_attn_scalar": 32}),
    "phi3": Family("phi3", "Phi-3: fused qkv and gate/up projections", {"pad_token_id": None}),
    "olmo2": Family("olmo2", "OLMo 2: post-norms, q/k RMSNorm", {"pad_token_id": None}),
}


def small_config(family: str, vocab_size: int, max_positions: int = 1024, **overrides: Any) -> Any:
    """A small transformers config of `family` (FAMILIES) with our vocabulary: 128 wide, 4 layers, 4 heads (2 for
    keys and values), like gpt2-tiny; `overrides` replace any field."""
    transformers = require_transformers(f"the Hugging Face model hf:{family}")
    if family not in FAMILIES:
        raise KeyError(f"unknown family hf:{family}; choose one of {', '.join('hf:' + f for f in FAMILIES)}")
    fam = FAMILIES[family]
    fields = {**SMALL, "vocab_size": vocab_size, "max_position_embeddings": max_positions, **fam.overrides,
              **overrides}
    return transformers.AutoConfig.for_model(fam.model_type, **fields)


def build(config: Any, *, seed: int | None = None, attn_implementation: str | None = None) -> nn.Module:
    """A freshly initialised `*ForCausalLM` of `config` (float32, train mode)."""
    transformers = require_transformers("building a Hugging Face model")
    if seed is not None:
        torch.manual_seed(seed)
    kwargs = {"attn_implementation": attn_implementation} if attn_implementation else {}
    return transformers.AutoModelForCausalLM.from_config(config, **kwargs).train()


def is_hf_model(name: str) -> bool:
    """Whether `--model name` means a Hugging Face model: `hf:FAMILY`, or a folder with a config.json (a built-in
    GPT-2 name wins over a folder of that name)."""
    return name.startswith("hf:") or (name not in CONFIGS and (Path(name).expanduser() / "config.json").is_file())


def load_model(name: str, vocab_size: int, max_positions: int = 1024, *, seed: int = 0,
               token_ids: Mapping[str, int | None] | None = None) -> nn.Module:
    """The transformers model `--model name` means: `hf:FAMILY` a small config of the family with `vocab_size`
    tokens (its bos/eos/pad ids from `token_ids`), freshly initialised from `seed`; or a local folder's weights."""
    if name.startswith("hf:"):
        ids = {k: v for k, v in (token_ids or {}).items() if v is not None}
        return build(small_config(name[3:], vocab_size, max_positions, **ids), seed=seed)
    return load_folder(name)


def folder_config(path: str | PathLike[str]) -> dict[str, Any]:
    """The config.json of a Hugging Face folder, as a dict (no transformers needed)."""
    return json.loads((Path(path).expanduser() / "config.json").read_text())


def layer_count(name: str) -> int:
    """Layers of the list `--model name` converts to: the embedding, one per decoder layer, the head."""
    if name.startswith("hf:"):
        family = FAMILIES.get(name[3:])
        return 2 + int((family.overrides if family else {}).get("num_hidden_layers", SMALL["num_hidden_layers"]))
    cfg = folder_config(name)
    return 2 + int(cfg.get("num_hidden_layers", cfg.get("n_layer", 0)))


def describe_models() -> str:
    """What `--model` takes, for `--list-models`."""
    lines = ["built-in GPT-2 (stagewise's own layers):"]
    for name, c in CONFIGS.items():
        lines.append(f"  {name:<14} {c.n_layer} layers, {c.n_embd} wide, {c.n_head} heads, "
                     f"{c.param_count() / 1e6:,.1f}M parameters at its vocabulary of {c.vocab_size}")
    width = SMALL["hidden_size"]
    lines.append(f"Hugging Face families (transformers, {INSTALL}): a small config built here ({width} wide, "
                 f"{SMALL['num_hidden_layers']} layers), vocabulary from the tokenizer:")
    for name, fam in FAMILIES.items():
        lines.append(f"  hf:{name:<11} {fam.note}")
    lines.append("a local Hugging Face folder: --model PATH (config.json and safetensors weights of a *ForCausalLM "
                 "that declares a pipeline plan, or a GPT-2; its tokenizer.json when present)")
    return "\n".join(lines)


def data_tokenizer(name: str, texts: list[str], vocab_size: int) -> Any:
    """The tokenizer `stagewise train --model name` uses: a Hugging Face folder's own tokenizer.json when it has
    one, else a BPE trained on `texts` (at most the folder model's vocabulary)."""
    from tokenizers import Tokenizer

    from stagewise.data import train_bpe

    if not name.startswith("hf:") and is_hf_model(name):
        path = Path(name).expanduser() / "tokenizer.json"
        if path.is_file():
            return Tokenizer.from_file(str(path))
        vocab_size = min(vocab_size, int(folder_config(name).get("vocab_size", vocab_size)))
    return train_bpe(texts, vocab_size=vocab_size)


def data_pad_id(tokenizer: Any, name: str) -> int:
    """The id to pad batches with: the tokenizer's <pad> or <|endoftext|>, else the folder config's pad or eos id,
    else 0 (right padding is masked out of the loss and never attended to by a real position, so any id works)."""
    from stagewise.data import pad_id

    try:
        return pad_id(tokenizer)
    except ValueError:
        pass
    cfg = folder_config(name) if not name.startswith("hf:") and is_hf_model(name) else {}
    ids = [cfg.get("pad_token_id"), cfg.get("eos_token_id")]
    return next((i for i in ids if isinstance(i, int)), 0)


def train_layers(name: str, tokenizer: Any, max_positions: int, seed: int) -> ModelLayers:
    """The layer list `stagewise train --model name` trains: `hf:FAMILY` built with the tokenizer's vocabulary
    and special ids, or a folder's weights (its vocabulary must cover the tokenizer's)."""
    from stagewise.data import eot_id

    vocab = tokenizer.get_vocab_size()
    eot = eot_id(tokenizer)
    ids = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": data_pad_id(tokenizer, name)}
    model = load_model(name, vocab, max(1024, max_positions), seed=seed, token_ids=ids)
    if model.config.vocab_size < vocab:
        raise ValueError(f"the model in {name} has {model.config.vocab_size} tokens, fewer than its tokenizer's "
                         f"{vocab}")
    return from_transformers(model)


def sample_model(name: str, batch: int, seq_len: int, vocab_size: int | None = None,
                 seed: int = 0) -> tuple[ModelLayers, Any, tuple[torch.Tensor, torch.Tensor]]:
    """(layers, loss_fn, (input_ids, labels)) of `--model name` for `stagewise plan` and `stagewise check`: random
    ids of `batch` x `seq_len`; `hf:FAMILY` with `vocab_size` tokens (8192 by default), a folder with its own."""
    from stagewise.models.gpt2 import lm_loss

    vocab = vocab_size or 8192
    if not name.startswith("hf:"):
        vocab = int(folder_config(name).get("vocab_size", vocab))
    layers = from_transformers(load_model(name, vocab, max(1024, seq_len), seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=g)
    labels = torch.randint(0, vocab, (batch, seq_len), generator=g)
    return layers, lm_loss, (ids, labels)


def export_config(layers: Any, native: GPT2Config | None = None, tokenizer: Any = None,
                  pretrained: str | None = None) -> dict[str, Any]:
    """What a checkpoint needs to be exported (`stagewise train` stores it in each checkpoint's extra["model"]): the
    transformers config as a dict, from a `ModelLayers`, or of the `pretrained` GPT-2 (name or folder, as loaded),
    else of a native GPT-2 (its bos/eos the tokenizer's <|endoftext|>)."""
    config = getattr(layers, "config", None)
    if config is None and pretrained is not None:
        config = require_transformers("exporting to Hugging Face").AutoConfig.from_pretrained(pretrained)
    if config is not None:
        return {"hf_config": config_dict(config)}
    if native is None:
        return {}
    from stagewise.data import eot_id

    eot = eot_id(tokenizer) if tokenizer is not None else None
    return {"hf_config": native_gpt2_config(native, eot, eot)}


def native_gpt2_config(cfg: GPT2Config, bos_token_id: int | None = None,
                       eos_token_id: int | None = None) -> dict[str, Any]:
    """The transformers GPT-2 config (as a dict) of a native `GPT2Config`, for exporting its checkpoints."""
    ids = cfg.vocab_size - 1 if bos_token_id is None else bos_token_id
    return {"model_type": "gpt2", "vocab_size": cfg.vocab_size, "n_positions": cfg.n_positions,
            "n_embd": cfg.n_embd, "n_layer": cfg.n_layer, "n_head": cfg.n_head, "resid_pdrop": cfg.dropout,
            "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout, "layer_norm_epsilon": cfg.layer_norm_epsilon,
            "tie_word_embeddings": cfg.tie_word_embeddings, "bos_token_id": ids,
            "eos_token_id": ids if eos_token_id is None else eos_token_id}


def load_folder(path: str | PathLike[str]) -> nn.Module:
    """A `*ForCausalLM` from a local Hugging Face folder (config.json and safetensors weights), train mode."""
    transformers = require_transformers(f"loading the Hugging Face folder {str(path)!r}")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise ValueError(f"{str(path)!r} is not a Hugging Face model folder: it has no config.json")
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(folder, local_files_only=True)
    except Exception as exc:  # a broken folder, an unknown architecture
        raise RuntimeError(f"could not load a causal LM from {str(path)!r}: {type(exc).__name__}: {exc}") from exc
    return model.train()
