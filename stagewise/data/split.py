"""A held-out split of any corpus: text the model is never trained on, for the validation loss."""

from __future__ import annotations

import random
from collections.abc import Sequence


def split_texts(texts: Sequence[str], fraction: float, seed: int = 0) -> tuple[list[str], list[str]]:
    """(training texts, held-out texts), about `fraction` of the characters held out, the same for the same corpus
    and seed. Whole documents when there are several (taken in a seeded random order until the fraction is reached;
    at least one on each side), so no document lends context to both sides; a single document is cut at a line
    break, its tail held out. The training texts keep their order. `fraction` 0: nothing held out."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    texts = list(texts)
    if fraction == 0.0 or not texts:
        return texts, []
    if len(texts) == 1:
        text = texts[0]
        cut = text.rfind("\n", 0, int(len(text) * (1.0 - fraction)))
        cut = cut + 1 if cut > 0 else int(len(text) * (1.0 - fraction))
        return [text[:cut]], ([text[cut:]] if text[cut:] else [])
    order = list(range(len(texts)))
    random.Random(seed).shuffle(order)
    goal, taken, held = fraction * sum(len(t) for t in texts), 0, set()
    for i in order[:-1]:  # the last one in the order always trains
        if taken >= goal:
            break
        held.add(i)
        taken += len(texts[i])
    return [t for i, t in enumerate(texts) if i not in held], [t for i, t in enumerate(texts) if i in held]
