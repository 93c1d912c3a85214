"""Models as lists of layers that a pipeline can cut anywhere: GPT-2, native or converted from transformers."""

from stagewise.models.gpt2 import (
    CONFIGS,
    TIE_KEY,
    CausalSelfAttention,
    GPT2Block,
    GPT2Config,
    GPT2Embedding,
    GPT2Head,
    config,
    count_parameters,
    from_transformers,
    gpt2_layers,
    lm_loss,
    load_pretrained,
    tie_head,
    to_transformers,
    to_transformers_state_dict,
)
from stagewise.models.losses import causal_lm_loss

__all__ = [
    "CONFIGS",
    "TIE_KEY",
    "CausalSelfAttention",
    "GPT2Block",
    "GPT2Config",
    "GPT2Embedding",
    "GPT2Head",
    "causal_lm_loss",
    "config",
    "count_parameters",
    "from_transformers",
    "gpt2_layers",
    "lm_loss",
    "load_pretrained",
    "tie_head",
    "to_transformers",
    "to_transformers_state_dict",
]
