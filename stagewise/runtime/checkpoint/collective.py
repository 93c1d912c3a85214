"""Saving and loading a checkpoint together: every rank of the World writes or reads its share.

Both run inside `world.run` and exchange small Python objects (`all_gather_object`) between
phases; every rank decides from the same gathered values, so all of them take the same branch.
A problem that every rank can see (a damaged file, a folder that cannot be written, a parameter
missing from the checkpoint) is returned, not raised, and raised afterwards as a
`CheckpointError`: the pipeline stays usable. A rank that dies mid-save ends the others through
the World's failure policy; the checkpoint it was writing is then never published.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import safe_open

from stagewise.runtime.checkpoint import files
from stagewise.runtime.checkpoint.files import CheckpointError
from stagewise.runtime.checkpoint.serialize import write_safetensors, write_torch
from stagewise.runtime.checkpoint.sharded import (
    DCP_FOLDER,
    copy_into,
    gathered,
    groups_payload,
    load_state,
    local_optimizer,
    on_shards,
    optimizer_class,
    save_state,
    shard_state,
    sharding_of,
    sync_groups,
)
from stagewise.runtime.checkpoint.state import (
    Entry,
    capture_rng,
    make_plan,
    optimizer_params,
    optimizer_payload,
    precision,
    restore_optimizer,
    restore_rng,
    source_name,
    stage_entries,
)
from stagewise.runtime.stage_set import StageSet
from stagewise.runtime.world import World
from stagewise.version import __version__

EXTRA_FILE = "extra.pt"


def weights_file(rank: int) -> str:
    return f"weights-rank{rank:05d}.safetensors"


def optimizer_file(rank: int) -> str:
    return f"optimizer-rank{rank:05d}.pt"


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _split_extra(extra: dict[str, Any] | None) -> tuple[dict[str, Any] | None, bytes | None]:
    """JSON-able extra state goes into the manifest; anything else (tensors) into extra.pt, if `load` can read it
    back (`torch.load(weights_only=True)`: tensors, numbers, strings, None, lists, tuples and dicts of them); else a
    ValueError names the first key that cannot be, before anything is written."""
    if extra is None:
        return None, None
    if not isinstance(extra, dict):
        raise ValueError(f"save_checkpoint: extra must be a dict, got {type(extra).__name__}")
    try:
        json.dumps(extra)
        return extra, None
    except (TypeError, ValueError):
        pass
    for key, value in extra.items():
        try:
            torch.load(io.BytesIO(_torch_bytes({key: value})), weights_only=True)
        except Exception as err:  # pickling errors, and what weights_only refuses
            where = _unreadable(value, f"extra[{key!r}]")
            raise ValueError(f"save_checkpoint: {where} cannot be saved so that load_checkpoint reads it back "
                             f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); extra may hold "
                             "tensors, numbers, strings, None, and lists, tuples and dicts of them (a state_dict() "
                             "is fine)") from None
    return None, _torch_bytes(extra)


def _unreadable(value: Any, path: str) -> str:
    """Where in `value` (at `path`) the first value of a type `weights_only` loading refuses is, with its type."""
    if isinstance(value, dict):
        for k, v in value.items():
            if not isinstance(k, (str, int, float, bool, type(None))):
                return f"{path} (its key {k!r} of type {type(k).__name__})"
            found = _unreadable(v, f"{path}[{k!r}]")
            if found != f"{path}[{k!r}]":
                return found
        return path
    if isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            found = _unreadable(v, f"{path}[{i}]")
            if found != f"{path}[{i}]":
                return found
        return path
    if isinstance(value, (str, int, float, bool, type(None), torch.Tensor, torch.dtype, torch.device, torch.Size)):
        return path
    return f"{path} (a {type(value).__name__}: {value!r:.60})"


def save(folder: str | Path, world: World, model: StageSet, optimizers: dict[int, torch.optim.Optimizer], *,
         step: int | None = None, extra: dict[str, Any] | None = None, keep: int | None = 3) -> Path:
    """Write a checkpoint of every rank's stages and optimizers (a collective); returns its folder.

    With `step`, `folder` is a checkpoint root and the checkpoint goes to `folder/step-NNNNNNNN`; the
    newest `keep` checkpoints of the root are kept (None: all). Without it, `folder` is the checkpoint."""
    folder = Path(folder)
    final = folder / files.step_name(step) if step is not None else folder
    tmp = files.staging(final)
    everyone = world.group(range(world.size))
    try:
        extra_json, extra_blob, refused = *_split_extra(extra), None
    except ValueError as err:  # rank 0's refusal stops every rank (the others are told in the collective below)
        extra_json, extra_blob, refused = None, None, str(err)
    schedule = model.schedule
    sharded = sharding_of(model)  # a sharded run: weights gathered, optimizer state by DCP (`sharded`)

    def on_rank(rank: int) -> str | None:
        first_replica = world.grid.coords(rank)[1] == 0
        mine = [et for st in model.of_rank(rank).values() for et in stage_entries(st)] if first_replica or sharded \
            else []
        ident = {id(t): e.identity for e, t in mine}
        opt = optimizers.get(rank) if first_replica or sharded else None
        if sharded is not None:  # every replica takes part in gathering the shards; the first writes them
            mine = gathered(mine)
            mine = mine if first_replica else []
        desc = {"entries": [e for e, _ in mine], "rng": capture_rng(world.device(rank)),
                "optimized": [ident[id(p)] for p in optimizer_params(opt)] if opt is not None else [],
                "optimizer": optimizer_class(opt) if opt is not None else None}
        everything = world.all_gather_object(rank, desc, everyone)
        plan = make_plan({r: d["entries"] for r, d in enumerate(everything) if d["entries"]},
                         {r: d["optimized"] for r, d in enumerate(everything) if d["optimized"]})
        error = refused if rank == 0 else None
        if rank == 0 and error is None:
            try:
                files.prepare_staging(final)
            except OSError as err:
                error = (f"rank 0 cannot create the checkpoint folder {tmp}: {err}. Save into a folder every rank "
                         "can write (on several machines: a filesystem they share)")
        if first := next((e for e in world.all_gather_object(rank, error, everyone) if e), None):
            return first
        records: dict[str, Any] = {}
        groups: dict[str, tuple[str, int]] = {}
        stated: list[str] = []  # names whose optimizer state this rank wrote
        path = tmp
        names = {i: plan.stored[x] for i, x in ident.items()}
        try:
            writes = {e.name: t for e, t in mine
                      if plan.writer[e.identity] == rank and plan.stored[e.identity] == e.name}
            if writes:
                path = tmp / weights_file(rank)
                records[path.name] = write_safetensors(path, writes, {"format": "pt", "writer": "stagewise"})
                _written(rank, path)
            if opt is not None and first_replica:
                own = {plan.stored[i] for i, w in plan.optimizer_writer.items() if w == rank}
                state = groups_payload(opt, names) if sharded else optimizer_payload(opt, names, own)
                path = tmp / optimizer_file(rank)
                records[path.name] = write_torch(path, state)
                groups = {n: (path.name, g) for g, group in enumerate(state["param_groups"]) for n in group["params"]}
                stated = sorted(state["state"])
                _written(rank, path)
            if rank == 0 and extra_blob is not None:
                path = tmp / EXTRA_FILE
                records[path.name] = files.write_durable(path, extra_blob)
                _written(rank, path)
        except OSError as err:
            error = f"rank {rank} cannot write checkpoint file {path} (folder {tmp}): {err}"
        if sharded is not None:  # the optimizer state where it lies: every rank's shards (a collective)
            path = tmp / DCP_FOLDER
            try:
                save_state(path, opt, names)
                if rank == 0:
                    for f in sorted(path.iterdir()):
                        size, digest = files.file_digest(f)
                        records[f"{DCP_FOLDER}/{f.name}"] = {"bytes": size, "sha256": digest}
            except Exception as err:
                error = error or f"rank {rank} cannot write the optimizer state to {path}: {err}"
        reports = world.all_gather_object(rank, {"files": records, "groups": groups, "stated": stated, "rank": rank,
                                                 "error": error}, everyone)
        errors = [r["error"] for r in reports if r["error"]]
        status = None
        if rank == 0:
            if errors:
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                manifest = _manifest(world, schedule, model, step, plan, everything, reports, extra_json, extra_blob)
                if sharded is not None and manifest["optimizer"] is not None:
                    manifest["optimizer"]["dcp"] = DCP_FOLDER  # the state is there, by "<name>/<key>"
                try:
                    files.publish(tmp, manifest, final)
                    if step is not None and keep:
                        files.prune(folder, keep, final)
                except OSError as err:
                    status = f"rank 0 could not publish checkpoint {final} (from {tmp}): {err}"
        status = world.all_gather_object(rank, status, everyone)[0]  # nobody returns before it is visible
        return "; ".join(errors) if errors else status

    results = world.run(lambda rank: on_shards(model, on_rank, rank), "saving a checkpoint")
    if msg := next((m for m in results.values() if m), None):
        raise CheckpointError(f"checkpoint {final} was not written: {msg}")
    return final


def _written(rank: int, path: Path) -> None:
    if files.on_file_written is not None:
        files.on_file_written(rank, path)


def _manifest(world: World, schedule: Any, model: StageSet, step: int | None, plan: Any,
              everything: list[dict[str, Any]], reports: list[dict[str, Any]],
              extra: dict[str, Any] | None, extra_blob: bytes | None) -> dict[str, Any]:
    entries: dict[str, Entry] = {e.name: e for d in everything for e in d["entries"]}
    optimizer_class = next((d["optimizer"] for d in everything if d["optimizer"]), None)
    groups = {n: list(v) for r in reports for n, v in r["groups"].items()}
    return {
        "format": files.FORMAT, "version": files.VERSION, "step": step, "created": time.time(),
        "stagewise": __version__, "torch": torch.__version__,
        "schedule": schedule.name, "microbatches": schedule.microbatches, "virtual_stages": schedule.virtual_stages,
        "stages": schedule.num_stages, "balance": [hi - lo for lo, hi in model.layer_ranges],
        "placement": list(schedule.placement), "P": world.grid.pipeline, "D": world.grid.data,
        "world_size": world.size, "precision": precision(list(entries.values())),
        "extra": extra, "extra_file": EXTRA_FILE if extra_blob is not None else None,
        "rng": {str(r): d["rng"] for r, d in enumerate(everything)},
        "tensors": {name: {"file": weights_file(plan.writer[e.identity]), "shape": list(e.shape), "dtype": e.dtype}
                    for name in plan.order if (e := entries[name]).name == plan.stored[e.identity]},
        "aliases": plan.aliases, "ties": plan.ties, "names": plan.order,
        "optimizer": None if optimizer_class is None else {
            "class": optimizer_class,
            "state": {n: optimizer_file(r["rank"]) for r in reports for n in r["stated"]},
            "groups": groups},
        "files": {n: rec for r in reports for n, rec in sorted(r["files"].items())},
    }


# ---- loading ---------------------------------------------------------------------------------------------

def _damaged(folder: Path, problems: list[str], fallback_root: Path) -> str:
    return (f"checkpoint {folder} is damaged: {'; '.join(problems)}. Nothing was loaded. To load the newest intact "
            f"checkpoint instead, call load_checkpoint('{fallback_root}', fallback=True) (stagewise train: "
            "--resume RUN --fallback), or put the file back from a copy")


def load(path: str | Path, world: World, model: StageSet, optimizers: dict[int, torch.optim.Optimizer], *,
         fallback: bool = False, strict: bool = True) -> dict[str, Any]:
    """Load a checkpoint into every rank's stages and optimizers and restore the generators (a collective).

    `path` is a checkpoint folder or a root (its newest checkpoint is loaded). Every file is checked against
    the manifest's size and sha256 first (the ranks share the work); a damaged checkpoint is refused, or
    with `fallback` the next older one is tried. Returns the manifest, with `path` (the checkpoint loaded),
    `skipped` (damaged ones passed over, with why) and `extra` (what the saver passed)."""
    path = Path(path)
    tried = [Path(p) for p in world.compute_once(lambda: [str(p) for p in files.candidates(path)])]
    if not tried:
        raise CheckpointError(f"no checkpoint in {path}: expected a folder with {files.MANIFEST}, or a checkpoint "
                              f"root holding {files.STEP_PREFIX}NNNNNNNN folders (or a run folder with checkpoints/)")
    everyone = world.group(range(world.size))
    root = tried[0].parent if files.parse_step(tried[0].name) is not None else tried[0]

    def on_rank(rank: int) -> dict[str, Any]:
        skipped: list[tuple[str, list[str]]] = []
        chosen, manifest = None, None
        for folder in tried:
            manifest, problem = files.read_manifest(folder)
            problems = [problem] if problem else _verify_share(folder, manifest, rank, world.size)
            found = [p for ps in world.all_gather_object(rank, problems, everyone) for p in ps]
            if not found:
                chosen = folder
                break
            if not fallback:
                return {"error": _damaged(folder, found, root)}
            skipped.append((str(folder), found))
        if chosen is None or manifest is None:
            why = " | ".join(f"{f}: {'; '.join(p)}" for f, p in skipped)
            return {"error": f"no intact checkpoint in {path}: {why}"}
        mine = [et for st in model.of_rank(rank).values() for et in stage_entries(st)]
        sources, problems = _match(mine, manifest, optimizers.get(rank))
        gathered = world.all_gather_object(rank, (problems, sorted(set(sources.values()))), everyone)
        problems = sorted({p for ps, _ in gathered for p in ps})
        if strict and (unused := set(manifest["tensors"]) - {n for _, ns in gathered for n in ns}):
            problems.append(f"the checkpoint holds {len(unused)} tensor(s) this model does not have, e.g. "
                            f"{sorted(unused)[:5]} (load_checkpoint(..., strict=False) ignores them)")
        if problems:
            return {"error": f"checkpoint {chosen} does not fit this model: " + "; ".join(problems[:10])}
        _load_weights(chosen, mine, sources, manifest)
        index, opt = manifest["optimizer"], optimizers.get(rank)
        if index is not None and (opt is not None or index.get("dcp")):  # DCP's load is a collective of all ranks
            _load_optimizer(chosen, opt, {id(t): sources[e.name] for e, t in mine}, manifest)
        if rank == world.local_ranks[0] and str(rank) in manifest["rng"]:
            restore_rng(manifest["rng"][str(rank)], world.device(rank))
        return {"path": str(chosen), "skipped": skipped}

    results = world.run(lambda rank: on_shards(model, on_rank, rank), "loading a checkpoint")
    first = results[world.local_ranks[0]]
    if msg := next((r["error"] for r in results.values() if "error" in r), None):
        raise CheckpointError(msg)
    manifest, _ = files.read_manifest(Path(first["path"]))
    assert manifest is not None
    if manifest["extra_file"]:
        manifest["extra"] = torch.load(Path(first["path"]) / manifest["extra_file"], weights_only=True)
    manifest.update(path=first["path"], skipped=first["skipped"])
    if first["skipped"] and 0 in world.local_ranks:
        for folder, why in first["skipped"]:
            print(f"stagewise: skipped damaged checkpoint {folder}: {'; '.join(why)}", file=sys.stderr, flush=True)
        print(f"stagewise: loaded {first['path']} (step {manifest['step']}) instead", file=sys.stderr, flush=True)
    return manifest


def _verify_share(folder: Path, manifest: dict[str, Any], rank: int, size: int) -> list[str]:
    """Check this rank's share of the files (every size-th one): the ranks hash the checkpoint together."""
    listed = sorted(manifest["files"].items())
    return [p for i, (name, rec) in enumerate(listed) if i % size == rank
            and (p := files.verify(folder, name, rec)) is not None]


