"""Where `stagewise train` records a run (rank 0): metrics.jsonl always, TensorBoard event files with `--tensorboard`
(`torch.utils.tensorboard`, the optional `tensorboard` package), Weights & Biases with `--wandb PROJECT` (only when
its `wandb` client is installed; never required).

Every record is one step's scalars: `loss`, `val_loss` and `val_perplexity` (at evaluations), `lr`, `grad_norm`,
`loss_scale` (fp16), `tokens_per_s`, `bubble` (the fraction of the last step's time the devices waited),
`peak_memory_mib` and `activation_mib` per stage, `elapsed_s`. TensorBoard files them under `train/`, `val/`,
`perf/` and `memory/`; the measured timeline (timeline.png) is attached as an image.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from typing import Any, TextIO

TENSORBOARD_MISSING = ("--tensorboard needs the `tensorboard` package (torch.utils.tensorboard writes through it): "
                       "pip install tensorboard, or pip install 'stagewise[tensorboard]'")
WANDB_MISSING = ("--wandb needs the Weights & Biases client, which is not installed: pip install wandb "
                 "(and `wandb login`, or WANDB_MODE=offline); stagewise never requires it")

TAGS = {"loss": "train/loss", "lr": "train/lr", "grad_norm": "train/grad_norm", "loss_scale": "train/loss_scale",
        "val_loss": "val/loss", "val_perplexity": "val/perplexity", "tokens_per_s": "perf/tokens_per_s",
        "bubble": "perf/bubble", "elapsed_s": "perf/elapsed_s"}
PER_STAGE = {"peak_memory_mib": "memory/peak_MiB", "activation_mib": "memory/activations_MiB"}


def missing(tensorboard: bool, wandb: str | None) -> str | None:
    """Why the loggers asked for cannot run here (a package not installed), or None."""
    if tensorboard and importlib.util.find_spec("tensorboard") is None:
        return TENSORBOARD_MISSING
    if wandb and importlib.util.find_spec("wandb") is None:
        return WANDB_MISSING
    return None


def open_metrics(path: Path, start: int) -> TextIO:
    """metrics.jsonl for appending; on a resume, the lines past `start` (steps about to run again) are dropped."""
    if start == 0 or not path.exists():
        return open(path, "w")
    keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= start]
    path.write_text("".join(line + "\n" for line in keep))
    return open(path, "a")


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """Every record of metrics.jsonl (every attempt of a resumed run), [] when there is none."""
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class RunLogs:
    """The run's loggers on rank 0 (on other ranks every call does nothing)."""

    def __init__(self, out: Path, start: int, on: bool, tensorboard: bool = False, wandb: str | None = None,
                 config: dict[str, Any] | None = None):
        self.metrics = open_metrics(out / "metrics.jsonl", start) if on else None
        self.tb = self.wandb = None
        if on and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=start + 1 if start else None)
        if on and wandb:
            import wandb as wandb_client

            self.wandb = wandb_client
            wandb_client.init(project=wandb, dir=str(out), config=config, name=out.name, resume="allow")

    def write(self, step: int, record: dict[str, Any]) -> None:
        """One step's record (None values left out)."""
        record = {k: v for k, v in record.items() if v is not None}
        if self.metrics is not None:
            self.metrics.write(json.dumps({"step": step, **record}) + "\n")
            self.metrics.flush()
        flat = {}
        for key, value in record.items():
            if key in PER_STAGE:
                flat.update({f"{PER_STAGE[key]}/stage{s}": v for s, v in value.items()})
            elif isinstance(value, (int, float)):
                flat[TAGS.get(key, f"other/{key}")] = value
        if self.tb is not None:
            for tag, value in flat.items():
                self.tb.add_scalar(tag, value, step)
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log(flat, step=step)

    def image(self, step: int, path: Path, tag: str = "timeline") -> None:
        """Attach an image file (the measured timeline)."""
        if self.tb is not None:
            import numpy as np
            from matplotlib.image import imread

            pixels = imread(str(path))  # H x W x 3 or 4, floats in [0, 1]
            self.tb.add_image(tag, np.ascontiguousarray(pixels[..., :3]), step, dataformats="HWC")
            self.tb.flush()
        if self.wandb is not None:
            self.wandb.log({tag: self.wandb.Image(str(path))}, step=step)

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class Printer:
    """Lines on standard output, from rank 0 only."""

    def __init__(self, on: bool):
        self.on = on

    def __call__(self, text: str) -> None:
        if self.on:
            print(text, flush=True)


class Progress:
    """A rich progress bar with loss and tokens/s on a terminal; plain lines elsewhere."""

    def __init__(self, on: bool, total: int, start: int = 0):
        self.on = on
        self.bar = None
        if on and sys.stdout.isatty():
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self.bar = Progress(TextColumn("train"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.task = self.bar.add_task("train", total=total, completed=start, info="")
            self.bar.start()

    def update(self, step: int, loss: float, tps: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"loss {loss:.3f}  {tps:,.0f} tok/s")

    def print(self, text: str) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
