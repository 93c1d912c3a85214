"""Hunting races between rank threads: Python switches threads every 10 us instead of every 5 ms."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def short_switches() -> Iterator[None]:
    """Within the block, the interpreter switches threads as often as it can (`sys.setswitchinterval(1e-5)`)."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)
    try:
        yield
    finally:
        sys.setswitchinterval(old)
