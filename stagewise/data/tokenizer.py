"""Tokenizers that need no download: byte-level BPE trained on the corpus (cached), or GPT-2's if cached locally."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Sequence
from os import PathLike
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOT_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS: tuple[str, ...] = (EOT_TOKEN, PAD_TOKEN)  # ids 0 and 1 in every tokenizer train_bpe makes
_FORMAT = "bytelevel-bpe-v1"  # part of the cache key: change it when the training recipe changes


def cache_root() -> Path:
    """Root of stagewise's caches: $STAGEWISE_CACHE, else ~/.cache/stagewise."""
    root = os.environ.get("STAGEWISE_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "stagewise"


def corpus_key(texts: Sequence[str], *settings: object) -> str:
    """Hash of the texts' contents and of `settings` (what else shapes the cached result): a cache file name."""
    h = hashlib.blake2b(repr((len(texts), *settings)).encode(), digest_size=16)
    for text in texts:
        data = text.encode("utf-8", errors="replace")
        h.update(len(data).to_bytes(8, "little"))  # the length keeps ["ab", "c"] and ["a", "bc"] apart
        h.update(data)
    return h.hexdigest()


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """write(tmp) then rename to `path`: ranks may build the same cache file at once; none reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp{path.suffix}")
    write(tmp)
    os.replace(tmp, path)


def train_bpe(
    texts: Sequence[str],
    vocab_size: int = 8192,
    cache_dir: str | PathLike[str] | None = None,
    min_frequency: int = 2,
) -> Tokenizer:
    """A byte-level BPE (GPT-2's pre-tokenization, any text encodes) with <|endoftext|>=0 and <pad>=1.

    Trained once per corpus and size, then loaded from `cache_dir` (default cache_root() / "tokenizers").
    The vocabulary can end up smaller than `vocab_size` on a small corpus: use get_vocab_size().
    """
    folder = Path(cache_dir) if cache_dir is not None else cache_root() / "tokenizers"
    path = folder / f"bpe{vocab_size}-{corpus_key(texts, _FORMAT, vocab_size, min_frequency)}.json"
    if path.is_file():
        return Tokenizer.from_file(str(path))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, so nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    atomic_write(path, lambda tmp: tok.save(str(tmp)))
    return tok


def gpt2_tokenizer(path: str | PathLike[str] | None = None) -> Tokenizer | None:
    """GPT-2's own tokenizer (50,257 tokens): from a tokenizer.json file or folder, else the local HF cache.

    Returns None when no copy is on this machine; nothing is downloaded.
    """
    if path is not None:
        p = Path(path)
        p = p / "tokenizer.json" if p.is_dir() else p
        return Tokenizer.from_file(str(p)) if p.is_file() else None
    # Looked up directly: transformers' GPT2TokenizerFast.from_pretrained("gpt2", local_files_only=True)
    # returns an empty tokenizer (1 token) instead of failing when the files are missing (transformers 5.x).
    from huggingface_hub import try_to_load_from_cache

    for repo in ("openai-community/gpt2", "gpt2"):
        hit = try_to_load_from_cache(repo, "tokenizer.json")
        if isinstance(hit, str) and Path(hit).is_file():
            return Tokenizer.from_file(hit)
    return None


def pad_id(tokenizer: Tokenizer) -> int:
    """The id to pad with: <pad>, else <|endoftext|> (GPT-2's tokenizer has no pad token, as in the seed)."""
    for token in (PAD_TOKEN, EOT_TOKEN):
        i = tokenizer.token_to_id(token)
        if i is not None:
            return i
    raise ValueError(f"tokenizer has neither {PAD_TOKEN!r} nor {EOT_TOKEN!r}")


def eot_id(tokenizer: Tokenizer) -> int | None:
    """The id of <|endoftext|>, which separates documents, or None if the tokenizer lacks it."""
    return tokenizer.token_to_id(EOT_TOKEN)
