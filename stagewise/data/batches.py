"""Language-model batches: documents cut into token chunks, batched by length, padding masked out of the loss."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from os import PathLike
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch
from tokenizers import Tokenizer

from stagewise.data.tokenizer import atomic_write, corpus_key, eot_id

IGNORE_INDEX = -100  # the label F.cross_entropy skips (lm_loss's ignore_index)
T = TypeVar("T")


def encode_documents(
    texts: Sequence[str], tokenizer: Tokenizer, cache_dir: str | PathLike[str] | None = None
) -> list[torch.Tensor]:
    """Each text's token ids as an int64 1-D tensor, no special tokens added.

    Encoding runs at about 4 MB of text per second on 2 cores; with `cache_dir` (e.g. cache_root() / "tokens")
    the ids are kept on disk per (texts, tokenizer) and later runs load them in milliseconds.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"ids-{corpus_key(texts, 'ids-v1', tokenizer.to_str())}.npz"
        if path.is_file():
            with np.load(path) as f:
                flat, lengths = torch.from_numpy(f["ids"].astype(np.int64)), f["lengths"].tolist()
            return list(torch.split(flat, lengths))
    docs = [torch.tensor(enc.ids, dtype=torch.long) for enc in tokenizer.encode_batch_fast(list(texts), False)]
    if path is not None:
        flat32 = torch.cat(docs).numpy().astype(np.int32) if docs else np.zeros(0, np.int32)  # vocab < 2**31
        lengths = np.array([len(d) for d in docs], dtype=np.int64)
        atomic_write(path, lambda tmp: np.savez(tmp, ids=flat32, lengths=lengths))
    return docs


def token_windows(
    texts: Sequence[str],
    tokenizer: Tokenizer,
    seq_len: int,
    append_eot: bool = True,
    cache_dir: str | PathLike[str] | None = None,
) -> list[torch.Tensor]:
    """Each document's ids (int64, 1-D) cut into chunks of at most seq_len + 1 tokens.

    Chunk k of a document covers tokens [k * seq_len, (k + 1) * seq_len]: consecutive chunks share one
    token, so every next-token pair of the document is in exactly one chunk. <|endoftext|> is appended
    to each document (when the tokenizer has it) so the model sees where documents end. Chunks of fewer
    than 2 tokens hold no pair and are left out. `cache_dir` caches the encoding (see encode_documents).
    """
    if seq_len < 1:
        raise ValueError(f"seq_len must be >= 1, got {seq_len}")
    eot = eot_id(tokenizer) if append_eot else None
    windows: list[torch.Tensor] = []
    for ids in encode_documents(texts, tokenizer, cache_dir):
        if eot is not None:
            ids = torch.cat([ids, ids.new_tensor([eot])])
        # views into one tensor per document: no copy per chunk
        windows.extend(ids[s : s + seq_len + 1] for s in range(0, max(len(ids) - 1, 0), seq_len))
    return windows


def collate(sequences: Sequence[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad sequences into (input_ids (B, T), labels (B, T)), T = longest length - 1.

    labels are the inputs shifted left by one; pad positions get IGNORE_INDEX, so padding never counts
    in the loss, and since padding is on the right, causal attention keeps it out of real positions.
    """
    t = max(len(s) for s in sequences) - 1
    inputs = torch.full((len(sequences), t), pad_id, dtype=torch.long)
    labels = torch.full((len(sequences), t), IGNORE_INDEX, dtype=torch.long)
    for row, s in enumerate(sequences):
        inputs[row, : len(s) - 1] = s[:-1]
        labels[row, : len(s) - 1] = s[1:]
    return inputs, labels


class LengthSortedBatches:
    """Batches of similar-length sequences (little padding), as (input_ids (B, T), labels (B, T)) int64.

    Every epoch (each iter()) sequences are shuffled, stably sorted by length (longest first) and cut
    into batches of `batch_size`; then the batch order is shuffled. Shuffles depend only on (seed, epoch),
    so separate processes that build the same object (first and last pipeline stage) see the same batches.
    With shuffle=False it is the seed's order: longest first, fixed. drop_last drops the one short batch.
    """

    def __init__(
        self,
        sequences: Sequence[torch.Tensor],
        batch_size: int,
        pad_id: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
    ):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if any(len(s) < 2 for s in sequences):
            raise ValueError("every sequence needs at least 2 tokens (one input and its next-token label)")
        self.sequences, self.batch_size, self.pad_id = sequences, batch_size, pad_id
        self.shuffle, self.seed, self.drop_last = shuffle, seed, drop_last
        self.epoch = 0
        self._lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)

    def __len__(self) -> int:
        n, b = len(self.sequences), self.batch_size
        return n // b if self.drop_last else -(-n // b)

    def set_epoch(self, epoch: int) -> None:
        """Make the next iter() produce epoch `epoch`'s order (to resume a run)."""
        self.epoch = epoch

    def batch_indices(self, epoch: int) -> list[list[int]]:
        """Indices into `sequences` of every batch of `epoch`, in the order they are yielded."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        order = torch.randperm(len(self.sequences), generator=g) if self.shuffle else torch.arange(len(self.sequences))
        # stable sort: equal lengths keep the shuffled order, so batches of full-length chunks mix documents
        order = order[torch.sort(self._lengths[order], descending=True, stable=True).indices].tolist()
        batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        if self.shuffle:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        batches = self.batch_indices(self.epoch)
        self.epoch += 1
        return (collate([self.sequences[i] for i in b], self.pad_id) for b in batches)


def repeat_batches(batches: Iterable[T], steps: int | None = None) -> Iterator[T]:
    """Iterate `batches` epoch after epoch (a new order each epoch), stopping after `steps` items if given."""
    done = 0
    while steps is None or done < steps:
        empty = True
        for item in batches:
            if steps is not None and done >= steps:
                return
            empty = False
            done += 1
            yield item
        if empty:
            raise ValueError("no batches to repeat (empty data, or fewer sequences than batch_size with drop_last)")
