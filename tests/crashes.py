"""Crashing a `stagewise train` rank on purpose, from outside the library (see crash_plugin/sitecustomize.py)."""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def crash_after(spec: str) -> dict[str, str]:
    """The environment that makes rank RANK of `stagewise train` SIGKILL itself after STEP steps ("RANK:STEP"), in
    the first attempt only: the plugin folder ahead of the source tree on PYTHONPATH, and the spec."""
    plugin = Path(__file__).resolve().parent / "crash_plugin"
    return {"PYTHONPATH": f"{plugin}{os.pathsep}{ROOT}", "STAGEWISE_TEST_KILL_AFTER_STEP": spec}
