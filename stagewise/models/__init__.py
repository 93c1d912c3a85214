"""Models as lists of layers that a pipeline can cut anywhere: GPT-2 (native), and any transformers causal LM that
declares a pipeline plan (`from_transformers`, and back: `save_pretrained`, `stagewise.export`)."""

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
    gpt2_layers,
    lm_loss,
    load_pretrained,
    tie_head,
)
from stagewise.models.hf import (
    FAMILIES,
    ModelLayers,
    from_transformers,
    save_pretrained,
    small_config,
    to_transformers,
    to_transformers_state_dict,
)
from stagewise.models.losses import CausalLMLoss, causal_lm_loss

__all__ = [
    "CausalLMLoss",
    "CONFIGS",
    "TIE_KEY",
    "CausalSelfAttention",
    "FAMILIES",
    "GPT2Block",
    "GPT2Config",
    "GPT2Embedding",
    "GPT2Head",
    "ModelLayers",
    "causal_lm_loss",
    "config",
    "count_parameters",
    "from_transformers",
    "gpt2_layers",
    "lm_loss",
    "load_pretrained",
    "save_pretrained",
    "small_config",
    "tie_head",
    "to_transformers",
    "to_transformers_state_dict",
]
