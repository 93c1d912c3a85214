"""`stagewise export` (and `stagewise.export`): a checkpoint as a Hugging Face folder.

The checkpoint is read whole in this process (`stagewise.load_full`, files verified first), converted back to the
transformers model's names (`stagewise.models.hf.to_transformers`) and written with `save_pretrained`, so
`AutoModelForCausalLM.from_pretrained(out)` gives the checkpoint's logits. A checkpoint of `stagewise train`
carries the model's transformers config in its extra (`extra["model"]["hf_config"]`) and its run folder holds the
tokenizer (tokenizer.json), copied beside the weights; otherwise pass `config`.
"""

from __future__ import annotations

from os import PathLike
from pathlib import Path
from typing import Any


def export(checkpoint: str | PathLike[str], out: str | PathLike[str], config: Any = None,
           tokenizer: str | PathLike[str] | None = None) -> Path:
    """Write the checkpoint as a Hugging Face folder; returns `out`.

    `checkpoint` is a `stagewise train` run folder, a checkpoints root or one `step-N` folder (the newest intact
    checkpoint is taken). `config` (a transformers config, its dict, or `ModelLayers.config` from
    `stagewise.models.from_transformers`) replaces the one the checkpoint carries; `tokenizer` (a tokenizer.json)
    the run's."""
    from stagewise.models.hf import require_transformers, save_pretrained

    require_transformers("exporting to Hugging Face")  # before reading a large checkpoint
    state, stored, run_tokenizer = read_checkpoint(checkpoint)
    return save_pretrained(state, out, config if config is not None else stored,
                           tokenizer if tokenizer is not None else run_tokenizer)


def read_checkpoint(checkpoint: str | PathLike[str]) -> tuple[dict[str, Any], dict[str, Any] | None, Path | None]:
    """(the unsplit state dict, the transformers config it carries or None, the run's tokenizer.json or None)."""
    from stagewise.runtime.checkpoint import load_full
    from stagewise.runtime.checkpoint.collective import newest_intact

    path = Path(checkpoint)
    run = None
    if not (path / "manifest.json").exists() and (path / "checkpoints").is_dir():  # a run folder
        run, path = path, path / "checkpoints"
    folder, manifest = newest_intact(path)
    model = (manifest.get("extra") or {}).get("model") or {}
    run = run or (folder.parent.parent if folder.parent.name == "checkpoints" else None)
    tokenizer = run / "tokenizer.json" if run is not None and (run / "tokenizer.json").is_file() else None
    return load_full(folder), model.get("hf_config"), tokenizer
