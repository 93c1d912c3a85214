"""Data that needs no download: corpora, tokenizers trained on them, and length-sorted LM batches."""

from stagewise.data.batches import (
    IGNORE_INDEX,
    LengthSortedBatches,
    collate,
    encode_documents,
    repeat_batches,
    token_windows,
)
from stagewise.data.corpus import TEXT_SUFFIXES, builtin_corpus, load_squad_contexts, read_text_files
from stagewise.data.split import split_texts
from stagewise.data.tokenizer import (
    EOT_TOKEN,
    PAD_TOKEN,
    SPECIAL_TOKENS,
    cache_root,
    corpus_key,
    eot_id,
    gpt2_tokenizer,
    pad_id,
    train_bpe,
)

__all__ = [
    "EOT_TOKEN",
    "IGNORE_INDEX",
    "PAD_TOKEN",
    "SPECIAL_TOKENS",
    "TEXT_SUFFIXES",
    "LengthSortedBatches",
    "builtin_corpus",
    "collate",
    "cache_root",
    "corpus_key",
    "encode_documents",
    "eot_id",
    "gpt2_tokenizer",
    "load_squad_contexts",
    "pad_id",
    "read_text_files",
    "repeat_batches",
    "split_texts",
    "token_windows",
    "train_bpe",
]
