"""Checkpoints keyed by the unsplit model's names: atomic, verified, resumable, loadable into any pipeline shape.

Layout. `pipe.save_checkpoint(root, step=K)` writes `root/step-0000000K/` (8 digits) and keeps the
newest `keep` (default 3) of the root's `step-*` folders; `pipe.save_checkpoint(folder)` writes the
checkpoint into `folder` itself. `stagewise train` uses `RUN/checkpoints/` as the root. A
checkpoint folder holds:

    manifest.json                     written last; see below
    weights-rank00000.safetensors     the tensors rank 0 stores, keyed by unsplit names ("0.wte.weight")
    weights-rank00001.safetensors     ... one per rank that stores any tensor
    optimizer-rank00000.pt            each rank's optimizer state, keyed by the same names
    extra.pt                          only when the caller's `extra` is not JSON (it holds tensors)

Names are those of `nn.Sequential(*layers).state_dict()` (parameters and persistent buffers),
independent of balance, schedule, virtual_stages, P and D, so a checkpoint loads into any other pipeline
shape. A tensor with several names (GPT-2's embedding tied to its head) is stored once, under its
name in the lowest layer; `aliases` and `ties` in the manifest lead its other names to it. Of D
data-parallel replicas only the first writes tensors; every rank loads.

The manifest (JSON) records: format and version; `step`; `schedule`, `microbatches`, `virtual_stages`,
`stages`, `balance`, `placement`, `P`, `D`, `world_size`; `precision` (the parameters' dtype:
"fp32", ...); `extra` (what the caller passed: the data position of `stagewise train`, and the slot
for further state dicts such as a loss scaler's: `extra={"data": {...}, "loss_scaler": {...}}`);
`rng` (every rank's torch CPU, CUDA when used, numpy and Python `random` states); `tensors` (name ->
file, shape, dtype), `aliases`, `ties`, `names` (every name in model order); `optimizer` (class,
which file holds each name's state and param group); `files` (bytes and sha256 of every file).

Why safetensors for weights and torch.save for the optimizer: safetensors loads without pickle,
maps the file and reads only the tensors a rank asks for (a re-shaped pipeline reads parts of
other ranks' files). Optimizer state is a nested dict with non-tensor values (Adam's `step`,
hyper-parameters with tuples, flags) that safetensors cannot hold; torch.save keeps it exactly and
`torch.load(weights_only=True, mmap=True)` reads it without arbitrary pickle and lazily.
torch.distributed.checkpoint is used only for what is split over data-parallel replicas (`shard=`: the
optimizer state, written shard by shard into `optimizer-dcp/` and re-sharded on load, see
`stagewise.runtime.checkpoint.sharded`): otherwise every tensor is whole and re-shaping is only "which rank
holds which name", and threads (`local_devices=`) have no process group.

Atomic: files go to a hidden staging folder (`.step-0000000K.partial`), each is fsynced as it is
written; after every rank has finished (a gather through the World), rank 0 writes the manifest,
fsyncs the folder and renames it into place, then fsyncs the parent. A save is never visible
half-written; a killed save leaves only the hidden staging folder, removed by the next save.

Damage: loading checks every file's size and sha256 against the manifest first; a missing,
truncated or altered file is refused with its name, unless `fallback=True` asks for the newest
intact older checkpoint (a line on stderr and the returned `skipped` say which were passed over).
"""

from stagewise.runtime.checkpoint import files
from stagewise.runtime.checkpoint.collective import load, load_full, newest_intact, save
from stagewise.runtime.checkpoint.files import CheckpointError, checkpoints_in, step_name

__all__ = ["CheckpointError", "checkpoints_in", "files", "load", "load_full", "newest_intact", "save", "step_name"]
