"""Files written in one pass: serialized straight from the tensors' memory to the file, hashed on the way, fsynced.

`safetensors.torch.save` and `torch.save` into a buffer each copy everything once more before the write;
on a 124M-parameter GPT-2 that extra copy was a third of the save. Here the safetensors layout (an
8-byte little-endian header length, a JSON header padded to 8 bytes, then every tensor's bytes in
header order) is streamed directly, and torch.save writes through a hashing file object.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch

SAFETENSORS_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
                      torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
                      torch.uint8: "U8", torch.bool: "BOOL"}


class HashingFile:
    """A binary file that hashes (sha256) and counts what is written to it."""

    def __init__(self, path: Path):
        self.f = open(path, "wb")  # noqa: SIM115 (closed by close())
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self.sha.update(view)
        self.size += len(view)
        return self.f.write(view)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> dict[str, Any]:
        """fsync and close; returns the manifest record (bytes, sha256)."""
        self.f.flush()
        os.fsync(self.f.fileno())
        self.f.close()
        return {"bytes": self.size, "sha256": self.sha.hexdigest()}


def _bytes_of(t: torch.Tensor) -> memoryview:
    flat = t.detach().cpu().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()) if flat.numel() else memoryview(b"")


def write_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> dict[str, Any]:
    """`tensors` as a safetensors file (readable by `safetensors.safe_open`); returns its record."""
    if any(t.dtype not in SAFETENSORS_DTYPES for t in tensors.values()):  # rarer dtypes: safetensors' own writer
        import safetensors.torch

        data = safetensors.torch.save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, metadata)
        out = HashingFile(path)
        out.write(data)
        return out.close()
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, t in tensors.items():
        size = t.numel() * t.element_size()
        header[name] = {"dtype": SAFETENSORS_DTYPES[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)
    out = HashingFile(path)
    try:
        out.write(struct.pack("<Q", len(head)))
        out.write(head)
        for t in tensors.values():
            out.write(_bytes_of(t))
    except BaseException:
        out.f.close()
        raise
    return out.close()


def write_torch(path: Path, obj: Any) -> dict[str, Any]:
    """`torch.save(obj)` into `path`, hashed as it is written; returns its record."""
    out = HashingFile(path)
    try:
        torch.save(obj, out)
    except BaseException:
        out.f.close()
        raise
    return out.close()