def _match(mine: list[tuple[Entry, torch.Tensor]], manifest: dict[str, Any],
           opt: torch.optim.Optimizer | None) -> tuple[dict[str, str], list[str]]:
    """Where each of this rank's tensors comes from in the checkpoint, and what does not fit."""
    sources, problems = {}, []
    for e, _ in mine:
        src = source_name(e, manifest)
        if src is None:
            problems.append(f"{e.name} is not in the checkpoint")
            continue
        shape = tuple(manifest["tensors"][src]["shape"])
        if shape != e.shape:
            problems.append(f"{e.name} has shape {list(e.shape)} here, {list(shape)} in the checkpoint ({src})")
        sources[e.name] = src
    saved = (manifest["optimizer"] or {}).get("class")
    if opt is not None and saved is not None and saved != optimizer_class(opt):
        problems.append(f"the optimizer is {optimizer_class(opt)} here, {saved} in the checkpoint")
    return sources, problems


def _load_weights(folder: Path, mine: list[tuple[Entry, torch.Tensor]], sources: dict[str, str],
                  manifest: dict[str, Any]) -> None:
    by_file: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for e, t in mine:
        src = sources[e.name]
        by_file.setdefault(manifest["tensors"][src]["file"], []).append((src, t))
    with torch.no_grad():
        for name, wanted in by_file.items():
            with safe_open(str(folder / name), framework="pt") as f:
                for src, t in wanted:
                    copy_into(t, f.get_tensor(src))  # a DTensor (a sharded run): its own shard


