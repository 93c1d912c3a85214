"""What every case of the fault campaign checks (tests/test_faults.py, tests/test_faults_processes.py): every
process and thread a case starts ends within a bound, none is left behind (each carries a tag in its
environment; /proc is searched for it afterwards), and the message names what it should."""

from __future__ import annotations

import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from fault_workers import layers, mse

from stagewise import Pipeline

ROOT = Path(__file__).resolve().parents[1]
FULL = os.environ.get("STAGEWISE_FAULTS", "").lower() == "full"
full = pytest.mark.skipif(not FULL, reason="in the full fault campaign only: STAGEWISE_FAULTS=full")
TAG = "STAGEWISE_FAULT_TAG"

def _tagged(tag: str) -> list[str]:
    """Running processes (not zombies) started by this case: their environment holds the case's tag."""
    found = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == os.getpid():
            continue
        try:
            if f"{TAG}={tag}".encode() not in (d / "environ").read_bytes().split(b"\0"):
                continue
            state = (d / "stat").read_text().rsplit(")", 1)[1].split()[0]
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if state != "Z" and "resource_tracker" not in cmd:
            found.append(f"{d.name}: {cmd[:200]}")
    return found


@pytest.fixture(autouse=True)
def nothing_left_behind(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """Tag the processes a case starts; afterwards none may still run, nor any rank thread but the stuck one."""
    tag = uuid.uuid4().hex
    monkeypatch.setenv(TAG, tag)
    before = set(threading.enumerate())
    yield tag
    deadline = time.monotonic() + 10  # processes told to stop may take a moment to go
    while _tagged(tag) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _tagged(tag), f"processes left behind: {_tagged(tag)}"
    left = [t.name for t in set(threading.enumerate()) - before
            if t.is_alive() and t.name.startswith("stagewise-rank") and not getattr(t, "stuck_on_purpose", False)]
    assert not left, f"rank threads left behind: {left}"


@contextmanager
def within(seconds: float) -> Iterator[None]:
    start = time.monotonic()
    yield
    took = time.monotonic() - start
    assert took < seconds, f"took {took:.1f} s, the bound is {seconds} s"


def pipe(fault_layer: torch.nn.Module | None = None, partition: list[int] | None = None, devices: int = 2,
         **kw) -> Pipeline:
    kw.setdefault("microbatches", 4)
    kw.setdefault("timeout", 5)
    at = kw.pop("at", 3)
    default = [4, 3] if fault_layer is not None else [3, 3]  # a fault is the last layer of stage 0
    return Pipeline(layers(fault_layer, at), kw.pop("loss_fn", mse), partition=partition or default,
                    local_devices=devices, show_partition=False, **kw)


def raises(pattern: str, fn, *args, bound: float = 15, kind: type[BaseException] = Exception, **kw) -> str:
    with within(bound), pytest.raises(kind) as info:
        fn(*args, **kw)
    text = str(info.value)
    assert re.search(pattern, text), f"{pattern!r} not in: {text}"
    return text


