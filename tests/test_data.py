"""Data without downloads: the built-in corpus, cached BPE tokenizers, length-sorted LM batches, clear errors."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from stagewise.data import (
    EOT_TOKEN,
    IGNORE_INDEX,
    PAD_TOKEN,
    LengthSortedBatches,
    builtin_corpus,
    cache_root,
    collate,
    corpus_key,
    encode_documents,
    eot_id,
    gpt2_tokenizer,
    load_squad_contexts,
    pad_id,
    read_text_files,
    repeat_batches,
    token_windows,
    train_bpe,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def corpus() -> list[str]:
    return builtin_corpus()


@pytest.fixture(scope="module")
def small(corpus: list[str]) -> list[str]:
    return corpus[:50]


@pytest.fixture(scope="module")
def tokenizer(small: list[str], tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return train_bpe(small, vocab_size=512, cache_dir=tmp_path_factory.mktemp("tok"))


def test_builtin_corpus_is_big_text(corpus: list[str]) -> None:
    assert len(corpus) > 500
    assert all(isinstance(t, str) for t in corpus)
    assert sum(len(t.encode()) for t in corpus) > 5 * 2**20
    assert any("def " in t for t in corpus[:20])


def test_tokenizer_is_cached_and_identical(small: list[str], tmp_path: Path) -> None:
    start = time.perf_counter()
    trained = train_bpe(small, vocab_size=512, cache_dir=tmp_path)
    train_s = time.perf_counter() - start
    assert len(list(tmp_path.glob("*.json"))) == 1
    start = time.perf_counter()
    loaded = train_bpe(small, vocab_size=512, cache_dir=tmp_path)
    load_s = time.perf_counter() - start
    assert loaded.to_str() == trained.to_str()
    assert loaded.encode(small[3]).ids == trained.encode(small[3]).ids
    assert load_s < 0.5 and load_s < train_s, (load_s, train_s)
    assert trained.get_vocab_size() == 512
    assert trained.token_to_id(EOT_TOKEN) == 0 and trained.token_to_id(PAD_TOKEN) == 1


def test_cache_key_and_location(small: list[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert corpus_key(small, 512) == corpus_key(list(small), 512)
    assert corpus_key(small, 512) != corpus_key(small, 1024)
    assert corpus_key(["ab", "c"], 1) != corpus_key(["a", "bc"], 1)
    monkeypatch.setenv("STAGEWISE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    train_bpe(small[:5], vocab_size=300)  # default folder: $STAGEWISE_CACHE/tokenizers
    assert len(list((tmp_path / "tokenizers").glob("*.json"))) == 1


def test_round_trip(tokenizer: Tokenizer, small: list[str]) -> None:
    text = small[7][:2000] + "\nnon-ASCII: héllo, 日本語, \U0001f40d\t  tabs and   spaces\n"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_special_token_helpers(tokenizer: Tokenizer) -> None:
    assert pad_id(tokenizer) == 1 and eot_id(tokenizer) == 0


def test_gpt2_tokenizer_only_from_local_files(tokenizer: Tokenizer, tmp_path: Path) -> None:
    found = gpt2_tokenizer()  # None here (offline, no HF cache); the real one where it is cached
    assert found is None or found.get_vocab_size() == 50257
    assert gpt2_tokenizer(tmp_path) is None
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    assert gpt2_tokenizer(tmp_path).to_str() == tokenizer.to_str()


def test_token_windows_cover_each_document(tokenizer: Tokenizer, small: list[str]) -> None:
    seq_len = 32
    doc = small[1]
    windows = token_windows([doc], tokenizer, seq_len)
    assert all(2 <= len(c) <= seq_len + 1 for c in windows)
    # consecutive windows overlap by one token: stitched back, they are the document plus <|endoftext|>
    stitched = torch.cat([windows[0], *(c[1:] for c in windows[1:])]).tolist()
    assert stitched == tokenizer.encode(doc).ids + [eot_id(tokenizer)]
    assert token_windows([""], tokenizer, seq_len) == []


def test_encoding_cache(tokenizer: Tokenizer, small: list[str], tmp_path: Path) -> None:
    first = encode_documents(small[:10], tokenizer, cache_dir=tmp_path)
    again = encode_documents(small[:10], tokenizer, cache_dir=tmp_path)
    assert len(list(tmp_path.glob("*.npz"))) == 1
    assert [d.tolist() for d in again] == [d.tolist() for d in first]
    assert all(d.dtype == torch.long for d in again)


def test_collate_shifts_and_masks_padding() -> None:
    x, y = collate([torch.tensor([5, 6, 7, 8]), torch.tensor([9, 10])], pad_id=1)
    assert x.tolist() == [[5, 6, 7], [9, 1, 1]]
    assert y.tolist() == [[6, 7, 8], [10, IGNORE_INDEX, IGNORE_INDEX]]


def test_length_sorted_batches(tokenizer: Tokenizer, small: list[str]) -> None:
    windows = token_windows(small, tokenizer, 64)
    batches = LengthSortedBatches(windows, batch_size=8, pad_id=pad_id(tokenizer), seed=3)
    assert len(batches) == -(-len(windows) // 8)
    padded = total = 0
    for x, y in batches:
        assert x.dtype == y.dtype == torch.long and x.shape == y.shape and x.shape[1] <= 64
        real = y != IGNORE_INDEX
        assert (x[:, 1:][real[:, 1:]] == y[:, :-1][real[:, 1:]]).all()  # labels are the inputs shifted by one
        assert (x[~real] == pad_id(tokenizer)).all()
        padded, total = padded + int((~real).sum()), total + y.numel()
    assert padded / total < 0.02
    # an unsorted batching of the same windows pads much more
    shuffled = [windows[i] for i in torch.randperm(len(windows), generator=torch.Generator().manual_seed(0))]
    unsorted = sum(int((collate(shuffled[i : i + 8], 1)[1] == IGNORE_INDEX).sum()) for i in range(0, len(windows), 8))
    assert unsorted > 3 * padded


def test_batches_are_deterministic_and_cover_every_sequence(tokenizer: Tokenizer, small: list[str]) -> None:
    windows = token_windows(small[:20], tokenizer, 48)
    a = LengthSortedBatches(windows, batch_size=4, pad_id=1, seed=7)
    b = LengthSortedBatches(windows, batch_size=4, pad_id=1, seed=7)
    assert a.batch_indices(0) == b.batch_indices(0) and a.batch_indices(0) != a.batch_indices(1)
    assert sorted(i for batch in a.batch_indices(2) for i in batch) == list(range(len(windows)))
    first, second = [x for x, _ in a], [x for x, _ in a]  # each iteration is a new epoch
    assert any(not torch.equal(p, q) for p, q in zip(first, second))
    b.set_epoch(1)
    assert all(torch.equal(p, q) for p, q in zip(second, (x for x, _ in b)))
    fixed = LengthSortedBatches(windows, batch_size=4, pad_id=1, shuffle=False)
    lengths = [len(windows[i]) for batch in fixed.batch_indices(0) for i in batch]
    assert lengths == sorted(lengths, reverse=True)  # the seed's order: longest first


def test_drop_last_and_repeat() -> None:
    seqs = [torch.arange(n + 2) for n in range(10)]
    batches = LengthSortedBatches(seqs, batch_size=4, pad_id=0, drop_last=True)
    assert len(batches) == 2 and all(x.shape[0] == 4 for x, _ in batches)
    assert len(list(repeat_batches(batches, steps=7))) == 7
    with pytest.raises(ValueError, match="no batches"):
        next(repeat_batches(LengthSortedBatches(seqs[:3], batch_size=4, pad_id=0, drop_last=True)))


def test_read_text_files(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_text("alpha")
    (tmp_path / "sub" / "b.md").write_text("beta")
    (tmp_path / "c.bin").write_bytes(b"\x00\x01")
    assert read_text_files(tmp_path) == ["alpha", "beta"]
    assert read_text_files(tmp_path / "a.txt") == ["alpha"]
    with pytest.raises(FileNotFoundError):
        read_text_files(tmp_path / "missing")


def test_squad_offline_error_is_clear(tmp_path: Path) -> None:
    # a fresh process: the HF libraries read offline mode and cache paths when imported
    env = {**os.environ, "HF_HOME": str(tmp_path), "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    code = "from stagewise.data import load_squad_contexts; load_squad_contexts()"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    try:
        import datasets  # noqa: F401
    except ImportError:
        assert "needs the `datasets` package" in proc.stderr
    else:
        assert "RuntimeError: could not load the SQuAD dataset" in proc.stderr
        assert "network access" in proc.stderr and "built-in corpus" in proc.stderr


def test_squad_without_datasets_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "datasets", None)  # makes `import datasets` raise ImportError
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_squad_contexts()
