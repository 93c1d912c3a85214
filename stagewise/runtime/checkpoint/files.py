"""Where checkpoints live on disk and how they get there: the layout, durable writes, publication, damage.

A checkpoint is one folder. It is built under a hidden staging name beside its final name
(`.step-00000006.partial`), every file and the folder are fsynced, the manifest is written last,
and one `rename` makes it visible; nothing else in this module changes a visible checkpoint,
except `prune`, which first renames a folder to a hidden name and only then deletes it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
STEP_PREFIX = "step-"
FORMAT = "stagewise-checkpoint"
VERSION = 1

# A test hook: called as `on_file_written(rank, path)` after each file a rank has written and fsynced,
# so a test can hold or kill a rank at a known point in the middle of a save.
on_file_written: Callable[[int, Path], None] | None = None


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or loaded; the message names the file and what to do."""


def step_name(step: int) -> str:
    """The folder name of the checkpoint of step `step` inside a run's checkpoint root."""
    return f"{STEP_PREFIX}{step:08d}"


def parse_step(name: str) -> int | None:
    """The step of a `step-NNNNNNNN` folder name, None for any other name."""
    if not name.startswith(STEP_PREFIX):
        return None
    tail = name[len(STEP_PREFIX):]
    return int(tail) if tail.isdigit() else None


def staging(final: Path) -> Path:
    """The hidden folder a checkpoint is built in before it becomes `final`."""
    return final.with_name(f".{final.name}.partial")


def fsync_dir(path: Path) -> None:
    """Make the folder's entries (files created, renamed, removed in it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_durable(path: Path, data: bytes) -> dict[str, Any]:
    """Write `data` to `path` and fsync it; returns its manifest record (bytes, sha256)."""
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def file_digest(path: Path) -> tuple[int, str]:
    """(size in bytes, sha256 hex) of a file, read in 8 MiB pieces."""
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def prepare_staging(final: Path) -> Path:
    """An empty staging folder for `final` (a stale one, left by a killed save, is removed first)."""
    tmp = staging(final)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: Path, manifest: dict[str, Any], final: Path) -> None:
    """Write the manifest last, fsync, and make `tmp` visible as `final` with one rename.

    A `final` that already exists (saving the same step or folder again) is first moved to a
    hidden name and deleted after the new one is in place: at every instant `final` is either
    the old checkpoint, the new one, or absent, never a mixture."""
    sealed = {**manifest, "manifest_sha256": manifest_digest(manifest)}
    write_durable(tmp / MANIFEST, json.dumps(sealed, indent=1).encode())
    fsync_dir(tmp)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.replaced")
        if old.exists():
            shutil.rmtree(old)
        os.rename(final, old)
    os.rename(tmp, final)
    fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def manifest_digest(manifest: dict[str, Any]) -> str:
    """sha256 of the manifest's content (without this digest), so a manifest altered in place is caught too."""
    body = {k: v for k, v in manifest.items() if k != "manifest_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def checkpoints_in(root: Path) -> list[tuple[int, Path]]:
    """The visible `step-N` folders of a checkpoint root, newest (highest step) first."""
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if p.is_dir() and (s := parse_step(p.name)) is not None]
    return sorted(found, reverse=True)


def candidates(path: Path) -> list[Path]:
    """The checkpoints `path` names, in the order a load tries them: a checkpoint folder alone, or
    followed by its older siblings (for a fallback); a root's checkpoints newest first. A run folder
    that holds `checkpoints/` stands for that root."""
    if (path / MANIFEST).exists() or (parse_step(path.name) is not None and path.is_dir()):
        step = parse_step(path.name)
        older = [p for s, p in checkpoints_in(path.parent) if step is not None and s < step]
        return [path, *older]
    found = checkpoints_in(path)
    if not found and (path / "checkpoints").is_dir():
        found = checkpoints_in(path / "checkpoints")
    return [p for _, p in found]


def read_manifest(folder: Path) -> tuple[dict[str, Any] | None, str | None]:
    """(manifest, None) or (None, what is wrong with it)."""
    path = folder / MANIFEST
    if not path.exists():
        return None, f"{path} is missing (a save that never finished, or a folder that is not a checkpoint)"
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        return None, f"{path} cannot be read ({type(err).__name__}: {err}): it is truncated or overwritten"
    if manifest.get("format") != FORMAT:
        return None, f"{path} is not a stagewise checkpoint manifest (format {manifest.get('format')!r})"
    if manifest.get("manifest_sha256") != manifest_digest(manifest):
        return None, f"{path} fails its own checksum (manifest_sha256): it was altered after the save"
    if manifest.get("version", 0) > VERSION:
        return None, (f"{path} has format version {manifest['version']}; this stagewise reads up to {VERSION}: "
                      "upgrade stagewise")
    return manifest, None


def verify(folder: Path, name: str, record: dict[str, Any]) -> str | None:
    """None when `folder/name` has the size and sha256 the manifest records, else what is wrong."""
    path = folder / name
    if not path.exists():
        return f"{path} is missing (the manifest lists it)"
    try:
        size, digest = file_digest(path)
    except OSError as err:
        return f"{path} cannot be read: {err}"
    if size != record["bytes"]:
        return f"{path} is truncated or overwritten: {size} bytes, the manifest says {record['bytes']}"
    if digest != record["sha256"]:
        return f"{path} fails its checksum: sha256 {digest[:16]}..., the manifest says {record['sha256'][:16]}..."
    return None


def prune(root: Path, keep: int, protect: Path) -> None:
    """Keep the newest `keep` checkpoints of `root` (and always `protect`); older ones are first renamed
    to a hidden name, then deleted, so a crash while deleting never leaves a visible damaged one."""
    for _, path in checkpoints_in(root)[keep:]:
        if path.resolve() == protect.resolve():
            continue
        doomed = path.with_name(f".{path.name}.deleting")
        os.rename(path, doomed)
        shutil.rmtree(doomed, ignore_errors=True)
    for stale in root.glob(f".{STEP_PREFIX}*.deleting"):  # left by an earlier crash
        shutil.rmtree(stale, ignore_errors=True)