def _load_optimizer(folder: Path, opt: torch.optim.Optimizer | None, names: dict[int, str],
                    manifest: dict[str, Any]) -> None:
    index = manifest["optimizer"]
    dcp_state = load_state(folder / index["dcp"], opt, names) if index.get("dcp") else None  # (a collective)
    if opt is None:
        return
    wanted = [names[id(p)] for p in optimizer_params(opt)]
    payloads: dict[str, Any] = {}

    def payload(name: str) -> Any:
        if name not in payloads:
            payloads[name] = torch.load(folder / name, map_location="cpu", weights_only=True, mmap=True)
        return payloads[name]

    groups, state = {}, {}
    for n in wanted:
        if n in index["groups"]:
            file, g = index["groups"][n]
            groups[n] = payload(file)["param_groups"][g]
        if dcp_state is None and n in index["state"]:
            saved = payload(index["state"][n])["state"][n]
            state[n] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in saved.items()}
    state = dcp_state if dcp_state is not None else state
    shard_state(opt, names, state)  # whole states (an unsharded run's) split as their DTensor parameters
    restore_optimizer(local_optimizer(opt), names, groups, state)  # ZeroRedundancyOptimizer: its local one
    sync_groups(opt)


def load_full(path: str | Path, fallback: bool = False) -> dict[str, torch.Tensor]:
    """The unsplit model's state dict from a checkpoint (folder or root), in one process, no World needed:
    every name `nn.Sequential(*layers).state_dict()` has, a tied or shared tensor under each of its names
    (the same tensor object). Files are verified first, as `load` does."""
    folder, manifest = newest_intact(Path(path), fallback)
    stored: dict[str, torch.Tensor] = {}
    for name in sorted({rec["file"] for rec in manifest["tensors"].values()}):
        stored.update(safetensors.torch.load_file(str(folder / name)))
    return {name: stored[manifest["aliases"].get(name, name)] for name in manifest["names"]}


def newest_intact(path: Path, fallback: bool = False) -> tuple[Path, dict[str, Any]]:
    """(folder, manifest) of the checkpoint `path` names, fully verified in this process; with `fallback` the
    newest intact one when it is damaged (a note on stderr says which)."""
    tried = files.candidates(path)
    if not tried:
        raise CheckpointError(f"no checkpoint in {path}")
    root = tried[0].parent if files.parse_step(tried[0].name) is not None else tried[0]
    skipped = []
    for folder in tried:
        manifest, problem = files.read_manifest(folder)
        problems = [problem] if problem else [p for n, rec in sorted(manifest["files"].items())
                                              if (p := files.verify(folder, n, rec)) is not None]
        if not problems:
            if skipped:
                print(f"stagewise: skipped damaged {', '.join(skipped)}; using {folder}", file=sys.stderr)
            return folder, manifest
        if not fallback:
            raise CheckpointError(_damaged(folder, problems, root))
        skipped.append(f"{folder} ({'; '.join(problems)})")
    raise CheckpointError(f"no intact checkpoint in {path}: {' | '.join(skipped)}")
