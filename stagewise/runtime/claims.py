"""Which Pipeline holds which modules: a Pipeline trains the modules it is given in place (no copy), so two
Pipelines given the same module objects would train one set of parameters, each optimizer unaware of the other's
steps. `claim` warns when that happens (a Pipeline that has been garbage collected, or closed, holds nothing)."""

from __future__ import annotations

import gc
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

from torch import nn

_HOLDERS: weakref.WeakKeyDictionary[nn.Module, weakref.ref] = weakref.WeakKeyDictionary()


def claim(layers: Sequence[Any], owner: Any) -> list[Any]:
    """Record `owner` as the holder of every module in `layers` with parameters or buffers (a factory holds nothing
    until built) and return the list; warns once, naming the layers, when a live Pipeline already holds some."""
    modules = [(i, layer) for i, layer in enumerate(layers) if isinstance(layer, nn.Module)  # with state to share
               and (next(layer.parameters(), None) is not None or next(layer.buffers(), None) is not None)]
    taken = [i for i, layer in modules if _held_elsewhere(layer, owner)]
    if taken:  # a Pipeline dropped by its user may wait for the cycle collector: ask it first
        gc.collect()
        taken = [i for i, layer in modules if _held_elsewhere(layer, owner)]
    for _, layer in modules:
        _HOLDERS[layer] = weakref.ref(owner)
    if taken:
        shown = ", ".join(map(str, taken[:8])) + (", ..." if len(taken) > 8 else "")
        warnings.warn(f"stagewise: layers {shown} are already held by another Pipeline that is still alive. A Pipeline "
                      "trains the modules it is given in place, so both now share these parameters (and the other's "
                      "optimizer state goes stale). Give each Pipeline its own modules (copy.deepcopy(layers), or "
                      "zero-argument factories), or drop the other first (del it, or call its close())",
                      stacklevel=3)
    return list(layers)


def _held_elsewhere(layer: nn.Module, owner: Any) -> bool:
    held = _HOLDERS.get(layer)
    other = held() if held is not None else None
    return other is not None and other is not owner and not getattr(other, "closed", False)
